"""The INT8 gate: whether a quantized stage is good enough to ship, judged on held-back images.

Two rules (:class:`Gate`):

* **accuracy** (the default): the stage's top-1 *accuracy* may fall by at most ``max_drop`` (a
  fraction: 0.005 = half a point) from the float stage's. With labels, accuracy is measured
  against them; without labels, each image counts the float stage's own probability of the class
  the candidate answers (its expected correctness under the float model), so an image on a decision
  boundary that flips between two near-equal classes costs nearly nothing, while a confident answer
  that flips costs its full confidence. The difference is paired (the same images through both
  models) and judged with a 95 % interval — for labels, the Agresti-Min interval of a difference
  of paired proportions (:func:`paired_proportions_interval`, McNemar's table); without labels, a
  paired bootstrap (:func:`bootstrap_interval`): the interval above ``-max_drop`` passes, wholly
  below it fails, and an interval straddling it means the held-back images are too few to tell;
  the point estimate then decides and the verdict says so.
* **agreement** (``--int8-tolerance``, the rule of earlier releases): top-1 agreement with the float
  model, compared with the lower end of its 95 % Wilson interval. On a 1,000-class model 2-3 % of
  images sit on a decision boundary and flip without changing accuracy, and a 99 % tolerance needs
  about 380 agreeing images in a row, so this rule rejects good INT8.

Top-1 agreement is recorded under both rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

CONFIDENCE = 0.95
"""Confidence of the intervals (Wilson for agreement, Agresti-Min or a paired bootstrap for the accuracy difference)."""
BOOTSTRAP_RESAMPLES = 2000
"""Resamples of the paired bootstrap (seeded: the same images always give the same interval)."""
DEFAULT_MAX_DROP = 0.005
"""The accuracy gate's default: half a point of top-1."""


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement of a quantized model with its float reference on ``n`` images, with its Wilson interval."""

    agreeing: int
    n: int

    @property
    def rate(self) -> float:
        return self.agreeing / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """The two-sided :data:`CONFIDENCE` Wilson score interval of the agreement rate."""
        from scipy.stats import binomtest

        if not self.n:
            return 0.0, 1.0
        ci = binomtest(self.agreeing, self.n).proportion_ci(CONFIDENCE, method="wilson")
        return float(ci.low), float(ci.high)

    def meets(self, tolerance: float) -> bool:
        """Whether the interval's lower end reaches ``tolerance``."""
        return self.interval[0] >= tolerance

    def record(self) -> dict:
        low, high = self.interval
        return {"agreement_with_fp32": self.rate, "agreement_images": self.n, "agreement_interval": [low, high],
                "interval": f"Wilson {100 * CONFIDENCE:g}%"}


def minimum_agreeing(n: int, tolerance: float) -> int:
    """The fewest agreeing images out of ``n`` whose Wilson interval's lower end reaches ``tolerance`` (n + 1: none)."""
    for k in range(int(np.floor(tolerance * n)), n + 1):
        if Agreement(k, n).meets(tolerance):
            return k
    return n + 1


def paired_proportions_interval(lost: int, gained: int, n: int) -> tuple[float, float]:
    """The :data:`CONFIDENCE` interval of the difference of two paired proportions (here: top-1 of the quantized
    minus the float model on the same ``n`` images, of which ``lost`` are right in float only and ``gained`` right
    in INT8 only): the Wald interval with half an image added to each cell of the paired table (Agresti and Min,
    2005), which keeps its coverage when few images change, unlike the plain McNemar/Wald interval or a bootstrap
    (both collapse to a point when none does)."""
    from scipy.stats import norm

    if n <= 0:
        return -1.0, 1.0
    b, c, m = lost + 0.5, gained + 0.5, n + 2.0
    diff = (c - b) / m
    half = norm.ppf(0.5 + CONFIDENCE / 2) * np.sqrt(max((b + c) - (c - b) ** 2 / m, 0.0)) / m
    return float(max(diff - half, -1.0)), float(min(diff + half, 1.0))


