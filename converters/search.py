"""Cascade search on recorded logits: which models, in which order, with which thresholds.

Input: *candidates* — each a stage that could be part of a cascade (a model at an input size,
adapted or not) with its logits on the calibration images and its measured cost (ms per image
on the device). Output: the Pareto front of mean cost against accuracy over

* every ordered cascade of 1 to ``max_stages`` candidates, cheapest first (by measured cost),
  never two candidates of one ``group`` (the plain and the adapted version of one model at one
  size);
* both ways a stage decides (``own`` probabilities, or the ``mean_probs`` of it and every
  earlier stage; a first stage always decides on its own);
* every threshold set: for up to three stages the front is exhaustive
  (:meth:`~stagewise.calibration.ExitTable.exact_front`), beyond that the calibration engine's
  Lagrangian coordinate descent (:meth:`~stagewise.calibration.ExitTable.front`).

The exit rule is the one the built bundle runs: each candidate's temperature fitted by NLL on
the labels (as :func:`stagewise.calibration.calibrate_stages` fits it), the exit score (default
``max_softmax``) of the deciding probabilities, thresholds per stage. Nothing is re-run: the
search costs only arithmetic on the recorded logits. Numpy only.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from stagewise.calibration import ExitTable, Outcome, fit_temperature
from stagewise.errors import CalibrationError
from stagewise.exits import COMBINES

EXACT_STAGES = 3
"""Cascades of up to this many stages get the exhaustive threshold front."""


@dataclass(frozen=True)
class Candidate:
    """A possible stage: its ``logits`` (N x C) on the calibration images and its ``cost`` (ms per image).

    Candidates sharing a ``group`` never appear in one cascade.
    """

    name: str
    logits: np.ndarray
    cost: float
    group: str | None = None


@dataclass(frozen=True)
class CascadePoint:
    """One point of the searched front: the stages (candidate names, in order), how later stages
    decide, the thresholds (``inf``: never exits; the last stage always answers) and what they do
    on the calibration images."""

    stages: tuple[str, ...]
    combine: str
    thresholds: tuple[float, ...]
    accuracy: float
    mean_cost: float
    exit_rates: tuple[float, ...]

    def to_dict(self) -> dict:
        """The point as JSON (never-exit thresholds as ``None``)."""
        d = asdict(self)
        d["stages"], d["exit_rates"] = list(self.stages), list(self.exit_rates)
        d["thresholds"] = [None if not np.isfinite(t) else float(t) for t in self.thresholds]
        return d


@dataclass(frozen=True)
class SearchResult:
    """The front (cheapest first), each candidate's accuracy and temperature, and how many cascades were searched."""

    front: tuple[CascadePoint, ...]
    accuracy: dict[str, float]
    temperatures: dict[str, float]
    cascades: int

    def best_single(self) -> str:
        """The most accurate candidate alone."""
        return max(self.accuracy, key=lambda name: self.accuracy[name])


def sequences(candidates: Sequence[Candidate], max_stages: int) -> list[tuple[int, ...]]:
    """Indices of every ordered cascade of 1 to ``max_stages`` candidates, cheapest first, no group twice."""
    if max_stages < 1:
        raise CalibrationError(f"a cascade has at least one stage; got max_stages={max_stages}")
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].cost, candidates[i].name))
    out = []
    for k in range(1, max_stages + 1):
        for combo in itertools.combinations(order, k):
            groups = [candidates[i].group for i in combo if candidates[i].group is not None]
            if len(groups) == len(set(groups)):
                out.append(combo)
    return out


def sequence_table(logits: Sequence[np.ndarray], targets: np.ndarray, costs: Sequence[float],
                   temperatures: Sequence[float], combine: str, score: str = "max_softmax") -> ExitTable:
    """The exit table of one cascade (stage logits in order) with the given exit rule."""
    k = len(logits)
    return ExitTable.from_logits(list(logits), np.asarray(targets), np.asarray(costs, dtype=np.float64), [score] * k,
                                 list(temperatures), ["own"] + [combine] * (k - 1))


def table_front(table: ExitTable) -> list[Outcome]:
    """The table's threshold front: exhaustive up to :data:`EXACT_STAGES` stages, else coordinate descent."""
    return table.exact_front() if table.k <= EXACT_STAGES else table.front()


def search_cascades(candidates: Sequence[Candidate], targets: np.ndarray, max_stages: int = 3,
                    combines: Sequence[str] = COMBINES, score: str = "max_softmax",
                    fit_temperatures: bool = True) -> SearchResult:
    """The Pareto front of mean cost against accuracy over every cascade of ``candidates`` (see the module docstring).

    ``targets`` are the calibration images' integer labels; ``fit_temperatures=False`` keeps every
    temperature at 1.
    """
    if not candidates:
        raise CalibrationError("the cascade search needs at least one candidate stage")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise CalibrationError(f"candidate names must be unique; got {names}")
    unknown = sorted(set(combines) - set(COMBINES))
    if unknown or not combines:
        raise CalibrationError(f"combine modes are {', '.join(COMBINES)}; got {list(combines)}")
    targets = np.asarray(targets, dtype=np.int64)
    for c in candidates:
        if c.logits.shape[0] != len(targets):
            raise CalibrationError(f"candidate {c.name}: {c.logits.shape[0]} logit rows for {len(targets)} labels")
    temps = [fit_temperature(c.logits, targets=targets) if fit_temperatures else 1.0 for c in candidates]
    points: list[CascadePoint] = []
    found = sequences(candidates, max_stages)
    for seq in found:
        for combine in (combines[:1] if len(seq) == 1 else combines):
            table = sequence_table([candidates[i].logits for i in seq], targets, [candidates[i].cost for i in seq],
                                   [temps[i] for i in seq], combine, score)
            points.extend(CascadePoint(tuple(names[i] for i in seq), "own" if len(seq) == 1 else combine,
                                       o.thresholds, o.accuracy, o.mean_cost, o.exit_rates)
                          for o in table_front(table))
    accuracy = {c.name: float((c.logits.argmax(axis=1) == targets).mean()) for c in candidates}
    return SearchResult(front=tuple(pareto_points(points)), accuracy=accuracy,
                        temperatures=dict(zip(names, map(float, temps))),
                        cascades=sum(len(combines) if len(s) > 1 else 1 for s in found))


def pareto_points(points: Sequence[CascadePoint]) -> list[CascadePoint]:
    """The non-dominated points, cheapest first (fewer stages first among equals)."""
    front: list[CascadePoint] = []
    for p in sorted(points, key=lambda p: (p.mean_cost, -p.accuracy, len(p.stages))):
        if not front or p.accuracy > front[-1].accuracy + 1e-12:
            front.append(p)
    return front


def choose(front: Sequence[CascadePoint], min_accuracy: float) -> CascadePoint:
    """The cheapest point of ``front`` whose accuracy is at least ``min_accuracy``."""
    feasible = [p for p in front if p.accuracy >= min_accuracy - 1e-12]
    if not feasible:
        best = max(front, key=lambda p: p.accuracy)
        raise CalibrationError(f"no searched cascade reaches accuracy {min_accuracy:.4f} on the calibration images "
                               f"(the best reaches {best.accuracy:.4f}); allow a larger drop")
    return min(feasible, key=lambda p: (p.mean_cost, -p.accuracy))
