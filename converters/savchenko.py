"""Savchenko's sequential analysis with a specified confidence level, on a frozen pretrained network.

The method (A. V. Savchenko, sequential analysis / adaptive CNNs with a specified confidence
level), as implemented here:

1. **Heads.** At each of M cut points of a frozen pretrained backbone the features are
   global-average pooled and L2-normalised, and a linear classifier is fitted on them: a linear
   SVM with the squared hinge loss (``classifier="svm"``, one-vs-rest, scikit-learn
   ``LinearSVC``) or multinomial logistic regression (``"logistic"``). The last cut is the
   backbone's final feature layer, so every stage, the last included, is such a head.
2. **Thresholds.** The user's N images are split, stratified, into a part of ``K = delta * N``
   images that trains the heads and the remaining ``N - K``. For every remaining image and stage
   m the *maximal wrong-class score* is the highest decision value the stage's head gives a
   class other than the image's own. Stage m's threshold is the
   ``floor(alpha * m * (N - K) / M)``-th largest of these values (Benjamini-Hochberg: the
   false-acceptance rate allowed at stage m is ``alpha * m / M``); the last stage always answers.
3. **Retraining.** The heads are then refitted on all N images; the thresholds are kept.
4. **Decision.** An image leaves at the first stage whose top decision value reaches the
   stage's threshold. In the bundle the heads output decision values as logits and the exit
   score is ``max_logit``, so the runtime implements the rule unchanged.

:func:`savchenko_heads` does 1-3 on pooled features (numpy + scikit-learn);
:func:`savchenko_plans` turns a torch model, cut points and images into converter stage plans
with those heads and the thresholds per ``alpha``; :func:`add_alpha_points` writes them into a
bundle's manifest as operating points ``alpha-<value>``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from stagewise.calibration import bh_thresholds
from stagewise.datasets import stratified_indices
from stagewise.deprecation import renamed_attribute, renamed_keywords
from stagewise.errors import ConversionError
from stagewise.extras import require
from stagewise.manifest import Manifest, OperatingPoint, freeze, thaw

from .heads import LinearHead, l2_normalised

CLASSIFIERS = ("svm", "logistic")


@dataclass(frozen=True)
class SavchenkoSettings:
    """Choices of the method. ``delta`` is the share of the user's images that trains the heads
    before the thresholds are estimated on the rest; ``C`` the classifiers' inverse regularisation."""

    classifier: str = "svm"
    C: float = 1.0
    delta: float = 0.5
    alphas: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
    seed: int = 0
    max_iter: int = 5000


