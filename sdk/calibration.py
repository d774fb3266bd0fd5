"""Threshold calibration: operating points on the accuracy / cost Pareto front.

Input: every stage's exit score and correctness on held-out images, and each stage's cost
(measured latency, or MACs). A sample exits at the first stage whose score reaches that
stage's threshold; the last stage always answers. Thresholds are searched exactly per stage
(every distinct score is a candidate) by coordinate descent, either on a Lagrangian
``cost - lambda * accuracy`` (tracing the front) or under a constraint (minimum cost at an
accuracy floor, maximum accuracy under a cost budget).

On top of :class:`ExitTable`, :func:`calibrate_stages` is the whole calibration suite, from raw
per-stage logits (numpy only; used by the converters and by ``stagewise calibrate``):

* per-stage temperature scaling fitted by NLL before any threshold is chosen;
* targets: the labels, or without labels the full model's own answers (agreement with the last
  stage; see ``docs/calibration.md`` for when that is appropriate);
* exit scores of any kind, including the learned score (fitted on a separate part of the images);
* goals: an accuracy drop (``drop``), a mean-cost budget (``budget``), Savchenko's
  false-acceptance rate ``alpha`` per stage (Benjamini-Hochberg, :func:`bh_thresholds`) and a
  statistical guarantee (``risk``: :mod:`stagewise.risk`), plus the Pareto front as named points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import CalibrationError
from .exits import (LearnedExitScore, PER_CLASS_SCORES, SCORES, all_stage_scores, confidence, softmax,
                    stage_features, stage_probabilities, wrong_class_scores)

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
    """Scores (K x N), correctness (K x N) and per-stage costs (K) of a K-stage sequence."""

    def __init__(self, scores: np.ndarray, correct: np.ndarray, stage_costs: np.ndarray):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.correct = np.asarray(correct, dtype=bool)
        if self.scores.shape != self.correct.shape or self.scores.ndim != 2:
            raise ValueError("scores and correct must both be K x N")
        self.cum_cost = np.cumsum(np.asarray(stage_costs, dtype=np.float64))
        if len(self.cum_cost) != self.scores.shape[0]:
            raise ValueError("need one cost per stage")
        self.k, self.n = self.scores.shape
        self._idx = np.arange(self.n)

    @classmethod
    def from_logits(cls, stage_logits: list[np.ndarray], labels: np.ndarray, stage_costs: np.ndarray,
                    scores: list[str], temperatures: list[float], combine: list[str],
                    models: list[LearnedExitScore | None] | None = None) -> "ExitTable":
        """Build the table from raw per-stage logits with each stage's exit rule."""
        probs = stage_probabilities(stage_logits, temperatures, combine)
        s = all_stage_scores(scores, stage_logits, temperatures, combine, models)
        correct = np.stack([p.argmax(axis=1) == labels for p in probs])
        return cls(s, correct, stage_costs)

    def subset(self, idx: np.ndarray) -> "ExitTable":
        """The same stages on the samples ``idx`` only."""
        costs = np.diff(np.concatenate([[0.0], self.cum_cost]))
        return ExitTable(self.scores[:, idx], self.correct[:, idx], costs)

    def exit_stage(self, thresholds: np.ndarray) -> np.ndarray:
        """Index of the stage each sample exits at."""
        hit = self.scores >= np.asarray(thresholds, dtype=np.float64)[:, None]
        hit[-1] = True
        return hit.argmax(axis=0)

    def evaluate(self, thresholds: np.ndarray) -> Outcome:
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


def operating_point(name: str, outcome: Outcome, goal: dict, n: int, cost_unit: str) -> dict:
    """A manifest ``operating_points`` entry (``None`` marks a stage that never exits early)."""
    k = len(outcome.thresholds)
    return {
        "name": name,
        "thresholds": [None if (i == k - 1 or not np.isfinite(t)) else float(t) for i, t in enumerate(outcome.thresholds)],
        "goal": goal,
        "expected": {"accuracy": outcome.accuracy, "mean_cost": outcome.mean_cost, "cost_unit": cost_unit,
                     "exit_rates": list(outcome.exit_rates), "n": n},
    }


