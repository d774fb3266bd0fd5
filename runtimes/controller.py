"""Average-budget mode (budgeted batch classification): keep the running mean cost at a target.

The controller moves between a bundle's operating points so that the mean latency per image
stays at (just under) ``budget_ms`` while accuracy is as high as that allows.

How it decides, before every request:

1. **Feed-forward model.** Each operating point ``p`` has a reach vector ``r_p`` (the share of
   images that run stage ``k``), from its calibrated exit rates; its predicted cost *on this
   device now* is ``r_p · m`` where ``m`` holds the live mean step time of every stage (from
   the executor's :class:`~stagewise.runtimes.latency.LatencyModel`). When another process
   slows the CPU down, ``m`` grows and every point's predicted cost with it, so the controller
   reacts within a few requests; when the device speeds up it moves back. The share of images
   leaving at the first stage is re-estimated live for every point from the first stage's
   scores (every request runs the first stage, so that estimate is unbiased), which protects
   against a shift of the input distribution.
2. **Best mixture.** The points form a cost/accuracy front; the controller takes its upper
   convex hull and, for the effective target ``T``, mixes the two hull neighbours around
   ``T`` in the proportion that hits it (deterministic dithering, so a request sequence is
   reproducible). Mixing two adjacent hull points is the most accurate way to spend ``T`` on
   average with the given points.
3. **Feedback.** ``T = budget * (1 - headroom) - bias - gain * error`` where ``bias`` is the
   running mean of (observed cost - predicted cost) — what the model misses (overheads,
   exit rates on live data) — and ``error`` the running mean of (observed cost - target
   budget): an integral-like correction that pulls the running mean back after an overshoot.
   Both are exponential moving averages over ``horizon`` requests. ``error`` does not wind up:
   it banks no credit while the controller is pinned at the most accurate point (the budget
   does not bind, e.g. on a fast device) and no debt while pinned at the cheapest one.

A synthetic point ``"<first stage>-only"`` (every image answers at the first stage) is added
when the bundle records the first stage's calibration accuracy, so the controller can go
below the cheapest named point when the device is very slow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from stagewise.checks import positive_number
from stagewise.errors import StagewiseError
from stagewise.manifest import Manifest

from .latency import LatencyModel


class ControllerError(StagewiseError):
    """The bundle's operating points cannot drive an average-budget controller."""


@dataclass(frozen=True)
class _Point:
    name: str
    thresholds: np.ndarray
    accuracy: float
    hazards: np.ndarray  # calibrated P(exit at k | reached k), k = 0..K-1 (last is 1)


@dataclass
class ControllerState:
    """What the controller believes and decides now (for reports, traces and tests)."""

    budget_ms: float
    target_ms: float
    mean_ms: float | None
    requests: int
    lower: str
    upper: str
    mix: float
    predicted_ms: dict[str, float] = field(default_factory=dict)
    hull: list[str] = field(default_factory=list)
    bias_ms: float = 0.0
    feasible: bool = True


def _hazards(exit_rates: Sequence[float], k: int) -> np.ndarray:
    rates = np.zeros(k)
    rates[:len(exit_rates)] = exit_rates
    reach = 1.0 - np.concatenate([[0.0], np.cumsum(rates)[:-1]])
    h = np.divide(rates, reach, out=np.ones(k), where=reach > 1e-12)
    h[-1] = 1.0
    return np.clip(h, 0.0, 1.0)


def points_from_manifest(manifest: Manifest) -> list[_Point]:
    """The operating points usable by the controller (those with calibrated accuracy and exit rates)."""
    k = len(manifest.stages)
    points = []
    for p in manifest.operating_points:
        expected = p.expected
        if expected is not None and expected.accuracy is not None and expected.exit_rates is not None:
            points.append(_Point(p.name, p.threshold_array, float(expected.accuracy),
                                 _hazards(list(expected.exit_rates), k)))
    stage_acc = (manifest.calibration or {}).get("stage_accuracy")
    if stage_acc and k > 1:
        first = np.full(k, np.inf)
        first[0] = -np.inf  # every image answers at the first stage
        name = f"{manifest.stages[0].name}-only"
        if all(p.name != name for p in points):
            points.append(_Point(name, first, float(stage_acc[0]), _hazards([1.0], k)))
    if not points:
        raise ControllerError(
            "the average-budget mode needs operating points with calibrated accuracy and exit rates "
            "(`expected` in the manifest); recalibrate the bundle with `stagewise calibrate`")
    return points


