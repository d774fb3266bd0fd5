"""Trace logs: answered requests as JSON lines, replayed by ``stagewise monitor`` and re-calibrated on by
``stagewise calibrate BUNDLE --from-log LOG``.

A line is one answered request with at least ``operating_point`` and ``trace`` (the
:class:`~stagewise.runtimes.StageRecord` fields of each stage): the lines of ``stagewise run
--json`` and the frame logs of :mod:`stagewise.runtimes.stream` qualify. An *agreement sample*
(written by the monitor with ``MonitorSettings(log=...)``, see :func:`sample_line`) adds
``"full"``: the full model's answer, its probabilities of both answers and the full run's trace.

:func:`recalibrate_from_log` re-chooses a bundle's thresholds without labels from the agreement
samples of such a log, as ``stagewise calibrate --no-labels`` does offline: a stage is right when
it agrees with the full model, the scores are the ones the device computed (same exit rules and
temperatures: the log must come from this calibration of the bundle), the stage costs are the
median step times the full runs measured on the device.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from stagewise.bundle import update_manifest
from stagewise.calibration import DEFAULT_DROPS, ExitTable, spread, threshold_point
from stagewise.errors import CalibrationError, TraceLogError
from stagewise.manifest import Manifest, freeze, thaw

from .agreement import Sample
from .executor import Prediction, StageRecord
from .monitor_reference import monitor_reference

#: Named Pareto points a re-calibration from a log stores (as ``stagewise calibrate`` does).
FRONT_POINTS = 6


def sample_line(sample: Sample) -> dict:
    """The JSON line of an agreement sample: the answered request and its full run."""
    return {"operating_point": sample.point, "label": sample.label, "stage": sample.stage,
            "trace": [r.to_dict() for r in sample.answered],
            "full": {"label": sample.full_label, "p_label": sample.p_full_of_label, "p_full": sample.p_full_of_full,
                     "trace": [r.to_dict() for r in sample.trace]}}


def write_sample(file: IO[str], sample: Sample) -> None:
    """Append ``sample`` to an open log as one line."""
    file.write(json.dumps(sample_line(sample)) + "\n")
    file.flush()


def _records(doc: object, where: str) -> tuple[StageRecord, ...]:
    if not isinstance(doc, list):
        raise TraceLogError(f"{where}: 'trace' must be a list of stage records")
    try:
        return tuple(StageRecord.from_dict(r) for r in doc)
    except (TypeError, AttributeError) as exc:
        raise TraceLogError(f"{where}: a stage record lacks a field ({exc})") from None


def _prediction(doc: dict, where: str) -> Prediction:
    trace = _records(doc.get("trace"), where)
    scored = [r for r in trace if r.score is not None]
    if not scored:
        raise TraceLogError(f"{where}: the trace has no scored stage")
    stage = len(scored) - 1
    label = doc.get("label", scored[-1].label)
    return Prediction(int(label), str(doc.get("class_name", doc.get("name", ""))), float(scored[-1].score), stage,
                      float(doc.get("elapsed_ms") or 0.0), trace, np.empty(0), bool(doc.get("budget_limited", False)),
                      None, doc.get("operating_point"), scored[-1].stage_name)


def read_log(path: str | Path) -> Iterator[tuple[Prediction, Sample | None]]:
    """Every answered request of a log as a :class:`Prediction`, with its agreement :class:`Sample` if it has one.

    Lines without a trace (a frame dropped by a stream) are skipped; a malformed line raises
    :class:`~stagewise.errors.TraceLogError` naming it.
    """
    path = Path(path)
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceLogError(f"{where}: not JSON ({exc.msg}); a trace log has one JSON object per line "
                                    "(e.g. `stagewise run --json` output)") from None
            if not isinstance(doc, dict):
                raise TraceLogError(f"{where}: each line must be a JSON object with 'operating_point' and 'trace'")
            if not doc.get("trace"):
                continue
            prediction = _prediction(doc, where)
            full = doc.get("full")
            sample = None
            if isinstance(full, dict):
                try:
                    sample = Sample(prediction.operating_point, prediction.stage_index, prediction.label, int(full["label"]),
                                    float(full["p_label"]), float(full["p_full"]), _records(full.get("trace"), where),
                                    prediction.trace)
                except (KeyError, TypeError, ValueError) as exc:
                    raise TraceLogError(f"{where}: the 'full' record needs label, p_label, p_full and trace ({exc})") from None
            yield prediction, sample


def field_table(samples: list[Sample], stages: int) -> ExitTable:
    """The exit table of agreement samples whose full run scored every stage: scores, agreement with the full
    model's answer and the median step time of each stage."""
    rows = [s.trace for s in samples if len(s.trace) == stages and all(r.score is not None for r in s.trace)]
    if len(rows) < 2:
        raise CalibrationError(f"the log has {len(rows)} agreement samples with every stage scored; re-calibrating "
                               "needs many (a few thousand for a 1-point target): serve with agreement sampling on "
                               "(`stagewise serve --monitor-agreement 0.05 --monitor-log LOG`)")
    scores = np.array([[r.score for r in t] for t in rows]).T
    labels = np.array([[r.label for r in t] for t in rows]).T
    costs = np.array([np.median([t[k].latency_ms or 0.0 for t in rows]) for k in range(stages)])
    return ExitTable(scores, labels == labels[-1], costs, labels)