def bootstrap_interval(differences: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """The :data:`CONFIDENCE` percentile bootstrap interval of the mean of per-image paired ``differences``
    (scipy's bootstrap, :data:`BOOTSTRAP_RESAMPLES` resamples, seeded). When no image differs, the bootstrap has
    nothing to resample: the interval is then ± the Wilson upper bound of 0 changed images out of ``n``."""
    from scipy.stats import bootstrap

    differences = np.asarray(differences, dtype=np.float64)
    if not len(differences):
        return -1.0, 1.0
    if np.ptp(differences) == 0:
        bound = Agreement(len(differences), len(differences)).interval[0]
        return float(differences[0] - (1 - bound)), float(differences[0] + (1 - bound))
    ci = bootstrap((differences,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                   method="percentile", vectorized=True, random_state=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Verdict:
    """A candidate judged by a :class:`Gate`: ``passes``, ``merit`` (higher is better: the search keeps the best
    failing candidate by it), the one-line ``summary`` the converter prints and the ``record`` for the manifest."""

    passes: bool
    merit: float
    summary: str
    record: dict


@dataclass(frozen=True)
class Gate:
    """The rule an INT8 candidate must meet: ``max_drop`` of top-1 accuracy (a fraction), or, when ``tolerance`` is
    set, the agreement rule of earlier releases (see the module docstring)."""

    max_drop: float = DEFAULT_MAX_DROP
    tolerance: float | None = None

    @property
    def rule(self) -> str:
        return "agreement" if self.tolerance is not None else "accuracy"

    def describe(self) -> str:
        if self.tolerance is not None:
            return f"agreement with float >= {100 * self.tolerance:g}% (Wilson lower end)"
        return f"top-1 at most {100 * self.max_drop:g} pt below float (paired 95% interval)"

    def can_pass(self, n: int) -> bool:
        """Whether ``n`` held-back images can show the rule at all (the agreement rule needs about 380 for 99 %)."""
        return self.tolerance is None or minimum_agreeing(n, self.tolerance) <= n

    def per_image(self, reference: np.ndarray, targets: np.ndarray | None) -> Callable[[np.ndarray, np.ndarray],
                                                                                      np.ndarray]:
        """The per-image quantity whose mean the rule compares, as ``measure(logits, rows)`` for candidate
        ``logits`` of the held-back images ``rows`` (for accuracy control inside a quantizer such as NNCF's, which
        validates on subsets): correctness against ``targets``; without them the float probability of the
        answered class (accuracy rule) or agreement with the float answer (agreement rule). ``reference`` is the
        float logits of all held-back images."""
        answer = reference.argmax(1)
        if self.tolerance is not None:
            return lambda logits, rows: (logits.argmax(1) == answer[rows]).astype(np.float64)
        if targets is not None:
            truth = np.asarray(targets)
            return lambda logits, rows: (logits.argmax(1) == truth[rows]).astype(np.float64)
        probs = softmax(reference)
        return lambda logits, rows: probs[rows, logits.argmax(1)]

    def quantizer_max_drop(self, n: int) -> float:
        """The absolute drop of :meth:`per_image`'s mean a quantizer's accuracy control may allow on ``n`` images."""
        if self.tolerance is not None:
            return max(0.0, 1 - minimum_agreeing(n, self.tolerance) / n)
        return self.max_drop

    def judge(self, reference: np.ndarray, targets: np.ndarray | None, seed: int = 0) -> Callable[[np.ndarray], Verdict]:
        """A judge of candidate logits against the float ``reference`` logits on the same held-back images."""
        metric = self.per_image(reference, targets)
        answer = reference.argmax(1)
        rows = np.arange(len(reference))
        float_values = metric(reference, rows)
        labelled = targets is not None

        def judge(logits: np.ndarray) -> Verdict:
            agreement = Agreement(int((logits.argmax(1) == answer).sum()), len(answer))
            if self.tolerance is not None:
                low = agreement.interval[0]
                passes = low >= self.tolerance
                summary = (f"agreement {100 * agreement.rate:.1f}% of {agreement.n} images (95% Wilson from "
                           f"{100 * low:.1f}%), {'meets' if passes else 'below'} the {100 * self.tolerance:g}% tolerance")
                return Verdict(passes, agreement.rate, summary,
                               dict(agreement.record(), rule="agreement", tolerance=self.tolerance))
            values = metric(logits, rows)
            d = values - float_values
            diff = float(d.mean())
            if labelled:
                low, high = paired_proportions_interval(int((d < 0).sum()), int((d > 0).sum()), len(d))
            else:
                low, high = bootstrap_interval(d, seed)
            if low >= -self.max_drop:
                passes, decided = True, "interval"
            elif high < -self.max_drop:
                passes, decided = False, "interval"
            else:
                passes, decided = diff >= -self.max_drop, "point estimate"
            measure = "top-1" if labelled else "expected top-1 (float probabilities, no labels)"
            summary = (f"{measure} {100 * float_values.mean():.2f}% -> {100 * values.mean():.2f}% "
                       f"({100 * diff:+.2f} pt, 95% paired interval [{100 * low:+.2f}, {100 * high:+.2f}]) on "
                       f"{len(d)} held-back images, agreement {100 * agreement.rate:.1f}%; "
                       + (f"{'within' if passes else 'beyond'} the {100 * self.max_drop:g} pt --int8-max-drop"
                          if decided == "interval" else
                          f"{len(d)} images cannot tell whether the drop is within {100 * self.max_drop:g} pt: "
                          f"decided on the point estimate ({'kept' if passes else 'refused'})"))
            record = dict(agreement.record(), rule="accuracy", measure="labels" if labelled else "float_probabilities",
                          float_accuracy=float(float_values.mean()), int8_accuracy=float(values.mean()),
                          accuracy_difference=diff, difference_interval=[low, high],
                          difference_method=(f"Agresti-Min paired {100 * CONFIDENCE:g}%" if labelled else
                                             f"paired percentile bootstrap {100 * CONFIDENCE:g}%, "
                                             f"{BOOTSTRAP_RESAMPLES} resamples"),
                          max_drop=self.max_drop, decided_by=decided, images=len(d))
            return Verdict(passes, diff, summary, record)
        return judge
