"""New classes on a pretrained backbone: every stage, the last included, classifies the data's own classes.

The most common real job (Savchenko's sequential analysis): take a network pretrained on, say,
ImageNet and classify a *new* set of classes from its embeddings. With ``--new-classes`` the
network is cut after the exits and after its *feature cut* (:func:`feature_cut`: the last cut
point before its own classifier, whose output is the penultimate, pooled features); its own
classifier is dropped; a linear head on the pooled features is fitted at every cut, the feature
cut included, on the frozen backbone, to the data's classes, which name the bundle's labels.

The final head is fitted first, on the labels alone; with ``--head gap_linear`` it then teaches
the exit heads (labels plus its softmax, as the network's own classifier does otherwise); with
``--head savchenko`` every head is Savchenko's linear SVM on L2-normalised features. Features
come from a :class:`~.features.FeatureStore`: once per image for every cut (automatic placement's
candidates included), cached on disk with ``--cache``.

Without ``--new-classes``, :func:`check_classes` refuses data whose classes are not the model's
outputs, naming the flag, instead of writing heads trained on label indices that mean something
else to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from stagewise.datasets import ImageSet
from stagewise.errors import ConversionError
from stagewise.images import Preprocess
from stagewise.progress import note

from .features import FeatureStore
from .heads import LINEAR_HEAD_KINDS, HeadTraining, LinearHead, train_head
from .plans import StagePlan, plans_with_heads
from .source import SourceAdapter


def model_outputs(source: SourceAdapter, model: Any, preprocess: Preprocess, size: tuple[int, int]) -> int:
    """How many classes ``model`` (prepared) answers: its output width on one blank image."""
    blank = preprocess.tensor([np.zeros((*size, 3), np.uint8)], size)
    return int(source.run(model, blank)[0].reshape(1, -1).shape[1])


def preview(classes: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(list(classes)[:limit])
    return shown + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")


def check_classes(model: Any, outputs: int, data: ImageSet) -> ImageSet:
    """``data`` as the model's own classes, or a :class:`ConversionError` that names ``--new-classes``.

    Data with as many classes as the model has outputs is taken as labelled by output index. Data
    whose class names are all among the model's own labels (``model.stagewise_labels``) is
    relabelled to those labels' indices. Anything else is refused.
    """
    labels = list(getattr(model, "stagewise_labels", None) or [])
    if labels and len(labels) == outputs and set(data.classes) <= set(labels) and list(data.classes) != labels:
        index = {name: k for k, name in enumerate(labels)}
        targets = np.array([index[data.classes[t]] for t in data.targets], dtype=np.int64)
        return ImageSet(data.sources, targets, tuple(labels), data.origin)
    if len(data.classes) == outputs:
        return data
    raise ConversionError(
        f"the data has {len(data.classes)} classes ({preview(data.classes)}) but the model answers {outputs} "
        + (f"({preview(labels)})" if labels else "classes") +
        "; to classify the data's own classes on the model's features (every stage, the last included, gets a "
        "head for them), add --new-classes (TOML: new_classes = true; Python: new_classes=True); to keep the "
        "model's classes, give images labelled with them (class folders named as its labels)")


def feature_cut(source: SourceAdapter, model: Any, size: tuple[int, int]) -> str:
    """The last valid cut point before the model's output: the input of its own classifier, whose
    pooled output is the penultimate features the final head of new classes reads."""
    points = [c for c in source.cut_points(model, size) if c.single_tensor]
    if not points:
        raise ConversionError("the model has no cut point before its classifier, so new classes have no features to "
                              "read; `stagewise cuts MODEL --all` shows where more than one tensor crosses")
    return points[-1].name


@dataclass(frozen=True)
class NewClassHeads:
    """Linear heads for the data's classes: ``heads[k]`` after ``cuts[k]``; the last cut is the feature cut."""

    cuts: tuple[str, ...]
    heads: tuple[LinearHead, ...]
    records: tuple[dict, ...]


def fit_new_class_heads(features: dict[str, np.ndarray], cuts: Sequence[str], targets: np.ndarray, classes: int,
                        training: HeadTraining) -> NewClassHeads:
    """Heads at ``cuts`` (the feature cut last) fitted on pooled ``features``: the final head on the labels,
    then each exit on the labels and (``gap_linear``) the final head's softmax."""
    targets = np.asarray(targets, dtype=np.int64)
    final, final_record = train_head(features[cuts[-1]], targets, None, training, classes=classes)
    teacher = final.decision(features[cuts[-1]])
    fitted = [train_head(features[cut], targets, teacher, training) for cut in cuts[:-1]]
    records = [dict(r, classes="new") for _, r in fitted] + [dict(final_record, classes="new")]
    return NewClassHeads(tuple(cuts), tuple([h for h, _ in fitted] + [final]), tuple(records))


def check_training(training: HeadTraining) -> None:
    """New classes fit linear heads on the frozen backbone; other trainings are refused clearly."""
    if training.kind not in LINEAR_HEAD_KINDS or training.mode not in ("auto", "frozen"):
        raise ConversionError(f"--new-classes fits linear heads on the frozen backbone (--head gap_linear or savchenko, "
                              f"--train-exits frozen); got --head {training.kind} --train-exits {training.mode}")


def new_class_plans(model: Any, exits: Sequence[str], preprocess: Preprocess, size: tuple[int, int],
                    head_images: ImageSet, store: FeatureStore, training: HeadTraining = HeadTraining(),
                    score: str = "max_softmax", feature: str | None = None) -> list[StagePlan]:
    """Stages of ``model`` cut after ``exits`` and its feature cut, each ending in a linear head for
    ``head_images``' classes; the model's own classifier is dropped."""
    from .source import source_of

    check_training(training)
    source = source_of(model)
    model = source.prepare(model)
    feature = feature or feature_cut(source, model, size)
    cuts = [c for c in exits if c != feature] + [feature]
    if feature in exits and exits[-1] != feature:
        raise ConversionError(f"{feature!r} is the model's feature cut (its classifier's input); exits must come "
                              "before it")
    features = store.features(cuts, head_images)
    fitted = fit_new_class_heads(features, cuts, head_images.targets, len(head_images.classes), training)
    note(f"new classes: {len(head_images.classes)} classes, heads after {', '.join(cuts)} "
         f"(the last on the penultimate features) fitted on {len(head_images)} images; train top-1 " +
         ", ".join(f"{100 * r['train_accuracy']:.1f}%" for r in fitted.records))
    segments = source.split(model, cuts)[:-1]
    return plans_with_heads(source, segments, cuts, size, list(fitted.heads), list(fitted.records), score)