@renamed_keywords(labels="targets")
def fit_linear_head(features: np.ndarray, targets: np.ndarray, classes: int, settings: SavchenkoSettings) -> LinearHead:
    """A linear SVM (squared hinge) or logistic regression on L2-normalised ``features`` and their integer ``targets``
    (``classes``: how many classes the head scores)."""
    LogisticRegression = require("sklearn.linear_model", "torch", "Savchenko heads").LogisticRegression
    LinearSVC = require("sklearn.svm", "torch", "Savchenko heads").LinearSVC
    if settings.classifier not in CLASSIFIERS:
        raise ConversionError(f"unknown classifier {settings.classifier!r}; choose one of {', '.join(CLASSIFIERS)}")
    x = l2_normalised(features)
    y = np.asarray(targets)
    present = np.unique(y)
    if len(present) < 2:
        raise ConversionError("Savchenko heads need images of at least two classes")
    if settings.classifier == "svm":
        clf = LinearSVC(loss="squared_hinge", C=settings.C, max_iter=settings.max_iter, random_state=settings.seed)
    else:
        clf = LogisticRegression(C=settings.C, max_iter=settings.max_iter)
    clf.fit(x, y)
    coef, intercept = np.asarray(clf.coef_, dtype=np.float64), np.asarray(clf.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary problem: one decision value d for class 1; use (-d/2, d/2)
        coef = np.concatenate([-coef, coef]) / 2
        intercept = np.concatenate([-intercept, intercept]) / 2
    weight = np.zeros((classes, x.shape[1]))
    bias = np.full(classes, -1e3 if settings.classifier == "svm" else -30.0)  # classes never seen never win
    weight[clf.classes_] = coef
    bias[clf.classes_] = intercept
    return LinearHead(weight, bias, normalise=True)


@renamed_keywords(labels="targets")
def max_wrong_class(decisions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per image, the highest decision value of a class other than its own (its integer target)."""
    d = np.array(decisions, dtype=np.float64, copy=True)
    d[np.arange(len(d)), np.asarray(targets)] = -np.inf
    return d.max(axis=1)


@dataclass
class SavchenkoResult:
    """Heads refitted on all images, thresholds per alpha, and what the estimation saw (``held_out_labels``
    is the deprecated name of ``held_out_targets``)."""

    heads: list[LinearHead]
    thresholds: dict[float, np.ndarray]
    held_out_decisions: list[np.ndarray]   # decision values of the delta-heads on the N - K images
    held_out_targets: np.ndarray
    record: dict

    held_out_labels = renamed_attribute("held_out_labels", "held_out_targets")


@renamed_keywords(labels="targets")
def savchenko_heads(stage_features: Sequence[np.ndarray], targets: np.ndarray, classes: int,
                    settings: SavchenkoSettings = SavchenkoSettings()) -> SavchenkoResult:
    """Steps 1-3 of the method on pooled features (one N x D_m matrix per stage, same images) and the images'
    integer ``targets``."""
    labels = np.asarray(targets, dtype=np.int64)
    if not 0 < settings.delta < 1:
        raise ConversionError(f"delta (share of images training the heads) must lie in (0, 1), got {settings.delta}")
    train, rest = stratified_indices(labels, [settings.delta, 1 - settings.delta], seed=settings.seed)
    if len(rest) == 0 or len(train) == 0:
        raise ConversionError(f"{len(labels)} images are too few to split with delta={settings.delta}")
    first = [fit_linear_head(f[train], labels[train], classes, settings) for f in stage_features]
    held = [h.decision(f[rest]) for h, f in zip(first, stage_features)]
    wrong = np.stack([max_wrong_class(d, labels[rest]) for d in held[:-1]]) if len(held) > 1 else np.zeros((0, len(rest)))
    thresholds = {float(a): bh_thresholds(wrong, a) for a in settings.alphas}
    heads = [fit_linear_head(f, labels, classes, settings) for f in stage_features]
    record = {"method": "savchenko", "classifier": "linear_svm_squared_hinge" if settings.classifier == "svm"
              else "logistic_regression", "C": settings.C, "features": "global average pooling + L2 normalisation",
              "delta": settings.delta, "images": int(len(labels)), "head_images_K": int(len(train)),
              "threshold_images": int(len(rest)), "seed": settings.seed,
              "rule": "threshold_m = floor(alpha*m*(N-K)/M)-th largest maximal wrong-class decision value",
              "retrained_on_all": True,
              "held_out_accuracy": [float((d.argmax(1) == labels[rest]).mean()) for d in held]}
    return SavchenkoResult(heads, thresholds, held, labels[rest], record)


def backbone_features(model: Any, cuts: Sequence[str], preprocess: Any, size: tuple[int, int], images: Any,
                      batch: int = 32, store: Any = None) -> list[np.ndarray]:
    """Global-average-pooled features (N x C_m) of ``images`` after each cut of the frozen ``model``
    (from ``store``, a :class:`~.features.FeatureStore`, when given: reused and cached)."""
    from .features import FeatureStore
    from .source import source_of

    source = source_of(model)
    model = source.prepare(model)
    store = store or FeatureStore(source, model, preprocess, size, batch=batch)
    found = store.features(list(cuts), images)
    return [found[cut] for cut in cuts]


def plans_from_heads(model: Any, cuts: Sequence[str], preprocess: Any, size: tuple[int, int],
                     heads: Sequence[LinearHead], record: dict) -> list:
    """Converter stage plans: the backbone cut after each of ``cuts``, each segment ending in its head
    (the network's own classifier after the last cut is dropped)."""
    from .plans import plans_with_heads
    from .source import source_of

    source = source_of(model)
    segments = source.split(source.prepare(model), list(cuts))[:-1]
    if len(heads) != len(segments):
        raise ConversionError(f"{len(heads)} heads for {len(segments)} cuts")
    head_record = dict(record, kind="savchenko_linear", trained_on="frozen backbone")
    head_record.pop("held_out_accuracy", None)
    return plans_with_heads(source, segments, list(cuts), size, list(heads), [head_record] * len(heads), "max_logit")


def savchenko_plans(model, cuts: Sequence[str], preprocess, size: tuple[int, int], images,
                    settings: SavchenkoSettings = SavchenkoSettings(), batch: int = 32):
    """Stage plans of ``model`` cut after each of ``cuts`` with Savchenko heads, and the result.

    ``cuts`` must end with the backbone's final feature layer (for EfficientNet-Lite
    ``_avg_pooling``): the network's own classifier after it is dropped and the last stage is a
    head like the others. ``images`` is a labelled :class:`~stagewise.datasets.ImageSet`: the
    user's N images. Returns ``(plans, SavchenkoResult)``; build the bundle with
    :func:`~stagewise.converters.build.build_bundle` and add the thresholds with :func:`add_alpha_points`.
    """
    features = backbone_features(model, cuts, preprocess, size, images, batch)
    result = savchenko_heads(features, images.targets, len(images.classes), settings)
    return plans_from_heads(model, cuts, preprocess, size, result.heads, result.record), result


def alpha_points(result: SavchenkoResult, stage_costs: np.ndarray, cost_unit: str = "ms") -> list[dict]:
    """Operating points ``alpha-<value>`` with the method's thresholds.

    Their ``expected`` values are estimated on the N - K held-out images with the heads the
    thresholds were estimated for (before retraining), which is all the method has.
    """
    from stagewise.calibration import ExitTable, threshold_point

    decisions = result.held_out_decisions
    scores = np.stack([d.max(axis=1) for d in decisions])
    answers = np.stack([d.argmax(axis=1) for d in decisions])
    correct = answers == result.held_out_targets[None, :]
    agree = answers == answers[-1][None, :]
    costs = np.asarray(stage_costs, dtype=np.float64)
    agree_table, label_table = ExitTable(scores, agree, costs), ExitTable(scores, correct, costs)
    points = []
    for alpha, thr in sorted(result.thresholds.items()):
        points.append(threshold_point(f"alpha-{alpha:g}", thr, {
            "kind": "false_acceptance_rate", "alpha": alpha, "method": "savchenko",
            "rule": result.record["rule"], "delta": result.record["delta"], "n": result.record["threshold_images"]},
            agree_table, label_table, cost_unit))
    return points


def add_alpha_points(manifest: Manifest, result: SavchenkoResult, default_alpha: float | None = None,
                     profile: str | None = None) -> Manifest:
    """A built bundle's ``manifest`` with the method's ``alpha-*`` operating points (costs from its latency profile)."""
    if profile is None:
        profiles = [set(s.cost.latency_ms or {}) for s in manifest.stages]
        common = set.intersection(*profiles) if profiles else set()
        profile = sorted(common)[0] if common else None
    if profile is None:
        raise ConversionError("the bundle has no latency profile; run `stagewise profile` first")
    costs = np.array([s.cost.latency(profile).p50 for s in manifest.stages])
    new = [OperatingPoint.from_dict(p) for p in alpha_points(result, costs)]
    names = {p.name for p in new}
    kept = [p for p in manifest.operating_points if p.name not in names]
    manifest = manifest.with_points(kept + new, f"alpha-{default_alpha:g}" if default_alpha is not None else None)
    record = {**thaw(manifest.calibration or {}), "savchenko": dict(result.record, cost=f"latency_ms:{profile}")}
    return replace(manifest, calibration=freeze(record))
