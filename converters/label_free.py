"""Converting without labels: the full model is the teacher for the exit heads and the thresholds.

When the user has images but no labels, the network's own answers stand in for them:

* :func:`pseudo_labelled` runs the full model once over the images and returns an
  :class:`~stagewise.datasets.ImageSet` whose labels are its top-1 answers;
* :data:`TEACHER_ONLY` trains exit heads on the teacher's softmax alone (``distill=1``: the
  cross-entropy on labels gets weight 0, so the pseudo-labels only feed the training record);
* thresholds: ``stagewise calibrate --no-labels`` (or ``calibrate_manifest(..., labels=None)``)
  calibrates against agreement with the full model.

Example::

    images = open_image_set("photos/", labelled=False)       # stagewise.datasets
    teacher_set = pseudo_labelled(model, images, pre, (224, 224), classes)
    heads_part, calib_part = teacher_set.split([0.8, 0.2], seed=0)
    plans = early_exit_plans(model, cuts, pre, (224, 224), heads_part, TEACHER_ONLY)
    bundle = build_bundle(out, name, plans, pre, classes, calib_part)
    recalibrate(bundle, calib_folder, labelled=False, target_drop=1.0)

See ``docs/calibration.md`` for when calibrating against the model itself is appropriate.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from stagewise.datasets import ImageSet
from stagewise.images import Preprocess

from .heads import HeadTraining
from .source import source_of

TEACHER_ONLY = HeadTraining(distill=1.0)
"""Head training on the teacher's softmax only (no labels)."""

MARKER = " (labels: the full model's own predictions)"


def teacher_logits(model: Any, images: ImageSet, preprocess: Preprocess, size: tuple[int, int],
                   batch: int = 64) -> np.ndarray:
    """The full model's logits for every image (N x C)."""
    source = source_of(model)
    model = source.prepare(model)
    out = []
    for i in range(0, len(images), batch):
        chunk = [images.image(j) for j in range(i, min(i + batch, len(images)))]
        out.append(source.run(model, preprocess.tensor(chunk, size))[0])
    return np.concatenate(out)


def pseudo_labelled(model: Any, images: ImageSet, preprocess: Preprocess, size: tuple[int, int],
                    classes: Sequence[str]) -> ImageSet:
    """``images`` labelled with the full model's top-1 answers (its ``origin`` says so)."""
    labels = teacher_logits(model, images, preprocess, size).argmax(axis=1).astype(np.int64)
    return ImageSet(images.sources, labels, tuple(classes), images.origin + MARKER)
