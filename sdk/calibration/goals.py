"""What a calibration aims for and the operating-point records it writes into the manifest.

:class:`Goal` picks the default operating point, :class:`Settings` says how to calibrate, and
:func:`threshold_point` / :func:`thresholds_of` convert between threshold vectors and manifest
``operating_points`` entries (``None`` marks a stage that never exits early).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CalibrationError
from .table import ExitTable

DEFAULT_DROPS = (0.0, 0.005, 0.01, 0.02)
GOALS = ("full", "drop", "budget", "alpha", "risk")


@dataclass(frozen=True)
class Goal:
    """What the default operating point is chosen for.

    * ``drop``: cheapest with accuracy at least full - ``value`` (a fraction; without labels,
      agreement with the full model at least 1 - ``value``);
    * ``budget``: most accurate with mean cost at most ``value``;
    * ``alpha``: Savchenko's thresholds with false-acceptance rate ``value``
      (:func:`~stagewise.calibration.bh.bh_thresholds`);
    * ``risk``: the cheapest point whose ``risk`` (``disagreement`` or ``error_increase``) is at most
      ``value`` with probability at least 1 - ``delta`` (:mod:`stagewise.calibration.risk`);
    * ``full``: every stage always runs.
    """

    kind: str = "drop"
    value: float | None = 0.005
    delta: float | None = None
    risk: str = "disagreement"

    def __post_init__(self):
        if self.kind not in GOALS:
            raise CalibrationError(f"unknown goal {self.kind!r}; choose one of {', '.join(GOALS)}")
        if self.kind != "full" and self.value is None:
            raise CalibrationError(f"the {self.kind} goal needs a value")
        if self.kind == "risk" and self.delta is None:
            raise CalibrationError("the risk goal needs delta, the allowed probability that the bound fails (e.g. 0.1)")
        if self.kind == "alpha" and not 0 < self.value < 1:
            raise CalibrationError(f"alpha must lie in (0, 1), got {self.value}")
        if self.kind == "risk" and not (0 < self.value < 1 and 0 < self.delta < 1):
            raise CalibrationError("risk and delta must lie in (0, 1) (fractions: 0.02 is 2%)")
        if self.kind in ("drop", "budget") and not 0 <= self.value < float("inf"):
            raise CalibrationError(f"the {self.kind} goal needs a finite value of at least 0, got {self.value}")
        if self.delta is not None and self.kind != "risk":
            raise CalibrationError("delta goes with the risk goal")

    @classmethod
    def from_options(cls, target_drop: float | None = None, budget_ms: float | None = None,
                     alpha: float | None = None, risk: float | None = None, delta: float | None = None,
                     risk_kind: str = "disagreement") -> "Goal":
        """The one goal among the ``calibrate`` options (``target_drop`` in points of top-1); anything but exactly
        one raises :class:`CalibrationError`."""
        given = [(kind, value) for kind, value in (("drop", target_drop), ("budget", budget_ms), ("alpha", alpha),
                                                   ("risk", risk)) if value is not None]
        if len(given) != 1:
            raise CalibrationError("give exactly one goal: --target-drop, --budget-ms, --alpha, or --risk with --delta")
        kind, value = given[0]
        return cls(kind, value / 100 if kind == "drop" else value, delta, risk_kind)

    def point_name(self, cost_unit: str) -> str:
        """The name of the operating point this goal produces (e.g. ``drop-0.5pt``)."""
        if self.kind == "full":
            return "full"
        if self.kind == "drop":
            return f"drop-{100 * self.value:g}pt"
        if self.kind == "budget":
            return f"budget-{self.value:g}{cost_unit}"
        if self.kind == "alpha":
            return f"alpha-{self.value:g}"
        short = "disagree" if self.risk == "disagreement" else "error"
        return f"risk-{short}-{100 * self.value:g}pt-d{self.delta:g}"


@dataclass(frozen=True)
class Settings:
    """How to calibrate (beyond the goal).

    ``score`` switches the non-final stages to another exit score (``None`` keeps the bundle's);
    ``fit_temperature`` fits each stage's temperature by NLL first; ``tune_fraction`` of the
    images fit what must not see the threshold data (learned exit scores; with the risk goal
    also the temperatures and the candidate order); ``front_points`` named Pareto points
    ``pareto-1`` (cheapest) ... are added.
    """

    score: str | None = None
    fit_temperature: bool = True
    target_drops: tuple[float, ...] = DEFAULT_DROPS
    budgets: tuple[float, ...] = ()
    alphas: tuple[float, ...] = ()
    front_points: int = 6
    tune_fraction: float = 0.5
    seed: int = 0


def _expected(thr: np.ndarray, agree: ExitTable, labelled: ExitTable | None, cost_unit: str) -> dict:
    out = agree.evaluate(thr)
    e = {"agreement": out.accuracy, "mean_cost": out.mean_cost, "cost_unit": cost_unit,
         "exit_rates": list(out.exit_rates), "n": agree.n}
    if labelled is not None:
        e["accuracy"] = labelled.evaluate(thr).accuracy
    return e


def threshold_point(name: str, thr: np.ndarray, goal: dict, agree: ExitTable, labelled: ExitTable | None,
                    cost_unit: str) -> dict:
    """A manifest operating point with expected agreement (and accuracy, given a labelled table) and cost."""
    k = len(thr)
    return {"name": name,
            "thresholds": [None if (i == k - 1 or not np.isfinite(t)) else float(t) for i, t in enumerate(thr)],
            "goal": goal, "expected": _expected(thr, agree, labelled, cost_unit)}


def thresholds_of(point: dict) -> np.ndarray:
    """A manifest operating point's thresholds as floats (``inf`` for never-exit entries)."""
    return np.array([np.inf if t is None else t for t in point["thresholds"]], dtype=np.float64)
