"""Risk-controlled operating points: a statistical guarantee on what early exits cost.

Goal: thresholds whose *risk* — the probability, over new images from the calibration
distribution, that the cascade's answer is worse than running every stage — is at most
``epsilon``, with probability at least ``1 - delta`` over the draw of the calibration images.
Two risks, both a 0/1 loss per image:

* ``disagreement``: the cascade's answer differs from the full model's (needs no labels);
* ``error_increase``: the cascade is wrong where the full model is right. The increase in error
  rate over the full model is this probability minus that of the converse, so bounding it
  bounds the error increase.

Procedure (Learn then Test, Angelopoulos et al. 2021, with fixed-sequence testing):

1. split the calibration images at random into a *tune* part and a *test* part;
2. on the tune part, trace candidate threshold sets ordered from safest to most aggressive:
   for a grid of tune-set risk levels ``rho`` (0 up to a few times ``epsilon``), the cheapest
   thresholds whose tune-set risk is at most ``rho`` (exact per-stage search), starting with
   "never exit early" (risk 0);
3. on the test part, walk the sequence and test ``H0: risk >= epsilon`` for each candidate with
   the exact binomial tail ``p = P(Binomial(n, epsilon) <= losses)``; stop at the first
   ``p > delta``. The last rejected candidate is returned (or "never exit early" when none is).

Fixed-sequence testing controls the family-wise error at ``delta`` whatever the sequence, since
the order is fixed before the test part is looked at, so ``P(risk(chosen) > epsilon) <= delta``.
Everything fitted from data (temperatures, learned exit scores, the candidate order) must come
from the tune part only; the callers in this package do that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import CalibrationError
from .table import ExitTable

RISKS = ("disagreement", "error_increase")
METHOD = "learn-then-test: fixed-sequence exact binomial tests on a held-out part of the calibration images"


def binomial_cdf(x: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= x)``, exactly (log-space sum of the terms)."""
    if x < 0:
        return 0.0
    if x >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    k = np.arange(x + 1)
    log_terms = (math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])
                 + k * math.log(p) + (n - k) * math.log1p(-p))
    top = log_terms.max()
    return float(min(1.0, math.exp(top) * np.exp(log_terms - top).sum()))


def binomial_pvalue(losses: int, n: int, epsilon: float) -> float:
    """p-value of ``H0: risk >= epsilon`` after seeing ``losses`` in ``n`` independent images."""
    return binomial_cdf(int(losses), int(n), float(epsilon))