class MeanBudgetController:
    """Chooses the operating point of each request so the running mean cost tracks ``budget_ms``."""

    def __init__(self, points: Sequence[_Point], latency: LatencyModel, budget_ms: float, horizon: int = 100,
                 gain: float = 1.0, headroom: float = 0.02):
        budget_ms = positive_number("mean_budget_ms", budget_ms)
        self.points = list(points)
        self.latency = latency
        self.horizon = horizon
        self.gain = gain
        self.headroom = headroom
        self._alpha = 1.0 / horizon
        self._first = np.array([p.thresholds[0] for p in self.points])
        self._hz = np.stack([p.hazards for p in self.points])  # P x K
        self._acc = np.array([p.accuracy for p in self.points])
        self._exit0 = self._hz[:, 0].copy()  # live share leaving at the first stage, per point
        self._dither = 0.0
        self._bias = 0.0
        self._error = 0.0
        self._sum = 0.0
        self.requests = 0
        self.budget_ms = float(budget_ms)
        self._last: tuple[int, float] | None = None
        self._decision = (0, 0, 0.0, True)
        self._saturated = 0  # +1: pinned at the most accurate point, -1: at the cheapest

    @classmethod
    def from_manifest(cls, manifest: Manifest, latency: LatencyModel, budget_ms: float,
                      **options) -> "MeanBudgetController":
        return cls(points_from_manifest(manifest), latency, budget_ms, **options)

    def retarget(self, budget_ms: float) -> None:
        """A new mean budget; what was learned about the device and the data is kept."""
        self.budget_ms = positive_number("mean_budget_ms", budget_ms)
        self._error = 0.0

    # -- model ---------------------------------------------------------------------------------
    def predicted_costs(self) -> np.ndarray:
        """Predicted mean cost (ms) of every point on this device now."""
        k = self._hz.shape[1]
        steps = np.array([self.latency.mean(j) for j in range(k)])
        hz = self._hz.copy()
        hz[:, 0] = self._exit0
        reach = np.cumprod(np.concatenate([np.ones((len(hz), 1)), 1.0 - hz[:, :-1]], axis=1), axis=1)
        return reach @ steps

    def _hull(self, cost: np.ndarray) -> list[int]:
        """Indices of the upper convex hull of (cost, accuracy), by increasing cost."""
        order = sorted(range(len(cost)), key=lambda i: (cost[i], -self._acc[i]))
        hull: list[int] = []
        for i in order:
            if hull and self._acc[i] <= self._acc[hull[-1]] + 1e-12:
                continue  # costs more, no more accurate
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # b is under the chord a-i: drop it
                if (self._acc[b] - self._acc[a]) * (cost[i] - cost[a]) <= (self._acc[i] - self._acc[a]) * (cost[b] - cost[a]):
                    hull.pop()
                else:
                    break
            hull.append(i)
        return hull

    def target_ms(self) -> float:
        """The mean cost aimed at for the next requests (kept within half to one and a half budgets)."""
        target = self.budget_ms * (1.0 - self.headroom) - self._bias - self.gain * self._error
        return min(1.5 * self.budget_ms, max(0.5 * self.budget_ms, target))

    # -- control -------------------------------------------------------------------------------
    def choose(self) -> tuple[str, np.ndarray]:
        """The operating point (name, thresholds) for the next request."""
        cost = self.predicted_costs()
        hull = self._hull(cost)
        target = self.target_ms()
        feasible = True
        self._saturated = 0
        if target <= cost[hull[0]]:
            lo = hi = hull[0]
            mix = 0.0
            feasible = bool(target >= cost[hull[0]] - 1e-9)
            self._saturated = -1
        elif target >= cost[hull[-1]]:
            lo = hi = hull[-1]
            mix = 0.0
            self._saturated = 1
        else:
            j = next(j for j in range(1, len(hull)) if cost[hull[j]] >= target)
            lo, hi = hull[j - 1], hull[j]
            mix = (target - cost[lo]) / max(cost[hi] - cost[lo], 1e-12)
        self._dither += mix
        if self._dither >= 1.0:
            self._dither -= 1.0
            pick = hi
        else:
            pick = lo
        self._decision = (lo, hi, mix, feasible)
        self._last = (pick, float(cost[pick]))
        return self.points[pick].name, self.points[pick].thresholds

    @property
    def feasible(self) -> bool:
        """False when the last choice could not reach the target: even the cheapest point costs more."""
        return bool(self._decision[3])

    def update(self, cost_ms: float, first_score: float | None = None, steps_ms: float | None = None) -> None:
        """Feed back one request: its total cost, the first stage's exit score, the summed step times."""
        a = self._alpha
        self.requests += 1
        self._sum += cost_ms
        if self._last is not None:
            _, predicted = self._last
            self._bias += a * ((cost_ms - predicted) - self._bias)
        # anti-windup: no credit is banked while pinned at the most accurate point (the budget does
        # not bind), and no debt while pinned at the cheapest (nothing cheaper to move to)
        over = cost_ms - self.budget_ms
        if not ((self._saturated > 0 and over < 0) or (self._saturated < 0 and over > 0)):
            self._error += a * (over - self._error)
        if first_score is not None:
            self._exit0 += a * ((first_score >= self._first).astype(float) - self._exit0)
        self._last = None

    def observe(self, prediction) -> None:
        """Feed back a :class:`~stagewise.runtimes.Prediction` produced with :meth:`choose`'s thresholds."""
        first = prediction.trace[0].score if prediction.trace else None
        self.update(prediction.elapsed_ms, first)

    def state(self) -> ControllerState:
        cost = self.predicted_costs()
        lo, hi, mix, feasible = self._decision
        return ControllerState(
            budget_ms=self.budget_ms, target_ms=self.target_ms(),
            mean_ms=self._sum / self.requests if self.requests else None, requests=self.requests,
            lower=self.points[lo].name, upper=self.points[hi].name, mix=float(mix),
            predicted_ms={p.name: float(c) for p, c in zip(self.points, cost)},
            hull=[self.points[i].name for i in self._hull(cost)], bias_ms=self._bias, feasible=feasible)
