"""The drift monitor's reference: what calibration traffic looked like, stored in the bundle.

:func:`monitor_reference` is called by :func:`stagewise.runtimes.calibrate.calibrate_manifest`
(conversion and ``stagewise calibrate`` both go through it) and by the re-calibration from field
traces (:mod:`stagewise.runtimes.trace_log`); it stores, in the manifest's
``calibration.monitor``, per stage the bin edges of its exit score (quantiles over the
calibration images) and per operating point, per stage, how many calibration images reached the
stage, how many left there, the histogram of the stage's score among those that reached it and (when
the calibration kept the stages' answers) how often the stage predicted each class among them.
The scores are the ones the thresholds were chosen on (the held-out part when a learned score was
fitted), computed exactly as the runtime computes them.

:func:`rate_tests` turns the record into the 0/1 statistics the monitor tests for one operating
point (:class:`RateTest`), and the class shares into :class:`ClassTest` s; :func:`reference_of` reads it from a manifest (``None`` for a bundle
calibrated before the record existed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from stagewise.calibration import ExitTable, thresholds_of
from stagewise.manifest import Manifest

VERSION = 1
#: Score bins per stage (quantiles of the calibration scores; ties merge bins).
BINS = 16
#: A stage reached by fewer calibration images than this at an operating point is not tested there.
MIN_REACHED = 30
#: The score-distribution tests of a stage sit at the bin edges nearest to these quantiles of its scores.
QUANTILES = (1 / 3, 2 / 3)


def monitor_reference(table: ExitTable, points: list[dict], bins: int = BINS) -> dict:
    """The ``calibration.monitor`` record of a calibration (its exit ``table`` and manifest operating ``points``):
    score bin edges per stage and, per operating point, reached / exited counts, score histograms and (when the table
    has the stages' answers) predicted-class counts per stage."""
    scores = table.scores
    classes = int(table.answers.max()) + 1 if table.answers is not None and table.answers.size else 0
    edges = []
    for row in scores:
        finite = row[np.isfinite(row)]
        cuts = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])) if len(finite) else np.array([])
        edges.append([float(e) for e in cuts])
    record = {}
    for point in points:
        stage = table.exit_stage(thresholds_of(point))
        reached, exited, hists, answers = [], [], [], []
        for k in range(table.k):
            here = stage >= k
            reached.append(int(here.sum()))
            exited.append(int((stage == k).sum()))
            bin_of = np.searchsorted(np.asarray(edges[k]), scores[k, here], side="right")
            hists.append([int(c) for c in np.bincount(bin_of, minlength=len(edges[k]) + 1)])
            if table.answers is not None:
                answers.append([int(c) for c in np.bincount(table.answers[k, here], minlength=classes)])
        record[point["name"]] = {"reached": reached, "exited": exited, "histograms": hists}
        if table.answers is not None:
            record[point["name"]]["answers"] = answers
    return {"version": VERSION, "n": int(table.n), "edges": edges, "points": record}


def reference_of(manifest: Manifest) -> Mapping[str, Any] | None:
    """The monitor record of a manifest, or ``None`` when the bundle has none."""
    record = (manifest.calibration or {}).get("monitor")
    return record if record and record.get("version") == VERSION else None


@dataclass(frozen=True)
class RateTest:
    """A 0/1 statistic of live traffic: among requests at ``point`` that reach ``stage``, is the stage's score
    at least ``cut``? Calibration measured the share ``mean`` on ``n`` images. ``kind`` is ``"exit"``
    (``cut`` is the stage's threshold: the statistic is the exit rate) or ``"score"`` (a score quantile)."""

    point: str
    stage: int
    cut: float
    mean: float
    n: int
    kind: str


@dataclass(frozen=True)
class ClassTest:
    """The predicted-class distribution of stage ``stage`` among requests at ``point`` that reach it; calibration
    counted ``counts`` (one per class)."""

    point: str
    stage: int
    counts: tuple[int, ...]


def class_tests(reference: Mapping[str, Any], point: str) -> list[ClassTest]:
    """The class tests of operating ``point`` (none for a record written before answers were kept)."""
    record = reference["points"].get(point)
    if record is None or "answers" not in record:
        return []
    return [ClassTest(point, k, tuple(int(c) for c in counts))
            for k, (reached, counts) in enumerate(zip(record["reached"], record["answers"]))
            if reached >= MIN_REACHED and sum(1 for c in counts if c) > 1]


def rate_tests(reference: Mapping[str, Any], point: str, thresholds: np.ndarray) -> list[RateTest]:
    """The rate tests of operating ``point`` (its ``thresholds``, ``inf`` for never-exit stages)."""
    record = reference["points"].get(point)
    if record is None:
        return []
    tests = []
    last = len(record["reached"]) - 1
    for k, (reached, exited, hist) in enumerate(zip(record["reached"], record["exited"], record["histograms"])):
        if reached < MIN_REACHED:
            continue
        if k < last and np.isfinite(thresholds[k]):
            tests.append(RateTest(point, k, float(thresholds[k]), exited / reached, reached, "exit"))
        edges = reference["edges"][k]
        survival = np.cumsum(np.asarray(hist[::-1]))[::-1][1:] / reached  # share with score >= edges[b]
        chosen: set[int] = set()
        for q in QUANTILES:
            inside = [b for b in range(len(edges)) if 0.0 < survival[b] < 1.0]
            if inside:
                chosen.add(min(inside, key=lambda b: abs(survival[b] - q)))
        for b in sorted(chosen):
            if not (k < last and edges[b] == thresholds[k]):
                tests.append(RateTest(point, k, float(edges[b]), float(survival[b]), reached, "score"))
    return tests