def thresholds_of(point: dict) -> np.ndarray:
    """A manifest operating point's thresholds as floats (``inf`` for never-exit entries)."""
    return np.array([np.inf if t is None else t for t in point["thresholds"]], dtype=np.float64)


def calibrate(table: ExitTable, target_drops: list[float], budgets: list[float], cost_unit: str,
              default_drop: float | None = None) -> tuple[list[dict], str]:
    """Named operating points: ``full``, ``drop-<points>`` per accuracy drop, ``budget-<cost>``.

    ``target_drops`` are fractions (0.005 = half a point of top-1 below running every stage).
    Returns the points and the name of the default (the ``default_drop`` point, else ``full``).
    """
    points = [operating_point("full", table.full(), {"kind": "full"}, table.n, cost_unit)]
    reference = table.full().accuracy
    for drop in sorted(set(target_drops)):
        outcome = table.min_cost(reference - drop)
        points.append(operating_point(f"drop-{100 * drop:g}pt", outcome,
                                      {"kind": "max_accuracy_drop", "drop": drop, "reference_accuracy": reference},
                                      table.n, cost_unit))
    for budget in sorted(set(budgets)):
        points.append(operating_point(f"budget-{budget:g}{cost_unit}", table.max_accuracy(budget),
                                      {"kind": "max_mean_cost", "budget": budget}, table.n, cost_unit))
    default = "full" if default_drop is None else f"drop-{100 * default_drop:g}pt"
    return points, default


# --------------------------------------------------------------------------------------------
# Savchenko's rule: a false-acceptance rate alpha * m / M at stage m (Benjamini-Hochberg)
# --------------------------------------------------------------------------------------------

def bh_rank(alpha: float, m: int, stages: int, n: int) -> int:
    """``floor(alpha * m * n / M)``: which largest wrong-class score is stage ``m``'s threshold (1-based m)."""
    return int(math.floor(alpha * m * n / stages + 1e-9))


def bh_thresholds(wrong: np.ndarray, alpha: float, floor: np.ndarray | None = None) -> np.ndarray:
    """Savchenko's thresholds from the "maximal wrong-class scores" of the non-final stages.

    ``wrong`` is ``(M - 1) x n``: for each non-final stage and each held-out image, the highest
    score the stage gives a class other than the target (:func:`~stagewise.exits.wrong_class_scores`).
    Stage ``m`` (1-based, of ``M`` stages in all) gets the ``floor(alpha * m * n / M)``-th largest
    of its values as threshold, so on these images at most ``alpha * m / M`` of them have a wrong
    class scoring at or above it (a sample exits when its score is ``>=`` the threshold). A rank
    of 0 means the stage never exits (``inf``). When the rank reaches past the finite values (more
    room than wrong answers, only for non-per-class scores) every sample may exit: the threshold
    is then ``floor[m]`` (the stage's lowest score) or ``-inf``. The last stage gets ``inf``.
    """
    wrong = np.atleast_2d(np.asarray(wrong, dtype=np.float64))
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    stages = wrong.shape[0] + 1
    n = wrong.shape[1]
    out = np.full(stages, np.inf)
    for k in range(stages - 1):
        r = bh_rank(alpha, k + 1, stages, n)
        if r < 1:
            continue
        t = np.sort(wrong[k])[::-1][r - 1]
        if np.isneginf(t):
            t = -np.inf if floor is None else float(floor[k])
        out[k] = t
    return out


# --------------------------------------------------------------------------------------------
# The calibration suite: temperatures, targets, scores, goals -> operating points
# --------------------------------------------------------------------------------------------

DEFAULT_DROPS = (0.0, 0.005, 0.01, 0.02)
GOALS = ("full", "drop", "budget", "alpha", "risk")


