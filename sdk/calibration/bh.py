"""Savchenko's rule: a false-acceptance rate ``alpha * m / M`` at stage ``m`` (Benjamini-Hochberg).

Given, for each non-final stage and each held-out image, the highest score the stage gives a
class other than the target, stage ``m`` of ``M`` gets the ``floor(alpha * m * n / M)``-th
largest of those values as threshold.
"""

from __future__ import annotations

import math

import numpy as np


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