def upper_bound(losses: int, n: int, delta: float) -> float:
    """One-sided ``1 - delta`` Clopper-Pearson upper confidence bound on a risk from ``losses`` / ``n``."""
    if n == 0:
        return 1.0
    if losses >= n:
        return 1.0
    lo, hi = losses / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binomial_cdf(losses, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class TestedCandidate:
    """One candidate of the fixed sequence, as seen on the test part."""

    thresholds: tuple[float, ...]
    losses: int
    n: int
    pvalue: float
    rejected: bool


@dataclass(frozen=True)
class RiskResult:
    """The outcome of :func:`fixed_sequence`: the chosen candidate and the whole tested sequence."""

    index: int                      # position of the chosen candidate in the sequence (-1: none rejected)
    thresholds: tuple[float, ...]   # chosen thresholds ("never exit early" when index == -1)
    losses: int                     # its losses on the test part
    n: int                          # size of the test part
    epsilon: float
    delta: float
    tested: tuple[TestedCandidate, ...]

    @property
    def empirical_risk(self) -> float:
        return self.losses / self.n if self.n else 0.0

    def record(self, risk: str, n_tune: int) -> dict:
        """The manifest's ``guarantee`` record."""
        return {"epsilon": self.epsilon, "delta": self.delta, "n": self.n, "n_tune": n_tune, "risk": risk,
                "method": METHOD, "empirical_risk": self.empirical_risk,
                "upper_bound": upper_bound(self.losses, self.n, self.delta),
                "candidates_tested": len(self.tested), "candidates_passed": max(0, self.index + 1)}


def fixed_sequence(candidates: list[np.ndarray], losses: np.ndarray, epsilon: float, delta: float) -> RiskResult:
    """Test ``candidates`` (threshold vectors, safest first) on the test part, in order.

    ``losses`` is ``len(candidates) x n``: the 0/1 loss of each candidate on each test image.
    """
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ValueError(f"epsilon and delta must lie in (0, 1), got {epsilon}, {delta}")
    losses = np.asarray(losses)
    n = losses.shape[1] if losses.ndim == 2 else 0
    tested = []
    chosen = -1
    for j, thr in enumerate(candidates):
        count = int(losses[j].sum())
        p = binomial_pvalue(count, n, epsilon)
        ok = p <= delta
        tested.append(TestedCandidate(tuple(float(t) for t in thr), count, n, p, ok))
        if not ok:
            break
        chosen = j
    k = len(candidates[0]) if candidates else 0
    if chosen < 0:
        return RiskResult(-1, tuple([np.inf] * k), 0, n, epsilon, delta, tuple(tested))
    return RiskResult(chosen, tested[chosen].thresholds, tested[chosen].losses, n, epsilon, delta, tuple(tested))


def loss_matrix(stage_answers: np.ndarray, full_answer: np.ndarray, targets: np.ndarray | None, risk: str) -> np.ndarray:
    """Per stage and image (K x N), the 0/1 loss of answering at that stage.

    ``stage_answers`` is K x N (each stage's deciding top-1), ``full_answer`` the answer of
    running every stage (the last row, normally).
    """
    if risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}; choose one of {', '.join(RISKS)}")
    differs = np.asarray(stage_answers) != np.asarray(full_answer)[None, :]
    if risk == "disagreement":
        return differs
    if targets is None:
        raise ValueError("the error_increase risk needs labels; use risk='disagreement' without labels")
    targets = np.asarray(targets)
    return (np.asarray(stage_answers) != targets[None, :]) & (np.asarray(full_answer) == targets)[None, :]


def candidate_sequence(tune_table: ExitTable, epsilon: float, levels: int = 40, span: float = 3.0) -> list[np.ndarray]:
    """Threshold sets ordered from safest to most aggressive, traced on the tune part only.

    ``tune_table`` is an :class:`~stagewise.calibration.table.ExitTable` whose ``correct`` is
    "no loss". Its ``accuracy`` is then ``1 - risk``; for each level ``rho`` in
    ``linspace(0, span * epsilon, levels)`` the cheapest thresholds with tune-set risk at most
    ``rho`` are found; duplicates are dropped.
    """
    out: list[np.ndarray] = [np.full(tune_table.k, np.inf)]
    seen = {tuple(out[0])}
    front = tune_table.front()
    for rho in np.linspace(0.0, span * epsilon, levels):
        try:
            thr = np.array(tune_table.min_cost(1.0 - rho, front).thresholds)
        except CalibrationError:
            continue
        key = tuple(thr)
        if key not in seen:
            seen.add(key)
            out.append(thr)
    return out


def control(scores: np.ndarray, loss: np.ndarray, stage_costs: np.ndarray, tune_idx: np.ndarray, test_idx: np.ndarray,
            epsilon: float, delta: float, levels: int = 40) -> RiskResult:
    """The whole procedure on per-stage exit ``scores`` and 0/1 ``loss`` (both K x N).

    Candidates are traced on the images ``tune_idx`` and tested on ``test_idx`` (disjoint).
    """
    if len(np.intersect1d(tune_idx, test_idx)):
        raise ValueError("the tune and test parts must be disjoint")
    loss = np.asarray(loss, dtype=bool)
    tune = ExitTable(scores[:, tune_idx], ~loss[:, tune_idx], stage_costs)
    candidates = candidate_sequence(tune, epsilon, levels)
    test = ExitTable(scores[:, test_idx], ~loss[:, test_idx], stage_costs)
    cols = np.arange(len(test_idx))
    test_loss = loss[:, test_idx]
    losses = np.stack([test_loss[test.exit_stage(c), cols] for c in candidates])
    return fixed_sequence(candidates, losses, epsilon, delta)
