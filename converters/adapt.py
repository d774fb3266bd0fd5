"""Resolution adaptation of a cascade stage: a pretrained model made fit for a smaller (or larger) input.

A CNN trained at one resolution and fed another sees activations of a different scale; much of
that train/test resolution discrepancy is a shift of its BatchNorm statistics (Touvron et al.,
"Fixing the train-test resolution discrepancy", 2019). Two adaptations, each on the stage's own
input size:

* ``bn`` (label-free): every BatchNorm layer's running mean and variance are re-estimated as the
  cumulative average over batches of calibration images at the stage size. Torch: running
  statistics reset, ``momentum=None``, only the BatchNorm layers in training mode (dropout and
  stochastic depth stay off), no gradients. Keras: the model runs with ``training=True`` under a
  per-batch momentum ``(k - 1) / k`` (the same cumulative average) with its ``Dropout`` layers at
  rate 0 for the pass;
* ``head`` (labelled, torch only): ``bn``, then the classifier (the model's last ``Linear``) and
  every BatchNorm's affine parameters fine-tuned at the stage size on labelled images, with the
  loss ``(1 - distill) * cross-entropy(labels) + distill * KL(teacher || student)`` where the
  teacher is the model's softmax at its full resolution.

:func:`adapt` changes the model in place and returns the record the manifest keeps for the
stage (``stages[].adaptation``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from stagewise.datasets import ImageSet
from stagewise.errors import ConversionError, unknown_choice
from stagewise.images import Preprocess
from stagewise.progress import progress_bar

from .source import source_of

ADAPTATIONS = ("none", "bn", "head")
"""``none``: the model as it is; ``bn``: BatchNorm statistics at the stage size; ``head``: ``bn`` and fine-tuning."""


@dataclass(frozen=True)
class Adaptation:
    """How to adapt a stage to its input size (see the module docstring).

    ``kind``: one of :data:`ADAPTATIONS`. ``max_images``: at most this many images (a seeded
    stratified share) are used. ``batch``: images per BatchNorm batch and per training step.
    Fine-tuning (``head``): ``epochs`` passes of Adam at learning rate ``lr``; ``distill`` weighs
    the distillation term; ``teacher_size``: the full resolution the teacher model reads (default:
    the size its factory declares in ``stagewise_input``).
    """

    kind: str = "bn"
    max_images: int | None = 2000
    batch: int = 32
    epochs: int = 5
    lr: float = 1e-3
    distill: float = 0.5
    teacher_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ADAPTATIONS:
            raise ConversionError(unknown_choice("adaptation", self.kind, ADAPTATIONS))
        if self.batch < 2:
            raise ConversionError(f"BatchNorm statistics need batches of at least 2 images, got batch={self.batch}")
        if self.epochs < 1 or self.lr <= 0 or not 0.0 <= self.distill <= 1.0:
            raise ConversionError("head adaptation needs epochs >= 1, lr > 0 and distill in [0, 1]; got "
                                  f"epochs={self.epochs}, lr={self.lr}, distill={self.distill}")

    @property
    def labelled(self) -> bool:
        """Whether this adaptation needs labelled images."""
        return self.kind == "head"


def _pixels(images: ImageSet, preprocess: Preprocess, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Every image decoded once and resized to each of ``sizes`` (uint8 NHWC per size)."""
    out = [np.empty((len(images), h, w, 3), np.uint8) for h, w in sizes]
    for i in progress_bar(range(len(images)), "decoding adaptation images"):
        image = images.image(i)
        for store, size in zip(out, sizes):
            store[i] = preprocess.resized(image, size)
    return out


def _batches(pixels: np.ndarray, preprocess: Preprocess, batch: int, order: np.ndarray | None = None,
             keep_single: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices, normalised float batch in the model's layout)``; a last batch of one image is
    dropped (BatchNorm has no batch statistics for it) unless ``keep_single``."""
    order = np.arange(len(pixels)) if order is None else order
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        if len(idx) > 1 or keep_single:
            yield idx, preprocess.tensor(list(pixels[idx]), pixels.shape[1:3])


def adapt(model: Any, adaptation: Adaptation, preprocess: Preprocess, size: tuple[int, int], images: ImageSet,
          teacher: Any = None, teacher_size: tuple[int, int] | None = None) -> dict:
    """Adapt ``model`` (torch or Keras, in place) to input ``size`` on ``images``; returns the manifest record.

    ``bn`` uses the images without their labels; ``head`` also needs ``teacher`` (the model at
    full resolution, usually a second build of the same factory) and ``teacher_size``.
    """
    if adaptation.kind == "none":
        return {"kind": "none"}
    source = source_of(model)
    if adaptation.kind == "head" and source.framework != "torch":
        raise ConversionError("head adaptation (fine-tuning with distillation) is implemented for torch models only; "
                              "use --adapt bn for a Keras model")
    if adaptation.max_images is not None and len(images) > adaptation.max_images:
        images = images.split([adaptation.max_images / len(images)], seed=adaptation.seed)[0]
    if len(images) < 2 * adaptation.batch:
        raise ConversionError(f"adapting BatchNorm statistics needs at least {2 * adaptation.batch} images "
                              f"(two batches of {adaptation.batch}); got {len(images)}")
    if adaptation.kind == "head" and (teacher is None or teacher_size is None):
        raise ConversionError("head adaptation distils from the model at its full resolution: the model's factory "
                              "must declare that size (stagewise_input['size']) or give Adaptation.teacher_size")
    sizes = [tuple(size)] + ([tuple(teacher_size)] if adaptation.kind == "head" else [])
    pixels = _pixels(images, preprocess, sizes)
    record = {"kind": adaptation.kind, "size": list(size), "images": len(images), "data": images.origin,
              "batch": adaptation.batch, "seed": adaptation.seed}
    if source.framework == "torch":
        from .torch_adapt import finetune_head, reestimate_bn
    else:
        from .keras_adapt import reestimate_bn
    rng = np.random.default_rng(adaptation.seed)
    # shuffled: image sets often come sorted by class, and per-batch statistics of one-class runs
    # would miss the variance between classes
    order = rng.permutation(len(images))
    record["batchnorm_layers"] = reestimate_bn(model, _batches(pixels[0], preprocess, adaptation.batch, order))
    record["statistics"] = "cumulative average of per-batch BatchNorm statistics at the stage size"
    if adaptation.kind == "head":
        teacher_logits = np.concatenate([source.run(teacher, x)[0]
                                         for _, x in _batches(pixels[1], preprocess, 64, keep_single=True)])
        epochs = [_batches(pixels[0], preprocess, adaptation.batch, rng.permutation(len(images)))
                  for _ in range(adaptation.epochs)]
        losses = finetune_head(model, epochs, np.asarray(images.targets), teacher_logits, adaptation)
        record.update({k: v for k, v in asdict(adaptation).items() if k in ("epochs", "lr", "distill")},
                      teacher_size=list(teacher_size), loss_first_epoch=losses[0], loss_last_epoch=losses[-1],
                      trained="classifier and BatchNorm affine parameters")
    return record