def field_points(table: ExitTable, drop: float, drops: tuple[float, ...] = DEFAULT_DROPS) -> list[dict]:
    """``full``, ``drop-*`` (agreement with the full model at least 1 - drop, cheapest) and ``pareto-*`` points."""
    def point(name: str, thr, goal: dict) -> dict:
        return threshold_point(name, np.asarray(thr, dtype=np.float64), goal, table, None, "ms")

    front = table.front()
    points = [point("full", np.full(table.k, np.inf), {"kind": "full"})]
    for d in sorted(set(drops) | {drop}):
        points.append(point(f"drop-{100 * d:g}pt", table.min_cost(1.0 - d, front).thresholds,
                            {"kind": "max_accuracy_drop", "drop": d, "reference_accuracy": 1.0,
                             "reference": "full_model_agreement"}))
    points += [point(f"pareto-{i}", o.thresholds, {"kind": "pareto", "rank": i, "reference": "full_model_agreement"})
               for i, o in enumerate(spread(front, FRONT_POINTS), start=1)]
    return points


def recalibrate_from_log(bundle: str | Path, log: str | Path, target_drop: float) -> Manifest:
    """``stagewise calibrate BUNDLE --from-log LOG --target-drop D``: new operating points from the log's agreement
    samples (``target_drop`` in points), written atomically; returns the new manifest."""
    bundle = Path(bundle)
    samples = [s for _, s in read_log(log) if s is not None]
    drop = target_drop / 100

    def change(manifest: Manifest, _root: Path) -> Manifest:
        table = field_table(samples, len(manifest.stages))
        points = field_points(table, drop)
        record = thaw(manifest.calibration or {})
        for stale in ("stage_accuracy", "guarantee"):
            record.pop(stale, None)
        oracle = table.oracle()
        record.update(method="label-free from field traces: exact per-stage threshold search on agreement samples",
                      goal={"kind": "drop", "value": drop}, targets="full_model_agreement", n=int(table.n),
                      n_thresholds=int(table.n), data=str(log), reference_accuracy=1.0,
                      note="no labels: accuracy means agreement with running every stage",
                      stage_agreement=[float(a) for a in table.correct.mean(axis=1)], cost="latency_ms:field traces",
                      oracle={"accuracy": oracle.accuracy, "mean_cost": oracle.mean_cost,
                              "exit_rates": list(oracle.exit_rates)},
                      monitor=monitor_reference(table, points))
        return replace(manifest.with_points(points, f"drop-{100 * drop:g}pt"), calibration=freeze(record))

    return update_manifest(bundle, change)
