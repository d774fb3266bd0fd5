"""Per-stage temperature scaling: one scalar T per stage, fitted by negative log-likelihood.

``softmax(logits / T)`` keeps every stage's top-1 answer and only changes how confident it
claims to be; a confidence score that is calibrated this way compares better across stages.
The NLL of ``softmax(beta * z)`` is convex in ``beta = 1 / T`` with derivative
``mean(E_p[z] - E_target[z])`` and second derivative ``mean(Var_p[z])``, so Newton's method on
``beta``, kept inside the bounds, finds the global minimum in a few softmax evaluations; a
golden-section search on ``log beta`` is the fallback (numpy only, no optimiser dependency).

Targets are either hard labels (``targets``: class indices) or soft targets (``soft``: one
probability row per sample, e.g. the full model's own softmax when calibrating without labels).
"""

from __future__ import annotations

import numpy as np

T_MIN, T_MAX = 0.05, 20.0


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, temperature: float, targets: np.ndarray | None = None,
        soft: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood (cross-entropy against ``soft``) of ``softmax(logits / T)``."""
    logp = _log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    if soft is not None:
        return float(-(np.asarray(soft, dtype=np.float64) * logp).sum(axis=1).mean())
    t = np.asarray(targets, dtype=np.int64)
    return float(-logp[np.arange(len(t)), t].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray | None = None, soft: np.ndarray | None = None,
                    bounds: tuple[float, float] = (T_MIN, T_MAX), iterations: int = 80) -> float:
    """The temperature in ``bounds`` that minimises the NLL of ``softmax(logits / T)`` on the targets.

    Give exactly one of ``targets`` (labels) or ``soft`` (target probabilities).
    """
    if (targets is None) == (soft is None):
        raise ValueError("give exactly one of targets (labels) or soft (target probabilities)")
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) == 0:
        return 1.0
    newton = _newton(logits, targets, soft, bounds)
    if newton is not None:
        return newton
    lo, hi = np.log(1 / bounds[1]), np.log(1 / bounds[0])  # log beta, beta = 1 / T
    f = lambda lb: nll(logits, float(np.exp(-lb)), targets, soft)  # noqa: E731
    g = (np.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    best = (a + b) / 2
    # the endpoints can win when the optimum lies at a bound
    candidates = [(f(x), x) for x in (lo, best, hi)]
    return float(np.exp(-min(candidates)[1]))


def _newton(logits: np.ndarray, targets: np.ndarray | None, soft: np.ndarray | None,
            bounds: tuple[float, float], iterations: int = 60) -> float | None:
    """Safeguarded Newton on beta = 1 / T: the NLL's derivative is increasing in beta, so each step
    keeps a bracket of its root and falls back to bisection when Newton would leave it.
    ``None`` if it does not settle (the caller then searches)."""
    lo, hi = 1 / bounds[1], 1 / bounds[0]
    if soft is not None:
        target_mean = (np.asarray(soft, dtype=np.float64) * logits).sum(axis=1).mean()
    else:
        target_mean = logits[np.arange(len(logits)), np.asarray(targets, dtype=np.int64)].mean()

    def derivatives(beta: float) -> tuple[float, float]:
        z = beta * logits
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        mean_z = (p * logits).sum(axis=1)
        return mean_z.mean() - target_mean, ((p * logits ** 2).sum(axis=1) - mean_z ** 2).mean()

    g_lo, _ = derivatives(lo)
    if g_lo >= 0:
        return float(1 / lo)  # the NLL only grows with beta: the largest temperature allowed
    g_hi, _ = derivatives(hi)
    if g_hi <= 0:
        return float(1 / hi)
    beta = min(max(1.0, lo), hi)
    for _ in range(iterations):
        grad, hess = derivatives(beta)
        if grad > 0:
            hi = beta
        else:
            lo = beta
        step = beta - grad / hess if hess > 1e-12 else None
        new = step if step is not None and lo < step < hi else (lo + hi) / 2
        if abs(new - beta) <= 1e-8 * beta or hi - lo <= 1e-10 * hi:
            return float(1 / new)
        beta = new
    return None
