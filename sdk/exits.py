"""Exit scores: how confident a stage is, from its logits (higher means surer).

Every score is computed on a batch of logits (N x C) after dividing by the stage's
temperature. A stage may also decide on the mean of its own and all earlier stages'
probabilities (``combine="mean_probs"``), so earlier work is not wasted.
"""

from __future__ import annotations

import numpy as np

SCORES = ("max_softmax", "margin", "entropy", "max_logit")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def confidence(kind: str, probs: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
    """Per-row confidence of ``kind`` from probabilities (and raw logits for ``max_logit``).

    * ``max_softmax``: the top probability;
    * ``margin``: top-1 minus top-2 probability;
    * ``entropy``: ``1 - H(p) / log(C)`` (1 for a one-hot, 0 for uniform);
    * ``max_logit``: the top raw logit (a linear head's decision value).
    """
    if kind == "max_softmax":
        return probs.max(axis=1)
    if kind == "margin":
        top2 = np.partition(probs, -2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if kind == "entropy":
        p = np.clip(probs, 1e-12, 1.0)
        return 1.0 + (p * np.log(p)).sum(axis=1) / np.log(probs.shape[1])
    if kind == "max_logit":
        if logits is None:
            raise ValueError("max_logit needs the logits")
        return np.asarray(logits, dtype=np.float64).max(axis=1)
    raise ValueError(f"unknown exit score {kind!r}; choose one of {', '.join(SCORES)}")


def stage_probabilities(stage_logits: list[np.ndarray], temperatures: list[float],
                        combine: list[str]) -> list[np.ndarray]:
    """Each stage's deciding probabilities: its own softmax, or the running mean over stages."""
    out: list[np.ndarray] = []
    total = None
    for k, (logits, t) in enumerate(zip(stage_logits, temperatures)):
        probs = softmax(logits, t)
        total = probs if total is None else total + probs
        out.append(total / (k + 1) if combine[k] == "mean_probs" else probs)
    return out