@dataclass(frozen=True)
class Goal:
    """What the default operating point is chosen for.

    * ``drop``: cheapest with accuracy at least full - ``value`` (a fraction; without labels,
      agreement with the full model at least 1 - ``value``);
    * ``budget``: most accurate with mean cost at most ``value``;
    * ``alpha``: Savchenko's thresholds with false-acceptance rate ``value`` (:func:`bh_thresholds`);
    * ``risk``: the cheapest point whose ``risk`` (``disagreement`` or ``error_increase``) is at most
      ``value`` with probability at least 1 - ``delta`` (:mod:`stagewise.risk`);
    * ``full``: every stage always runs.
    """

    kind: str = "drop"
    value: float | None = 0.005
    delta: float | None = None
    risk: str = "disagreement"

    def __post_init__(self):
        if self.kind not in GOALS:
            raise ValueError(f"unknown goal {self.kind!r}; choose one of {', '.join(GOALS)}")
        if self.kind != "full" and self.value is None:
            raise ValueError(f"the {self.kind} goal needs a value")
        if self.kind == "risk" and self.delta is None:
            raise ValueError("the risk goal needs delta (the allowed probability of missing epsilon)")

    def point_name(self, cost_unit: str) -> str:
        if self.kind == "full":
            return "full"
        if self.kind == "drop":
            return f"drop-{100 * self.value:g}pt"
        if self.kind == "budget":
            return f"budget-{self.value:g}{cost_unit}"
        if self.kind == "alpha":
            return f"alpha-{self.value:g}"
        short = "disagree" if self.risk == "disagreement" else "error"
        return f"risk-{short}-{100 * self.value:g}pt-d{self.delta:g}"


@dataclass(frozen=True)
class Settings:
    """How to calibrate (beyond the goal).

    ``score`` switches the non-final stages to another exit score (``None`` keeps the bundle's);
    ``fit_temperature`` fits each stage's temperature by NLL first; ``tune_fraction`` of the
    images fit what must not see the threshold data (learned exit scores; with the risk goal
    also the temperatures and the candidate order); ``front_points`` named Pareto points
    ``pareto-1`` (cheapest) ... are added.
    """

    score: str | None = None
    fit_temperature: bool = True
    target_drops: tuple[float, ...] = DEFAULT_DROPS
    budgets: tuple[float, ...] = ()
    alphas: tuple[float, ...] = ()
    front_points: int = 6
    tune_fraction: float = 0.5
    seed: int = 0


@dataclass
class Calibration:
    """Everything :func:`calibrate_stages` decided: new exit rules, models, points and a record."""

    exits: list[dict]
    models: list[LearnedExitScore | None]
    points: list[dict]
    default: str
    record: dict
    table: ExitTable
    guarantee: dict | None = None
    extra: dict = field(default_factory=dict)


