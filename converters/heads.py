"""Exit heads on a frozen backbone, trained framework-neutrally (numpy + SciPy).

A head is ``pool -> [L2 normalise] -> linear``. Because the backbone is frozen and the head
starts with pooling, it is trained on the pooled features directly: the objective is convex and
is minimised to convergence with L-BFGS on the full batch, which is deterministic and needs no
learning-rate schedule. Features are standardised for the optimiser and the scaling is folded
back into the linear layer, so the exported head is plain ``pool -> linear``.

Loss (``kind="gap_linear"``): ``(1 - distill) * CE(labels) + distill * T^2 * KL(teacher_T || head_T)
+ weight_decay / 2 * |W|^2``, where the teacher is the full network's own final softmax (labels
plus teacher softmax beat labels alone). ``kind="savchenko"``: Savchenko's linear classifier on
global-average-pooled, L2-normalised features, fitted to the labels only.

The source adapters (:mod:`.torch_source`, :mod:`.keras_source`) turn a :class:`LinearHead`
into their own layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from stagewise.errors import ConversionError

HEAD_KINDS = ("gap_linear", "savchenko")


@dataclass(frozen=True)
class HeadTraining:
    """Settings of exit-head training.

    ``kind``: ``gap_linear`` (labels + distillation) or ``savchenko`` (L2-normalised features,
    labels only). ``distill`` weighs the teacher term, ``temperature`` is the distillation
    temperature, ``weight_decay`` the L2 penalty on the (standardised) weights, ``max_iter`` the
    L-BFGS iteration cap.
    """

    kind: str = "gap_linear"
    distill: float = 0.5
    temperature: float = 2.0
    weight_decay: float = 1e-4
    max_iter: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConversionError(f"unknown exit head {self.kind!r}; choose from {', '.join(HEAD_KINDS)}")
        if not 0.0 <= self.distill <= 1.0:
            raise ConversionError(f"distill weight must lie in [0, 1], got {self.distill}")

    @property
    def normalise(self) -> bool:
        """Whether the head L2-normalises its pooled features."""
        return self.kind == "savchenko"

    @property
    def distill_weight(self) -> float:
        """The teacher term's weight actually used (Savchenko's heads fit the labels only)."""
        return 0.0 if self.kind == "savchenko" else self.distill


@dataclass(frozen=True)
class LinearHead:
    """A trained head: ``logits = f @ weight.T + bias`` on pooled (optionally L2-normalised) features ``f``.

    ``weight`` is K x C (classes x channels), ``bias`` has K entries.
    """

    weight: np.ndarray
    bias: np.ndarray
    normalise: bool = False

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def classes(self) -> int:
        return int(self.weight.shape[0])

    def decision(self, features: np.ndarray) -> np.ndarray:
        """The head's logits for pooled features (N x C)."""
        return head_input(features, self.normalise) @ self.weight.T + self.bias


def l2_normalised(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (zero rows stay zero)."""
    x = np.asarray(features, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def head_input(features: np.ndarray, normalise: bool) -> np.ndarray:
    """What the linear layer sees: the pooled features, L2-normalised when the head does so."""
    return l2_normalised(features) if normalise else np.asarray(features, dtype=np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def distillation_loss(logits: np.ndarray, targets: np.ndarray, teacher: np.ndarray | None, distill: float,
                      temperature: float) -> tuple[float, np.ndarray]:
    """Mean ``(1 - distill) * CE + distill * T^2 * KL(teacher_T || student_T)`` and its gradient in ``logits``."""
    n = len(logits)
    log_p = _log_softmax(logits)
    grad = (1 - distill) * np.exp(log_p)
    grad[np.arange(n), targets] -= 1 - distill
    loss = -(1 - distill) * log_p[np.arange(n), targets].mean()
    if distill and teacher is not None:
        t = temperature
        log_q = _log_softmax(teacher / t)
        log_pt = _log_softmax(logits / t)
        q = np.exp(log_q)
        loss += distill * t * t * float((q * (log_q - log_pt)).sum(axis=1).mean())
        grad += distill * t * (np.exp(log_pt) - q)
    return float(loss), grad / n


def train_head(features: np.ndarray, targets: np.ndarray, teacher_logits: np.ndarray,
               settings: HeadTraining = HeadTraining()) -> tuple[LinearHead, dict]:
    """Fit a head on pooled ``features`` (N x C) to integer ``targets`` and the teacher's logits (N x K).

    Returns the head and its training record for the manifest.
    """
    targets = np.asarray(targets, dtype=np.int64)
    teacher = np.asarray(teacher_logits, dtype=np.float64)
    x = head_input(features, settings.normalise)
    if len(x) != len(targets) or len(x) != len(teacher):
        raise ConversionError(f"head training got {len(x)} feature rows, {len(targets)} targets, "
                              f"{len(teacher)} teacher rows; they must match")
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
    z = (x - mean) / std
    channels, classes = z.shape[1], teacher.shape[1]
    distill = settings.distill_weight

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:channels * classes].reshape(channels, classes), theta[channels * classes:]
        loss, grad = distillation_loss(z @ w + b, targets, teacher, distill, settings.temperature)
        loss += 0.5 * settings.weight_decay * float((w * w).sum())
        gw = z.T @ grad + settings.weight_decay * w
        return loss, np.concatenate([gw.ravel(), grad.sum(0)])

    rng = np.random.default_rng(settings.seed)
    start = np.concatenate([rng.normal(0, 0.01, channels * classes), np.zeros(classes)])
    result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": settings.max_iter})
    w = result.x[:channels * classes].reshape(channels, classes) / std[:, None]
    b = result.x[channels * classes:] - (mean / std) @ result.x[:channels * classes].reshape(channels, classes)
    head = LinearHead(w.T.astype(np.float32), b.astype(np.float32), settings.normalise)
    train_acc = float((head.decision(features).argmax(1) == targets).mean())
    record = {"kind": settings.kind, "trained_on": "frozen backbone",
              "loss": "cross_entropy+distillation" if distill else "cross_entropy",
              "distill_weight": distill, "distill_temperature": settings.temperature,
              "weight_decay": settings.weight_decay, "optimizer": "L-BFGS (full batch)",
              "iterations": int(result.nit), "images": int(len(x)), "train_accuracy": train_acc}
    if settings.normalise:
        record["features"] = "global average pooling, L2-normalised"
    return head, record
