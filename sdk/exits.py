"""Exit scores: how confident a stage is, from its logits (higher means surer).

Every score is computed on a batch of logits (N x C) after dividing by the stage's
temperature. A stage may also decide on the mean of its own and all earlier stages'
probabilities (``combine="mean_probs"``, :func:`deciding_probabilities`), so earlier work is not wasted.

What a score is lives in one table, :data:`SCORES` (name to :class:`ExitScore`): how it is
computed, whether it is a probability (thresholds in [0, 1]), whether it is the maximum over
classes of a per-class value (Savchenko's false-acceptance rule applies exactly), and whether it
needs a fitted per-stage model. The manifest schema, the bundle checks, the calibration suite and
the CLI's ``--score`` choices read it; :func:`register_exit_score` adds one. Built in:

* ``max_softmax``, ``margin``, ``entropy``: from the deciding probabilities;
* ``max_logit``: the top raw logit; with a linear head whose outputs are decision values (a
  linear SVM, Savchenko's heads) this is the head's top decision value;
* ``learned``: a tiny per-stage model (:class:`LearnedExitScore`, logistic regression on
  :data:`LEARNED_FEATURES`) that predicts whether this stage's answer is already right, from
  its own probabilities and those of the earlier stages. Its weights are plain arrays in an
  ``.npz`` file of the bundle (read with ``allow_pickle=False``), so the runtime stays numpy-only.

Runtimes call :func:`exit_scores`, which covers every kind; :func:`confidence` covers the kinds
that need nothing but the stage's own probabilities and logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from .errors import InvalidOptionError, registered
from .manifest import ExitRule


class ScoreContext(NamedTuple):
    """What a score may read besides the deciding probabilities and the logits: the stage's ``temperature``,
    the running sum ``total`` of every stage's own probabilities so far (``None``: only this stage ran), the
    stage's position ``k`` among the stages that ran, its fitted ``model`` and its own softmax ``own`` (when the
    caller has it already)."""

    temperature: float = 1.0
    total: np.ndarray | None = None
    k: int = 0
    model: Any = None
    own: np.ndarray | None = None


ScoreFunction = Callable[[np.ndarray, "np.ndarray | None", ScoreContext], np.ndarray]
"""``compute(probs, logits, context)``: the per-row scores (N) of a batch."""


@dataclass(frozen=True)
class ExitScore:
    """One exit score: its ``name`` (the manifest's ``exit.score``) and how to ``compute`` it, plus what the rest
    of stagewise must know about it:

    * ``probability``: the score lies in [0, 1] (a bundle's thresholds for it are checked against that range);
    * ``per_class``: ``"probs"`` or ``"logits"`` when the score is the maximum over classes of that array (then
      the false-acceptance thresholds use the maximal wrong-class value, Savchenko's rule), else ``None``;
    * ``model``: the class of the per-stage model the score needs (``fit(features, right)``, ``load(path)``,
      ``save(path)`` on the :data:`LEARNED_FEATURES`), or ``None``; a stage with such a score names its model
      file in the manifest (``exit.model``) and the last stage, which never exits, does without one;
    * ``reads_earlier``: the score reads the earlier stages' probabilities (the executor keeps their running sum).
    """

    name: str
    compute: ScoreFunction
    description: str = ""
    probability: bool = False
    per_class: str | None = None
    model: Any = None
    reads_earlier: bool = False


SCORES: dict[str, ExitScore] = {}
"""The registered exit scores by name (:func:`register_exit_score` adds one)."""


def register_exit_score(score: ExitScore) -> ExitScore:
    """Add ``score`` (or replace the score of the same name); returns it."""
    if score.per_class not in (None, "probs", "logits"):
        raise InvalidOptionError(f"exit score {score.name!r}: per_class is 'probs', 'logits' or None, "
                                 f"got {score.per_class!r}")
    SCORES[score.name] = score
    return score


def score_named(name: str) -> ExitScore:
    """The registered exit score ``name``; an unknown name is an :class:`InvalidOptionError` that lists them."""
    return registered(SCORES, "exit score", name)


GRAPH_SCORES = ("max_softmax", "max_logit", "margin", "entropy")
"""Scores a stage's own graph can compute from its logits (at a temperature fed as an input; the ONNX exporter's
and the OpenVINO adapter's decision nodes): with ``combine="own"``, a stage whose artifact carries them hands the
executor its exit score and answer."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.array(logits, dtype=np.float64)
    if temperature != 1.0:
        z /= temperature
    if len(z) == 1:  # one image (the executor's hot path): whole-array reductions are cheaper
        z -= z.max()
        np.exp(z, out=z)
        z /= z.sum()
        return z
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def confidence(kind: str, probs: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
    """Per-row confidence of ``kind`` from probabilities (and raw logits for ``max_logit``), for a score
    that needs no model (see :data:`SCORES`)."""
    score = score_named(kind)
    if score.model is not None:
        raise InvalidOptionError(f"the {kind} exit score needs its model and the earlier stages' probabilities; "
                                 "use exit_scores(..., model=...)")
    return score.compute(probs, logits, _ALONE)


_ALONE = ScoreContext()


def _max_softmax(probs: np.ndarray, logits: np.ndarray | None, context: ScoreContext) -> np.ndarray:
    return probs.max(axis=1)


def _max_logit(probs: np.ndarray, logits: np.ndarray | None, context: ScoreContext) -> np.ndarray:
    if logits is None:
        raise InvalidOptionError("max_logit needs the logits")
    return np.asarray(logits, dtype=np.float64).max(axis=1)


def _margin(probs: np.ndarray, logits: np.ndarray | None, context: ScoreContext) -> np.ndarray:
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _entropy(probs: np.ndarray, logits: np.ndarray | None, context: ScoreContext) -> np.ndarray:
    p = np.clip(probs, 1e-12, 1.0)
    return 1.0 + (p * np.log(p)).sum(axis=1) / np.log(probs.shape[1])


COMBINES = ("own", "mean_probs")
"""How a stage decides: on its ``own`` probabilities, or on the mean of its own and every earlier stage's
(``mean_probs``)."""


def deciding_probabilities(own: np.ndarray, summed: np.ndarray, count: int, combine: str) -> np.ndarray:
    """The probabilities a stage decides on: its ``own``, or for ``mean_probs`` the mean of ``summed`` (the sum of
    the own probabilities of the ``count`` stages that ran, this one included)."""
    return summed / count if combine == "mean_probs" else own


def stage_probabilities(stage_logits: list[np.ndarray], temperatures: list[float],
                        combine: list[str]) -> list[np.ndarray]:
    """Each stage's deciding probabilities: its own softmax, or the running mean over stages."""
    out: list[np.ndarray] = []
    total = None
    for k, (logits, t) in enumerate(zip(stage_logits, temperatures)):
        probs = softmax(logits, t)
        total = probs if total is None else total + probs
        out.append(deciding_probabilities(probs, total, k + 1, combine[k]))
    return out


LEARNED_FEATURES = ("log_max_prob", "log_ratio_top2", "entropy_score", "top_logit", "log_earlier_support",
                    "agrees_with_earlier", "log_earlier_max", "log_mean_max")
"""Inputs of the learned exit score, per sample, for stage k (0-based):

own probabilities ``p`` (softmax of the stage's logits at its temperature), the mean ``e`` of
the earlier stages' own probabilities (``e = p`` at stage 0) and the running mean
``q = (k e + p) / (k + 1)``: log p_top, log(p_top / p_second), 1 - H(p)/log C, the top raw
logit, log e[argmax p] (do the earlier stages back this answer?), [argmax p == argmax e],
log e_top, log q_top."""

_EPS = 1e-12


def exit_features(logits: np.ndarray, own: np.ndarray, earlier: np.ndarray | None, k: int = 0) -> np.ndarray:
    """The :data:`LEARNED_FEATURES` matrix (N x F) of one stage."""
    own = np.asarray(own, dtype=np.float64)
    earlier = own if earlier is None else np.asarray(earlier, dtype=np.float64)
    n = len(own)
    rows = np.arange(n)
    top2 = np.partition(own, -2, axis=1)[:, -2:] if own.shape[1] > 1 else np.concatenate([np.zeros((n, 1)), own], 1)
    pred = own.argmax(axis=1)
    q = (k * earlier + own) / (k + 1)
    return np.stack([
        np.log(top2[:, 1] + _EPS),
        np.log(top2[:, 1] + _EPS) - np.log(top2[:, 0] + _EPS),
        _entropy(own, None, _ALONE),
        np.asarray(logits, dtype=np.float64).max(axis=1),
        np.log(earlier[rows, pred] + _EPS),
        (earlier.argmax(axis=1) == pred).astype(np.float64),
        np.log(earlier.max(axis=1) + _EPS),
        np.log(q.max(axis=1) + _EPS),
    ], axis=1)


@dataclass(frozen=True)
class LearnedExitScore:
    """``sigmoid(w . (f - mean) / scale + b)``: the estimated probability that a stage is right."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    features: tuple[str, ...] = LEARNED_FEATURES

    def __call__(self, features: np.ndarray) -> np.ndarray:
        z = ((np.asarray(features, dtype=np.float64) - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    @classmethod
    def fit(cls, features: np.ndarray, right: np.ndarray, l2: float = 1e-2, iterations: int = 50) -> "LearnedExitScore":
        """L2-regularised logistic regression by Newton's method (IRLS) on standardised features."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(right, dtype=np.float64)
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-9] = 1.0
        z = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
        w = np.zeros(z.shape[1])
        w[-1] = np.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3))
        reg = np.full(z.shape[1], l2 * len(x) / max(len(x), 1))
        reg[-1] = 0.0
        for _ in range(iterations):
            p = 1 / (1 + np.exp(-np.clip(z @ w, -60, 60)))
            grad = z.T @ (p - y) / len(x) + reg * w
            hess = (z * (p * (1 - p))[:, None]).T @ z / len(x) + np.diag(reg + 1e-9)
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        return cls(mean=mean, scale=scale, weights=w[:-1], bias=float(w[-1]))

    def save(self, path) -> None:
        """Write the model as plain arrays (no pickles) to a path or a binary file object."""
        np.savez(path, kind=np.array("logistic"), features=np.array(self.features), mean=self.mean,
                 scale=self.scale, weights=self.weights, bias=np.array(self.bias))

    @classmethod
    def load(cls, path: str | Path) -> "LearnedExitScore":
        """Read a model written by :meth:`save` (``allow_pickle=False``); checks the feature list."""
        with np.load(path, allow_pickle=False) as z:
            if str(z["kind"]) != "logistic":
                raise ValueError(f"{path}: unsupported learned exit score kind {str(z['kind'])!r}")
            features = tuple(str(f) for f in z["features"])
            if features != LEARNED_FEATURES:
                raise ValueError(f"{path}: learned exit score uses features {features}, this stagewise computes "
                                 f"{LEARNED_FEATURES}; recalibrate the bundle with this version")
            return cls(mean=z["mean"].astype(np.float64), scale=z["scale"].astype(np.float64),
                       weights=z["weights"].astype(np.float64), bias=float(z["bias"]), features=features)


def load_exit_model(root: str | Path | None, exit_rule: ExitRule | Mapping[str, Any]) -> Any:
    """The model a stage's exit rule (or its manifest record) names, for a score that needs one
    (a :class:`LearnedExitScore` for ``learned``; ``None`` for other scores)."""
    rule = exit_rule if isinstance(exit_rule, ExitRule) else ExitRule.from_dict(exit_rule)
    model = score_named(rule.score).model
    if model is None:
        return None
    if root is None or rule.model is None:
        raise InvalidOptionError(f"a stage with the {rule.score} exit score must name its model file (exit.model)")
    return model.load(Path(root) / rule.model.path)


def earlier_mean(own: np.ndarray, total: np.ndarray | None, k: int) -> np.ndarray | None:
    """Mean of the earlier stages' own probabilities from the running sum ``total`` (which includes ``own``)."""
    if total is None or k == 0:
        return None
    return (np.asarray(total, dtype=np.float64) - own) / k


def exit_scores(kind: str, probs: np.ndarray, logits: np.ndarray, temperature: float = 1.0,
                total: np.ndarray | None = None, k: int = 0, model: Any = None,
                own: np.ndarray | None = None) -> np.ndarray:
    """Exit scores of any kind, as the executor computes them after stage ``k``.

    ``probs`` are the deciding probabilities, ``logits`` the raw logits, ``total`` the running
    sum of every stage's own probabilities up to and including this one (``None`` when only this
    stage ran) and ``model`` the stage's model for a score that needs one (``learned``: a
    :class:`LearnedExitScore`); ``own`` is the stage's own softmax when the caller has it already
    (it is not computed twice).
    """
    score = score_named(kind)
    if score.model is not None and model is None:
        raise InvalidOptionError(f"the {kind} exit score needs the stage's model")
    return score.compute(probs, logits, ScoreContext(temperature, total, k, model, own))


def _learned(probs: np.ndarray, logits: np.ndarray | None, context: ScoreContext) -> np.ndarray:
    own = softmax(logits, context.temperature) if context.own is None else context.own
    k = context.k if context.total is not None else 0
    return context.model(exit_features(logits, own, earlier_mean(own, context.total, context.k), k))


def all_stage_scores(kinds: list[str], stage_logits: list[np.ndarray], temperatures: list[float], combine: list[str],
                     models: list[LearnedExitScore | None] | None = None) -> np.ndarray:
    """Every stage's exit scores (K x N) exactly as the executor computes them."""
    models = models or [None] * len(stage_logits)
    probs = stage_probabilities(stage_logits, temperatures, combine)
    total = None
    out = []
    for k, (kind, lg, t, p, m) in enumerate(zip(kinds, stage_logits, temperatures, probs, models)):
        own = softmax(lg, t)
        total = own if total is None else total + own
        out.append(exit_scores(kind, p, lg, t, total, k, m))
    return np.stack(out)


def stage_features(stage_logits: list[np.ndarray], temperatures: list[float]) -> list[np.ndarray]:
    """The learned-score feature matrix of every stage (as :func:`exit_scores` builds it)."""
    total = None
    out = []
    for k, (lg, t) in enumerate(zip(stage_logits, temperatures)):
        own = softmax(lg, t)
        total = own if total is None else total + own
        out.append(exit_features(lg, own, earlier_mean(own, total, k), k))
    return out


def wrong_class_scores(kind: str, probs: np.ndarray, logits: np.ndarray, targets: np.ndarray,
                       scores: np.ndarray | None = None) -> np.ndarray:
    """Per sample, the highest score the stage could exit with on a wrong answer.

    For per-class scores (``max_softmax``, ``max_logit``: Savchenko's rule) this is the maximal
    score over the classes other than the target; a stage exits wrongly only if it reaches the
    threshold. For other scores it is the sample's exit score when the stage's answer is wrong
    and ``-inf`` when it is right (``scores`` gives those exit scores, else they are computed).
    """
    t = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(t))
    per_class = score_named(kind).per_class
    if per_class is not None:
        values = np.array(probs if per_class == "probs" else logits, dtype=np.float64, copy=True)
        values[rows, t] = -np.inf
        return values.max(axis=1)
    s = confidence(kind, probs, logits) if scores is None else np.asarray(scores, dtype=np.float64)
    return np.where(np.asarray(probs).argmax(axis=1) == t, -np.inf, s)


register_exit_score(ExitScore("max_softmax", _max_softmax, "the top probability", probability=True, per_class="probs"))
register_exit_score(ExitScore("margin", _margin, "top-1 minus top-2 probability", probability=True))
register_exit_score(ExitScore("entropy", _entropy, "1 - H(p) / log(C): 1 for a one-hot, 0 for uniform",
                              probability=True))
register_exit_score(ExitScore("max_logit", _max_logit, "the top raw logit (a linear head's decision value)",
                              per_class="logits"))
register_exit_score(ExitScore("learned", _learned, "a per-stage logistic model of 'this stage is already right'",
                              probability=True, model=LearnedExitScore, reads_earlier=True))
