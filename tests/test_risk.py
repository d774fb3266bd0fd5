"""The statistical guarantee: exact binomial tests, fixed-sequence testing, and coverage in simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stagewise.calibration import ExitTable
from stagewise.calibration.risk import (binomial_cdf, binomial_pvalue, control, fixed_sequence, loss_matrix, upper_bound)


def test_binomial_cdf_matches_direct_sum():
    for n, x, p in [(10, 0, 0.1), (10, 3, 0.3), (50, 7, 0.05), (200, 0, 0.01), (30, 30, 0.5)]:
        direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(x + 1))
        assert binomial_cdf(x, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-15)
    assert binomial_cdf(-1, 10, 0.2) == 0.0 and binomial_cdf(3, 10, 0.0) == 1.0


def test_pvalue_and_upper_bound_agree():
    # 0 losses in 230 images: (1 - 0.01)^230 = 0.099 < 0.1, so risk <= 1% is established at delta = 0.1
    assert binomial_pvalue(0, 230, 0.01) == pytest.approx(0.99 ** 230)
    assert binomial_pvalue(0, 230, 0.01) <= 0.1 < binomial_pvalue(0, 220, 0.01)
    ub = upper_bound(5, 400, 0.1)
    assert binomial_cdf(5, 400, ub) == pytest.approx(0.1, abs=1e-6)
    assert 5 / 400 < ub < 0.03
    assert upper_bound(0, 0, 0.1) == 1.0


def test_fixed_sequence_stops_at_first_failure():
    candidates = [np.array([np.inf, np.inf]), np.array([0.9, np.inf]), np.array([0.5, np.inf]), np.array([0.1, np.inf])]
    n = 300
    losses = np.zeros((4, n), dtype=bool)
    losses[1, :2] = True      # 2/300: passes epsilon 0.05
    losses[2, :40] = True     # 40/300: fails
    losses[3, :1] = True      # would pass, but testing has stopped
    result = fixed_sequence(candidates, losses, epsilon=0.05, delta=0.1)
    assert result.index == 1 and result.thresholds == (0.9, np.inf) and result.losses == 2
    assert [t.rejected for t in result.tested] == [True, True, False]
    record = result.record("disagreement", 100)
    assert record["n"] == n and record["epsilon"] == 0.05 and record["upper_bound"] >= 2 / n


def test_nothing_certified_falls_back_to_full():
    losses = np.ones((2, 20), dtype=bool)
    losses[0] = False
    result = fixed_sequence([np.array([np.inf, np.inf]), np.array([0.3, np.inf])], losses, 0.05, 0.1)
    # 20 images cannot establish 5% even with no loss ((0.95)^20 = 0.36 > 0.1)
    assert result.index == -1 and result.thresholds == (np.inf, np.inf)


def test_loss_matrix_kinds():
    answers = np.array([[0, 1, 2, 2], [0, 1, 1, 2]])
    labels = np.array([0, 0, 1, 2])
    dis = loss_matrix(answers, answers[-1], None, "disagreement")
    assert dis.tolist() == [[False, False, True, False], [False] * 4]
    harm = loss_matrix(answers, answers[-1], labels, "error_increase")
    # image 1: full is wrong, so a wrong early answer costs nothing; image 2: full right, stage 0 wrong
    assert harm.tolist() == [[False, False, True, False], [False] * 4]
    with pytest.raises(ValueError, match="needs labels"):
        loss_matrix(answers, answers[-1], None, "error_increase")


def _simulate(n: int, rng: np.random.Generator, c: float = 0.5):
    """Two stages; the first's score s ~ U(0, 1) and it disagrees with the full model w.p. c (1 - s).

    Exiting at threshold t has true risk  c * integral_t^1 (1 - s) ds = c (1 - t)^2 / 2.
    """
    s = rng.random(n)
    loss0 = rng.random(n) < c * (1 - s)
    scores = np.stack([s, np.ones(n)])
    loss = np.stack([loss0, np.zeros(n, dtype=bool)])
    return scores, loss


def _true_risk(t: float, c: float = 0.5) -> float:
    return 0.0 if t > 1 else c * (1 - max(t, 0.0)) ** 2 / 2


def test_guarantee_holds_at_promised_rate_in_simulation():
    """Over many calibration draws, the true risk exceeds epsilon in at most ~delta of them."""
    rng = np.random.default_rng(0)
    eps, delta, trials, n = 0.05, 0.1, 200, 400
    costs = np.array([1.0, 4.0])
    violations = naive_violations = 0
    risks = []
    for _ in range(trials):
        scores, loss = _simulate(n, rng)
        idx = rng.permutation(n)
        result = control(scores, loss, costs, np.sort(idx[: n // 2]), np.sort(idx[n // 2:]), eps, delta, levels=20)
        r = _true_risk(result.thresholds[0])
        risks.append(r)
        violations += r > eps
        # the naive choice: the cheapest threshold whose empirical risk on all images is <= eps
        naive = ExitTable(scores, ~loss, costs).min_cost(1 - eps)
        naive_violations += _true_risk(naive.thresholds[0]) > eps
    rate = violations / trials
    # the promise: rate <= delta (plus 3 binomial standard errors of the simulation itself)
    assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / trials), rate
    # the procedure is not vacuous: it does exit early, close to the allowed risk
    assert np.mean(risks) > 0.3 * eps
    # and the check can fail: without the test the bound is missed about half the time
    assert naive_violations / trials > 0.3
