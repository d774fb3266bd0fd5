"""Exit heads on a frozen backbone, trained framework-neutrally (numpy + SciPy).

A head is ``pool -> [L2 normalise] -> linear``. Because the backbone is frozen and the head
starts with pooling, it is trained on the pooled features directly: the objective is convex and
is minimised to convergence with L-BFGS on the full batch, which is deterministic and needs no
learning-rate schedule. Features are standardised for the optimiser and the scaling is folded
back into the linear layer, so the exported head is plain ``pool -> linear``.

Loss (``kind="gap_linear"``): ``(1 - distill) * CE(labels) + distill * T^2 * KL(teacher_T || head_T)
+ weight_decay / 2 * |W|^2``, where the teacher is the full network's own final softmax (labels
plus teacher softmax beat labels alone); without a teacher (new classes: the final head is fitted
first, on the labels alone, and teaches the exits) the CE term only. ``kind="savchenko"``:
Savchenko's linear SVM (squared hinge) on global-average-pooled, L2-normalised features, fitted to
the labels only — the one classifier of :mod:`.savchenko`.

The source adapters (:mod:`.torch_source`, :mod:`.keras_source`) turn a :class:`LinearHead`
into their own layers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from stagewise.errors import ConversionError, unknown_choice

HEAD_KINDS = ("gap_linear", "savchenko", "conv", "mlp")
#: Heads fitted here on pooled features of a frozen backbone; the others are trained in torch.
LINEAR_HEAD_KINDS = ("gap_linear", "savchenko")
TRAINING_MODES = ("auto", "frozen", "joint", "given")
AUGMENTATIONS = ("flip_crop", "flip", "none")


@dataclass(frozen=True)
class FineTuning:
    """Settings of the SGD loop that trains torch heads, and in ``joint`` mode the backbone with them.

    One-cycle schedule peaking at ``lr`` for the backbone and ``head_lr`` for the freshly
    initialised heads; SGD with Nesterov momentum 0.9 and ``weight_decay``; ``exit_weights``
    weigh each exit's loss (default 1.0 each; the final exit's cross-entropy has weight 1);
    ``freeze`` names a cut up to which (inclusive) the backbone stays frozen; ``augment``:
    ``flip_crop`` (random crops from a zero-padded image plus horizontal flips), ``flip`` or
    ``none``; ``bf16``: bfloat16 autocast on the CPU (default: when it has fast bf16 kernels);
    ``device``: where the loop runs (:mod:`.devices`; float16 autocast on CUDA).
    """

    epochs: int = 4
    lr: float = 0.02
    head_lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    exit_weights: tuple[float, ...] | None = None
    freeze: str | None = None
    augment: str = "flip_crop"
    bf16: bool | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConversionError(f"fine-tuning needs epochs >= 1 and batch size >= 1, got {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise ConversionError(f"learning rates must be positive, got lr={self.lr}, head_lr={self.head_lr}")
        if self.augment not in AUGMENTATIONS:
            raise ConversionError(unknown_choice("augmentation", self.augment, AUGMENTATIONS))
        if self.exit_weights is not None and any(not w >= 0 for w in self.exit_weights):
            raise ConversionError(f"exit loss weights must be >= 0, got {self.exit_weights}")


@dataclass(frozen=True)
class HeadTraining:
    """Settings of exit-head training.

    ``kind``: ``gap_linear`` (labels + distillation), ``savchenko`` (L2-normalised features,
    labels only), ``conv`` or ``mlp`` (see :mod:`.torch_heads`; torch models). ``mode``:
    ``frozen`` (heads trained on the frozen backbone), ``joint`` (backbone and heads fine-tuned
    together, :mod:`.torch_training`), ``given`` (the heads the model carries in its
    ``stagewise_exits``) or ``auto`` (``given`` when the model carries heads, else ``frozen``). ``distill`` weighs the teacher term, ``temperature`` is the
    distillation temperature, ``weight_decay`` the L2 penalty on the (standardised) weights of an
    L-BFGS fit, ``max_iter`` its iteration cap; ``width`` the hidden width of conv/mlp heads;
    ``tuning`` the SGD loop of torch-trained heads.
    """

    kind: str = "gap_linear"
    distill: float = 0.5
    temperature: float = 2.0
    weight_decay: float = 1e-4
    max_iter: int = 300
    seed: int = 0
    mode: str = "auto"
    width: int | None = None
    tuning: FineTuning = FineTuning()

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConversionError(unknown_choice("exit head", self.kind, HEAD_KINDS))
        if self.mode not in TRAINING_MODES:
            raise ConversionError(unknown_choice("exit training", self.mode, TRAINING_MODES))
        if not 0.0 <= self.distill <= 1.0:
            raise ConversionError(f"distill weight must lie in [0, 1], got {self.distill}")
        if self.width is not None and self.width < 1:
            raise ConversionError(f"the head width (channels or hidden units) must be at least 1, got {self.width}")

    @property
    def in_torch(self) -> bool:
        """Whether the heads are trained by the torch loop (joint mode, or conv/mlp heads)."""
        return self.mode == "joint" or self.kind not in LINEAR_HEAD_KINDS

    def resolved(self, model: object) -> "HeadTraining":
        """These settings with ``auto`` mode decided for ``model``: ``given`` if it carries exit heads."""
        if self.mode != "auto":
            return self
        return replace(self, mode="given" if getattr(model, "stagewise_exits", None) else "frozen")


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


def train_head(features: np.ndarray, targets: np.ndarray, teacher_logits: np.ndarray | None,
               settings: HeadTraining = HeadTraining(), classes: int | None = None) -> tuple[LinearHead, dict]:
    """Fit a head on pooled ``features`` (N x C) to integer ``targets`` and the teacher's logits (N x K).

    Without a teacher (``teacher_logits`` None, e.g. the final head of new classes) the head fits
    the labels alone and ``classes`` gives its width. ``kind="savchenko"`` heads are the linear
    classifier of Savchenko's method (:func:`.savchenko.fit_linear_head`, the same one the Python
    route of :mod:`.savchenko` fits). Returns the head and its training record for the manifest.
    """
    from scipy.optimize import minimize  # here, so that a conversion request is checked before scipy loads

    targets = np.asarray(targets, dtype=np.int64)
    classes = int(teacher_logits.shape[1]) if teacher_logits is not None else classes
    if classes is None:
        raise ConversionError("head training needs the teacher's logits or the number of classes")
    if settings.kind == "savchenko":
        return _savchenko_head(features, targets, classes, settings)
    teacher = None if teacher_logits is None else np.asarray(teacher_logits, dtype=np.float64)
    x = np.asarray(features, dtype=np.float64)
    if len(x) != len(targets) or (teacher is not None and len(x) != len(teacher)):
        raise ConversionError(f"head training got {len(x)} feature rows, {len(targets)} targets, "
                              f"{len(teacher) if teacher is not None else 0} teacher rows; they must match")
    # a channel that barely varies on these images (dead, or a pre-activation BatchNorm output) is not scaled up
    # beyond 100x the typical channel: folded back into the weights, a larger factor amplifies float rounding
    # of the exported backbone into different logits
    spread = x.std(0)
    mean, std = x.mean(0), np.maximum(spread, max(1e-2 * float(np.median(spread)), 1e-6))
    z = (x - mean) / std
    channels = z.shape[1]
    distill = settings.distill if teacher is not None else 0.0

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
    head = LinearHead(w.T.astype(np.float32), b.astype(np.float32))
    train_acc = float((head.decision(features).argmax(1) == targets).mean())
    record = {"kind": settings.kind, "trained_on": "frozen backbone",
              "loss": "cross_entropy+distillation" if distill else "cross_entropy",
              "distill_weight": distill, "distill_temperature": settings.temperature,
              "weight_decay": settings.weight_decay, "optimizer": "L-BFGS (full batch)",
              "iterations": int(result.nit), "images": int(len(x)), "train_accuracy": train_acc}
    return head, record


def _savchenko_head(features: np.ndarray, targets: np.ndarray, classes: int,
                    settings: HeadTraining) -> tuple[LinearHead, dict]:
    """Savchenko's head: a linear SVM (squared hinge) on global-average-pooled, L2-normalised features."""
    from .savchenko import SavchenkoSettings, fit_linear_head

    method = SavchenkoSettings(seed=settings.seed)
    head = fit_linear_head(features, targets, classes, method)
    record = {"kind": "savchenko", "trained_on": "frozen backbone", "classifier": "linear_svm_squared_hinge",
              "C": method.C, "features": "global average pooling, L2-normalised", "loss": "squared_hinge",
              "images": int(len(targets)),
              "train_accuracy": float((head.decision(features).argmax(1) == targets).mean())}
    return head, record
