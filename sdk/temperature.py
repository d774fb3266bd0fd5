"""Per-stage temperature scaling: one scalar T per stage, fitted by negative log-likelihood.

``softmax(logits / T)`` keeps every stage's top-1 answer and only changes how confident it
claims to be; a confidence score that is calibrated this way compares better across stages.
The NLL of ``softmax(beta * z)`` is convex in ``beta = 1 / T``, so a bracketed golden-section
search on ``log beta`` finds the global minimum (numpy only, no optimiser dependency).

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
