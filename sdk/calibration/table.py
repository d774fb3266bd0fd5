"""The exit table: what a threshold set does, and the exact per-stage threshold searches.

Input: every stage's exit score and correctness on held-out images, and each stage's cost
(measured latency, or MACs). A sample exits at the first stage whose score reaches that
stage's threshold; the last stage always answers. Thresholds are searched exactly per stage
(every distinct score is a candidate) by coordinate descent, either on a Lagrangian
``cost - lambda * accuracy`` (tracing the front) or under a constraint (minimum cost at an
accuracy floor, maximum accuracy under a cost budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CalibrationError
from ..exits import LearnedExitScore, all_stage_scores, stage_probabilities

_MAX_SWEEPS = 25
_STARTS = 3  # constrained searches over 3+ stages descend from this many front points


@dataclass(frozen=True)
class Outcome:
    """What a threshold set does on the calibration images."""

    thresholds: tuple[float, ...]
    accuracy: float
    mean_cost: float
    exit_rates: tuple[float, ...]


class ExitTable:
    """Scores (K x N), correctness (K x N) and per-stage costs (K) of a K-stage sequence; ``answers`` (K x N,
    optional): each stage's predicted class (the drift monitor's reference records their distribution)."""

    def __init__(self, scores: np.ndarray, correct: np.ndarray, stage_costs: np.ndarray,
                 answers: np.ndarray | None = None):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.correct = np.asarray(correct, dtype=bool)
        self.answers = None if answers is None else np.asarray(answers, dtype=np.int64)
        if self.scores.shape != self.correct.shape or self.scores.ndim != 2:
            raise ValueError("scores and correct must both be K x N")
        self.cum_cost = np.cumsum(np.asarray(stage_costs, dtype=np.float64))
        if len(self.cum_cost) != self.scores.shape[0]:
            raise ValueError("need one cost per stage")
        self.k, self.n = self.scores.shape
        self._idx = np.arange(self.n)

    @classmethod
    def from_logits(cls, stage_logits: list[np.ndarray], targets: np.ndarray, stage_costs: np.ndarray,
                    scores: list[str], temperatures: list[float], combine: list[str],
                    models: list[LearnedExitScore | None] | None = None) -> "ExitTable":
        """Build the table from raw per-stage logits with each stage's exit rule (``targets``: integer labels)."""
        probs = stage_probabilities(stage_logits, temperatures, combine)
        s = all_stage_scores(scores, stage_logits, temperatures, combine, models)
        correct = np.stack([p.argmax(axis=1) == targets for p in probs])
        return cls(s, correct, stage_costs)

    def subset(self, idx: np.ndarray) -> "ExitTable":
        """The same stages on the samples ``idx`` only."""
        costs = np.diff(np.concatenate([[0.0], self.cum_cost]))
        return ExitTable(self.scores[:, idx], self.correct[:, idx], costs,
                         None if self.answers is None else self.answers[:, idx])

    def exit_stage(self, thresholds: np.ndarray) -> np.ndarray:
        """Index of the stage each sample exits at."""
        hit = self.scores >= np.asarray(thresholds, dtype=np.float64)[:, None]
        hit[-1] = True
        return hit.argmax(axis=0)

    def evaluate(self, thresholds: np.ndarray) -> Outcome:
        """What ``thresholds`` (one per stage) do on these samples."""
        exits = self.exit_stage(thresholds)
        rates = np.bincount(exits, minlength=self.k) / self.n
        return Outcome(tuple(float(t) for t in thresholds), float(self.correct[exits, self._idx].mean()),
                       float(self.cum_cost[exits].mean()), tuple(float(r) for r in rates))

    def full(self) -> Outcome:
        """Every sample runs every stage."""
        return self.evaluate(np.full(self.k, np.inf))

    def oracle(self) -> Outcome:
        """The best possible exit rule: each sample exits at the first stage that is right."""
        right = self.correct.copy()
        right[-1] = True
        exits = right.argmax(axis=0)
        rates = np.bincount(exits, minlength=self.k) / self.n
        return Outcome((), float(self.correct[exits, self._idx].mean()), float(self.cum_cost[exits].mean()),
                       tuple(float(r) for r in rates))

    def _stage_choices(self, thr: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every distinct threshold for stage k (others fixed) with the accuracy and cost it gives."""
        reach = ~(self.scores[:k] >= thr[:k, None]).any(axis=0)
        rest = thr.copy()
        rest[k] = np.inf
        exits = self.exit_stage(rest)
        base_correct = self.correct[exits, self._idx]
        base_cost = self.cum_cost[exits]
        r = np.flatnonzero(reach)
        order = np.argsort(-self.scores[k, r], kind="stable")
        s = self.scores[k, r][order]
        d_corr = np.concatenate([[0], np.cumsum(self.correct[k, r][order].astype(np.int64)
                                                - base_correct[r][order])])
        d_cost = np.concatenate([[0.0], np.cumsum(self.cum_cost[k] - base_cost[r][order])])
        boundary = np.concatenate([[True], np.append(s[:-1] != s[1:], True)]) if len(s) else np.array([True])
        j = np.flatnonzero(boundary)
        thresholds = np.where(j == 0, np.inf, s[np.maximum(j - 1, 0)] if len(s) else np.inf)
        acc = (base_correct.sum() + d_corr[j]) / self.n
        cost = (base_cost.sum() + d_cost[j]) / self.n
        return thresholds, acc, cost

    def _descend(self, thr: np.ndarray, pick) -> np.ndarray:
        thr = thr.copy()
        for _ in range(_MAX_SWEEPS):
            changed = False
            for k in range(self.k - 1):
                options, acc, cost = self._stage_choices(thr, k)
                best = options[pick(acc, cost)]
                if best != thr[k]:
                    thr[k], changed = best, True
            if not changed:
                break
        return thr

    def lagrangian(self, lam: float, start: np.ndarray | None = None) -> Outcome:
        """Thresholds minimising ``mean_cost - lam * accuracy`` (a point of the convex front)."""
        start = np.full(self.k, np.inf) if start is None else start
        return self.evaluate(self._descend(start, lambda acc, cost: int(np.argmin(cost - lam * acc + 1e-12 * np.arange(len(acc))))))

    def front(self, points: int = 48) -> list[Outcome]:
        """Pareto-optimal outcomes (no other is both cheaper and at least as accurate)."""
        scale = self.cum_cost[-1]
        found = [self.full()] + [self.lagrangian(scale * lam) for lam in np.logspace(-2.5, 3, points)]
        return pareto(found)

    def exact_front(self, max_evaluations: int = 5_000_000) -> list[Outcome]:
        """The Pareto front over every combination of thresholds, found exhaustively (no descent).

        Each earlier stage takes every distinct score (or never exits) and the last stage that
        can exit is swept exactly, so the front is the true one: all of it, not only the convex
        points :meth:`front` traces. The work grows as ``n ** (k - 2)`` sweeps, so it suits up to
        three stages; a ``ValueError`` says when more than ``max_evaluations`` threshold sets
        would be evaluated (use :meth:`front` there).
        """
        if self.k == 1:
            return [self.full()]
        inf = np.full(self.k, np.inf)
        prefixes = [np.empty(0)]
        for k in range(self.k - 2):
            options = self._stage_choices(inf, k)[0]
            if len(prefixes) * len(options) * (self.n + 1) > max_evaluations:
                raise ValueError(f"an exact front of {self.k} stages on {self.n} samples needs more than "
                                 f"{max_evaluations} evaluations; use front()")
            prefixes = [np.append(p, t) for p in prefixes for t in options]
        found_thr, found_acc, found_cost = [], [], []
        for prefix in prefixes:
            thr = inf.copy()
            thr[:len(prefix)] = prefix
            options, acc, cost = self._stage_choices(thr, self.k - 2)
            rows = np.repeat(thr[None, :], len(options), axis=0)
            rows[:, self.k - 2] = options
            found_thr.append(rows)
            found_acc.append(acc)
            found_cost.append(cost)
        thr, acc, cost = np.concatenate(found_thr), np.concatenate(found_acc), np.concatenate(found_cost)
        order = np.lexsort((-acc, cost))
        best_before = np.concatenate([[-np.inf], np.maximum.accumulate(acc[order])[:-1]])
        keep = order[acc[order] > best_before + 1e-12]
        return [self.evaluate(thr[i]) for i in keep]

    def min_cost(self, min_accuracy: float, front: list[Outcome] | None = None) -> Outcome:
        """Cheapest thresholds whose accuracy is at least ``min_accuracy`` (``front``: a precomputed :meth:`front`)."""
        feasible = [o for o in (self.front() if front is None else front) if o.accuracy >= min_accuracy - 1e-12]
        if not feasible:
            raise CalibrationError(
                f"no thresholds reach accuracy {min_accuracy:.4f} on the calibration data "
                f"(running every stage gives {self.full().accuracy:.4f}); allow a larger drop")
        def pick(acc, cost):
            ok = acc >= min_accuracy - 1e-12
            return int(np.flatnonzero(ok)[np.argmin(cost[ok])]) if ok.any() else int(np.argmax(acc))
        starts = sorted(feasible, key=lambda o: o.mean_cost)[:1 if self.k <= 2 else _STARTS]
        found = starts + [self.evaluate(self._descend(np.array(o.thresholds), pick)) for o in starts]
        return min((o for o in found if o.accuracy >= min_accuracy - 1e-12), key=lambda o: (o.mean_cost, -o.accuracy))

    def max_accuracy(self, budget: float, front: list[Outcome] | None = None) -> Outcome:
        """Most accurate thresholds whose mean cost is at most ``budget`` (``front``: a precomputed :meth:`front`)."""
        feasible = [o for o in (self.front() if front is None else front) if o.mean_cost <= budget + 1e-12]
        if not feasible:
            raise CalibrationError(
                f"no thresholds keep the mean cost under {budget:.4g} (the first stage alone costs "
                f"{self.cum_cost[0]:.4g}); raise the budget")
        def pick(acc, cost):
            ok = cost <= budget + 1e-12
            return int(np.flatnonzero(ok)[np.argmax(acc[ok])]) if ok.any() else int(np.argmin(cost))
        starts = sorted(feasible, key=lambda o: (-o.accuracy, o.mean_cost))[:1 if self.k <= 2 else _STARTS]
        found = starts + [self.evaluate(self._descend(np.array(o.thresholds), pick)) for o in starts]
        return max((o for o in found if o.mean_cost <= budget + 1e-12), key=lambda o: (o.accuracy, -o.mean_cost))


def pareto(outcomes: list[Outcome]) -> list[Outcome]:
    """The non-dominated outcomes, sorted by cost (duplicates removed)."""
    front: list[Outcome] = []
    for o in sorted(outcomes, key=lambda o: (o.mean_cost, -o.accuracy)):
        if not front or o.accuracy > front[-1].accuracy + 1e-12:
            front.append(o)
    return front




def spread(front: list[Outcome], count: int) -> list[Outcome]:
    """At most ``count`` points of a front, spread evenly over its cost range (ends included)."""
    if count <= 0 or not front:
        return []
    if len(front) <= count:
        return list(front)
    costs = np.array([o.mean_cost for o in front])
    picked: set[int] = set()
    for c in np.linspace(costs[0], costs[-1], count):
        distance = np.abs(costs - c)
        distance[list(picked)] = np.inf
        picked.add(int(np.argmin(distance)))
    return [front[i] for i in sorted(picked)]
