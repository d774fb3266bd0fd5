"""Threshold calibration: exit rules and operating points on the accuracy / cost Pareto front.

One module per job, each importing only the ones listed before it:

* :mod:`~stagewise.calibration.temperature`: per-stage temperature scaling by NLL;
* :mod:`~stagewise.calibration.bh`: Savchenko's false-acceptance thresholds (Benjamini-Hochberg);
* :mod:`~stagewise.calibration.table`: :class:`ExitTable`, :class:`Outcome`, the Pareto front and
  the exact per-stage threshold searches;
* :mod:`~stagewise.calibration.goals`: :class:`Goal`, :class:`Settings` and the manifest's
  operating-point records;
* :mod:`~stagewise.calibration.risk`: binomial bounds, fixed-sequence testing and risk control;
* :mod:`~stagewise.calibration.suite`: :func:`calibrate_stages`, the whole suite from raw logits.

Everything is numpy only. Running a bundle's stages to get the logits is
:mod:`stagewise.runtimes.calibrate`.
"""

from __future__ import annotations

from .bh import bh_rank, bh_thresholds
from .goals import DEFAULT_DROPS, GOALS, Goal, Settings, threshold_point, thresholds_of
from .risk import RISKS, RiskResult, control
from .suite import Calibration, calibrate_stages, fit_temperatures
from .table import ExitTable, Outcome, pareto, spread
from .temperature import fit_temperature

__all__ = ["Calibration", "DEFAULT_DROPS", "ExitTable", "GOALS", "Goal", "Outcome", "RISKS", "RiskResult", "Settings",
           "bh_rank", "bh_thresholds", "calibrate_stages", "control", "fit_temperature", "fit_temperatures", "pareto",
           "spread", "threshold_point", "thresholds_of"]