def _split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split stratified by target: (fit part, rest)."""
    from .datasets import stratified_indices

    fit = stratified_indices(np.asarray(targets), [fraction], seed)[0]
    rest = np.setdiff1d(np.arange(len(targets)), fit)
    if not len(fit) or not len(rest):
        raise CalibrationError(f"too few calibration images ({len(targets)}) to split {fraction:.0%} off for fitting")
    return fit, rest


def fit_temperatures(stage_logits: list[np.ndarray], labels: np.ndarray | None, current: list[float]) -> list[float]:
    """Per-stage temperatures by NLL: against the labels, or without labels against the last stage's softmax.

    Without labels the last stage keeps its temperature (it is its own target).
    """
    from .temperature import fit_temperature

    if labels is not None:
        return [fit_temperature(lg, targets=labels) for lg in stage_logits]
    teacher = softmax(stage_logits[-1], current[-1])
    return [fit_temperature(lg, soft=teacher) for lg in stage_logits[:-1]] + [float(current[-1])]


def _expected(thr: np.ndarray, agree: ExitTable, labelled: ExitTable | None, cost_unit: str) -> dict:
    out = agree.evaluate(thr)
    e = {"agreement": out.accuracy, "mean_cost": out.mean_cost, "cost_unit": cost_unit,
         "exit_rates": list(out.exit_rates), "n": agree.n}
    if labelled is not None:
        e["accuracy"] = labelled.evaluate(thr).accuracy
    return e


def threshold_point(name: str, thr: np.ndarray, goal: dict, agree: ExitTable, labelled: ExitTable | None,
                    cost_unit: str) -> dict:
    """A manifest operating point with expected agreement (and accuracy, given a labelled table) and cost."""
    k = len(thr)
    return {"name": name,
            "thresholds": [None if (i == k - 1 or not np.isfinite(t)) else float(t) for i, t in enumerate(thr)],
            "goal": goal, "expected": _expected(thr, agree, labelled, cost_unit)}


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


def calibrate_stages(stage_logits: list[np.ndarray], exits: list[dict], stage_costs: np.ndarray,
                     labels: np.ndarray | None = None, goal: Goal = Goal(), settings: Settings = Settings(),
                     cost_unit: str = "ms") -> Calibration:
    """Calibrate a K-stage sequence from its raw logits on held-out images.

    ``exits`` are the manifest stages' ``exit`` entries (score, temperature, combine); the
    returned :class:`Calibration` holds the new entries (temperatures fitted, score switched),
    the learned exit score models (``None`` for other scores), the operating points (``full``,
    ``drop-*``, ``budget-*``, ``alpha-*``, ``pareto-*`` and the goal's point) and the record for
    the manifest's ``calibration``. ``labels=None`` calibrates against the full model's answers.
    """
    k = len(stage_logits)
    n = len(stage_logits[0])
    if n < 2:
        raise CalibrationError("calibration needs images; got fewer than two")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != n:
            raise CalibrationError(f"{len(labels)} labels for {n} images")
    exits = [dict(e) for e in exits]
    for e in exits:
        e.pop("model", None)
    if settings.score is not None:
        if settings.score not in SCORES:
            raise CalibrationError(f"unknown exit score {settings.score!r}; choose one of {', '.join(SCORES)}")
        for e in exits[:-1]:
            e["score"] = settings.score
        if settings.score != "learned":
            exits[-1]["score"] = settings.score
    kinds = [e["score"] for e in exits]
    combine = [e.get("combine", "own") for e in exits]
    learned = any(kind == "learned" for kind in kinds[:-1])
    if kinds[-1] == "learned":
        exits[-1]["score"] = kinds[-1] = "max_softmax"  # the last stage never exits: it needs no model

    # Targets: labels, or the full model's own answers (computed with the current temperatures first).
    temps = [float(e["temperature"]) for e in exits]
    rough = stage_probabilities(stage_logits, temps, combine)[-1].argmax(axis=1)
    strata = labels if labels is not None else rough
    needs_split = learned or goal.kind == "risk"
    fit_idx, rest_idx = _split(strata, settings.tune_fraction, settings.seed) if needs_split else (np.arange(n), np.arange(n))

    if settings.fit_temperature:
        fit_on = fit_idx if goal.kind == "risk" else (np.arange(n) if not learned else fit_idx)
        temps = fit_temperatures([lg[fit_on] for lg in stage_logits], None if labels is None else labels[fit_on], temps)
        for e, t in zip(exits, temps):
            e["temperature"] = float(t)
    probs = stage_probabilities(stage_logits, temps, combine)
    answers = np.stack([p.argmax(axis=1) for p in probs])
    full_answer = answers[-1]
    targets = labels if labels is not None else full_answer
    correct = answers == targets[None, :]
    agree = answers == full_answer[None, :]

    models: list[LearnedExitScore | None] = [None] * k
    if learned:
        feats = stage_features(stage_logits, temps)
        for j in range(k - 1):
            if kinds[j] == "learned":
                models[j] = LearnedExitScore.fit(feats[j][fit_idx], correct[j][fit_idx])
    scores = all_stage_scores(kinds, stage_logits, temps, combine, models)

    # Thresholds are chosen on images the fitted parts never saw when a learned score is used.
    sel = rest_idx if learned else np.arange(n)
    costs = np.asarray(stage_costs, dtype=np.float64)
    agree_table = ExitTable(scores[:, sel], agree[:, sel], costs)
    label_table = ExitTable(scores[:, sel], correct[:, sel], costs) if labels is not None else None
    table = label_table if label_table is not None else agree_table
    reference = "labels" if labels is not None else "full_model_agreement"

    def point(name, thr, g):
        return threshold_point(name, np.asarray(thr, dtype=np.float64), g, agree_table, label_table, cost_unit)

    points = [point("full", np.full(k, np.inf), {"kind": "full"})]
    full_acc = table.full().accuracy
    cached: list[list[Outcome]] = []

    def front() -> list[Outcome]:  # traced once, shared by every constrained search
        if not cached:
            cached.append(table.front())
        return cached[0]

    drops = sorted(set(settings.target_drops) | ({goal.value} if goal.kind == "drop" else set()))
    for drop in drops:
        o = table.min_cost(full_acc - drop, front())
        points.append(point(f"drop-{100 * drop:g}pt", o.thresholds,
                            {"kind": "max_accuracy_drop", "drop": drop, "reference_accuracy": full_acc,
                             "reference": reference}))
    budgets = sorted(set(settings.budgets) | ({goal.value} if goal.kind == "budget" else set()))
    for budget in budgets:
        o = table.max_accuracy(budget, front())
        points.append(point(f"budget-{budget:g}{cost_unit}", o.thresholds,
                            {"kind": "max_mean_cost", "budget": budget, "reference": reference}))
    alphas = sorted(set(settings.alphas) | ({goal.value} if goal.kind == "alpha" else set()))
    if alphas:
        wrong = np.stack([wrong_class_scores(kinds[j], probs[j][sel], stage_logits[j][sel], targets[sel], scores[j][sel])
                          for j in range(k - 1)]) if k > 1 else np.zeros((0, len(sel)))
        floor = scores[:, sel].min(axis=1)
        for alpha in alphas:
            thr = bh_thresholds(wrong, alpha, floor)
            faithful = all(kinds[j] in PER_CLASS_SCORES for j in range(k - 1))
            points.append(point(f"alpha-{alpha:g}", thr,
                                {"kind": "false_acceptance_rate", "alpha": alpha, "reference": reference,
                                 "rule": "floor(alpha*m*n/M)-th largest maximal wrong-class score at stage m"
                                 + ("" if faithful else " (score of wrong answers: the score is not per class)"),
                                 "n": int(len(sel))}))
    for i, o in enumerate(spread(front() if settings.front_points > 0 else [], settings.front_points), start=1):
        points.append(point(f"pareto-{i}", o.thresholds, {"kind": "pareto", "rank": i, "reference": reference}))

    guarantee = None
    if goal.kind == "risk":
        from . import risk as _risk

        loss = _risk.loss_matrix(answers, full_answer, labels, goal.risk)
        result = _risk.control(scores, loss, costs, fit_idx, rest_idx, goal.value, goal.delta)
        guarantee = result.record(goal.risk, len(fit_idx))
        p = point(goal.point_name(cost_unit), np.array(result.thresholds),
                  {"kind": "risk", "risk": goal.risk, "epsilon": goal.value, "delta": goal.delta})
        p["guarantee"] = guarantee
        points.append(p)

    # de-duplicate names (a goal point may coincide with a default one)
    unique: dict[str, dict] = {}
    for p in points:
        unique[p["name"]] = p
    points = list(unique.values())
    oracle = table.oracle()
    record = {
        "method": "exact per-stage threshold search (coordinate descent)"
                  + ("; Savchenko false-acceptance thresholds (Benjamini-Hochberg)" if alphas else "")
                  + ("; learn-then-test risk control" if goal.kind == "risk" else ""),
        "goal": {k_: v for k_, v in goal.__dict__.items() if v is not None},
        "targets": reference,
        "n": int(n), "n_thresholds": int(len(sel)), "n_fit": int(len(fit_idx)) if needs_split else int(n),
        "seed": settings.seed,
        "temperature": "fitted by NLL per stage" if settings.fit_temperature else "kept",
        "temperatures": [float(t) for t in temps],
        "scores": kinds,
        "stage_agreement": [float(a.mean()) for a in agree[:, sel]],
        "oracle": {"accuracy": oracle.accuracy, "mean_cost": oracle.mean_cost, "exit_rates": list(oracle.exit_rates)},
    }
    if labels is not None:
        record["reference_accuracy"] = float(correct[-1][sel].mean())
        record["stage_accuracy"] = [float(c.mean()) for c in correct[:, sel]]
    else:
        record["reference_accuracy"] = 1.0
        record["note"] = "no labels: accuracy means agreement with running every stage"
    return Calibration(exits=exits, models=models, points=points, default=goal.point_name(cost_unit), record=record,
                       table=table, guarantee=guarantee)
