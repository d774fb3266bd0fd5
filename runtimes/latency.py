"""Per-stage latency prediction from live measurements on this device."""

from __future__ import annotations

from collections import deque

import numpy as np


class LatencyModel:
    """Predicts each stage's next latency as a high quantile of its recent measurements.

    Until a stage has ``min_samples`` measurements the prediction is the larger of the seed
    (the bundle's recorded profile, or a warm-up run) and anything measured so far, so a cold
    start errs on the side of skipping rather than overrunning.
    """

    def __init__(self, stages: int, window: int = 64, quantile: float = 0.9, min_samples: int = 5):
        self._recent = [deque(maxlen=window) for _ in range(stages)]
        self._seed: list[float | None] = [None] * stages
        self.quantile = quantile
        self.min_samples = min_samples

    def seed(self, stage: int, ms: float) -> None:
        """Prior latency of ``stage`` before any live measurement."""
        self._seed[stage] = ms

    def observe(self, stage: int, ms: float) -> None:
        self._recent[stage].append(ms)

    def predict(self, stage: int) -> float:
        """Predicted milliseconds for the next run of ``stage`` (0 when nothing is known)."""
        recent = self._recent[stage]
        if len(recent) >= self.min_samples:
            return float(np.quantile(np.fromiter(recent, float), self.quantile))
        known = list(recent) + ([self._seed[stage]] if self._seed[stage] is not None else [])
        return max(known) if known else 0.0
