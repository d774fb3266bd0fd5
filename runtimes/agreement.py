"""Agreement sampling: the live accuracy loss of early exits, estimated without labels.

A fraction of answered requests, drawn at random independently of their answer, is kept with
its image (:meth:`AgreementSampler.offer`, cheap: one random number) and later run through every
stage (:meth:`AgreementSampler.drain`, with the public :meth:`Cascade.run_all_stages`, when the
caller has time: after answering). A sampled request answered by the last stage needs no second
run: its answer *is* the full model's. Each sample records whether the early answer agrees with
the full model's and the full model's (temperature-calibrated) probabilities of both answers.

:func:`estimate` turns the samples into

* the *disagreement* rate, with an exact (Clopper-Pearson) interval: an upper bound of the
  accuracy loss (a loss needs the full model right and the early answer different), and what a
  label-free calibration promised;
* the *loss*: the mean over samples of ``p_full(full answer) - p_full(early answer)`` (0 where
  they agree), with a normal 95 % interval. Where the full model's probabilities are calibrated
  this is an unbiased estimate of ``accuracy(full) - accuracy(answered)``; under a shift that makes
  the full model over-confident it leans towards the disagreement rate.
"""

from __future__ import annotations

import math
import random
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from stagewise.calibration.risk import upper_bound

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Sample:
    """One request run through every stage: its operating point, exit stage and answer, the full model's answer,
    the full model's probability of each answer, the full run's trace (every stage's score and answer) and
    the answered request's own trace."""

    point: str | None
    stage: int
    label: int
    full_label: int
    p_full_of_label: float
    p_full_of_full: float
    trace: tuple = ()
    answered: tuple = ()

    @property
    def agrees(self) -> bool:
        return self.label == self.full_label

    @property
    def loss(self) -> float:
        """The full model's estimate of how much less likely the early answer is to be right (0 when they agree)."""
        return 0.0 if self.agrees else self.p_full_of_full - self.p_full_of_label


def sample_of(prediction: Any, full: Any | None) -> Sample:
    """The :class:`Sample` of ``prediction`` given the full model's ``full`` prediction (``None``: the prediction
    came from the last stage and is the full model's answer)."""
    full = full or prediction
    probs = full.probabilities
    return Sample(prediction.operating_point, int(prediction.stage_index), int(prediction.label), int(full.label),
                  float(probs[prediction.label]), float(probs[full.label]), tuple(full.trace), tuple(prediction.trace))


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact interval of a binomial rate."""
    if n == 0:
        return 0.0, 1.0
    tail = (1.0 - level) / 2
    high = upper_bound(successes, n, tail)
    low = 1.0 - upper_bound(n - successes, n, tail)
    return max(0.0, low), min(1.0, high)


@dataclass(frozen=True)
class Estimate:
    """What the agreement samples of one operating point say (rates are fractions)."""

    n: int
    disagreements: int
    disagreement: float
    disagreement_interval: tuple[float, float]
    loss: float
    loss_interval: tuple[float, float]

    def to_dict(self) -> dict:
        return {"n": self.n, "disagreements": self.disagreements, "disagreement": self.disagreement,
                "disagreement_interval": list(self.disagreement_interval), "loss": self.loss,
                "loss_interval": list(self.loss_interval)}


def estimate(samples: list[Sample]) -> Estimate | None:
    """The disagreement rate and loss estimate of ``samples`` with 95 % intervals (``None`` without samples)."""
    n = len(samples)
    if not n:
        return None
    d = sum(not s.agrees for s in samples)
    losses = np.array([s.loss for s in samples])
    mean = float(losses.mean())
    half = Z95 * float(losses.std(ddof=1)) / math.sqrt(n) if n > 1 else 1.0
    return Estimate(n, d, d / n, clopper_pearson(d, n), mean, (mean - half, mean + half))


class AgreementSampler:
    """Keeps a random ``fraction`` of answered requests (at most ``capacity`` waiting) to run through every stage.

    ``on_sample(sample)`` is called for every finished sample. Thread-safe: :meth:`offer` from
    any thread, :meth:`drain` from the thread that may use the cascade.
    """

    def __init__(self, fraction: float, on_sample: Callable[[Sample], None], capacity: int = 64, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the agreement fraction must lie in [0, 1], got {fraction}")
        self.fraction = float(fraction)
        self._on_sample = on_sample
        self._random = random.Random(seed).random
        self._pending: deque[tuple[Any, Any]] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.dropped = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        """Kept requests waiting for :meth:`drain`."""
        return len(self._pending)

    def offer(self, image: Any, prediction: Any, last_stage: int) -> bool:
        """Keep ``image`` with probability ``fraction``; whether it was kept. A kept request answered by the
        last stage (``last_stage``) and not cut short by a budget is recorded at once."""
        if not self.fraction or self._random() >= self.fraction:
            return False
        if prediction.stage_index == last_stage and not prediction.budget_limited:
            self._on_sample(sample_of(prediction, None))
            return True
        with self._lock:
            if len(self._pending) == self._pending.maxlen:
                self.dropped += 1  # the oldest goes: which one is dropped does not depend on the answers
            self._pending.append((image, prediction))
        return True

    def drain(self, cascade: Any, limit: int | None = None) -> int:
        """Run up to ``limit`` (default: all) kept requests through every stage of ``cascade``; how many ran."""
        done = 0
        while limit is None or done < limit:
            with self._lock:
                if not self._pending:
                    break
                image, prediction = self._pending.popleft()
            try:
                full = cascade.run_all_stages(image)
            except Exception:  # noqa: BLE001 - a failed check must not break serving; it is counted
                self.failed += 1
                continue
            self._on_sample(sample_of(prediction, full))
            done += 1
        return done

    def clear(self) -> None:
        """Forget the kept requests (their cascade is gone)."""
        with self._lock:
            self._pending.clear()
