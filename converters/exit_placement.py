"""Automatic exit placement (``--exits auto`` or ``auto:K``): measure every candidate cut, simulate, choose.

For every candidate cut (the valid cut points between 3 % and 97 % of the network's MACs, thinned
evenly by MACs to at most ``max_candidates``; for a model that carries trained heads, the cuts it
carries heads at) :func:`measure_candidates` records

* the cumulative latency of the network up to the cut *with* its head, measured on this device
  on the bundle's first format and runtime (the prefix exported like a first stage, batch 1,
  median of repeated runs taken round robin over the candidates), and of the whole network;
* the exit's logits on the calibration images: a cheap linear probe (GAP + linear, L-BFGS on
  pooled features of the frozen backbone) or the carried head.

:func:`rank_placements` then simulates every choice of up to K candidates on the calibration
images: thresholds for the allowed drop from the calibration engine
(:meth:`stagewise.calibration.ExitTable.min_cost` on temperature-scaled max-softmax scores),
charged with the measured stage costs, and ranks the choices by expected mean latency. The
thresholds of the chosen exits are calibrated again on the final bundle's artifacts.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.calibration import ExitTable, Outcome, fit_temperatures
from stagewise.datasets import ImageSet
from stagewise.errors import CalibrationError, ConversionError
from stagewise.images import Preprocess
from stagewise.progress import note

from .features import OUTPUT, FeatureStore
from .heads import HeadTraining, train_head
from .options import BuildOptions
from .plans import StagePlan, pixel_plan, plans_with_heads
from .source import AMBIGUOUS, SourceAdapter

_AUTO = re.compile(r"^auto(?::(\d+))?$")
DEFAULT_EXITS = 2


def auto_exit_count(exits: Sequence[str]) -> int | None:
    """K when ``exits`` asks for automatic placement (``["auto"]``: 2, ``["auto:K"]``: K), else None."""
    if len(exits) != 1 or not (match := _AUTO.match(exits[0].strip())):
        return None
    k = int(match.group(1) or DEFAULT_EXITS)
    if k < 1:
        raise ConversionError("--exits auto:K needs K >= 1")
    return k


@dataclass(frozen=True)
class Candidate:
    """One candidate cut: cumulative MACs and latency (with its head) and its exit's top-1 on the calibration images."""

    cut: str
    macs: int
    head_macs: int
    ms: float
    accuracy: float

    @property
    def head_ms(self) -> float:
        """The head's share of :attr:`ms`, estimated by its share of the MACs (at most all of it)."""
        return self.ms * min(1.0, self.head_macs / max(1, self.macs))


@dataclass(frozen=True)
class Placement:
    """Exits at ``cuts`` in the simulation and what the calibration engine's threshold search gives them
    (``outcome.mean_cost``: expected mean latency in ms, top-1, share of images leaving at each stage)."""

    cuts: tuple[str, ...]
    outcome: Outcome


def stage_costs(chosen: Sequence[Candidate], full_ms: float) -> np.ndarray:
    """Per-stage latency of exits at ``chosen`` (in network order) followed by the rest of the network."""
    costs, before = [], 0.0
    for c in chosen:
        costs.append(c.ms - before)
        before = c.ms - c.head_ms
    return np.asarray(costs + [max(full_ms - before, 0.0)])


def rank_placements(candidates: Sequence[Candidate], exit_logits: dict[str, np.ndarray], final_logits: np.ndarray,
                    full_ms: float, targets: np.ndarray, max_exits: int, drop: float) -> list[Placement]:
    """Every choice of 1 to ``max_exits`` candidates that keeps top-1 within ``drop`` (a fraction) of the
    full network on these images, cheapest expected mean latency first (the full network alone last)."""
    targets = np.asarray(targets, dtype=np.int64)
    full_accuracy = float((final_logits.argmax(1) == targets).mean())
    found = [Placement((), Outcome((), full_accuracy, full_ms, (1.0,)))]
    for k in range(1, max_exits + 1):
        for chosen in itertools.combinations(candidates, k):
            logits = [exit_logits[c.cut] for c in chosen] + [final_logits]
            temperatures = fit_temperatures(logits, targets, [1.0] * len(logits))
            table = ExitTable.from_logits(logits, targets, stage_costs(chosen, full_ms), ["max_softmax"] * len(logits),
                                          temperatures, ["own"] * len(logits))
            try:
                outcome = table.min_cost(full_accuracy - drop)
            except CalibrationError:
                continue
            found.append(Placement(tuple(c.cut for c in chosen), outcome))
    return sorted(found, key=lambda p: (p.outcome.mean_cost, -p.outcome.accuracy))


def candidate_cuts(source: SourceAdapter, model: Any, size: tuple[int, int], max_candidates: int,
                   carried: Sequence[str] | None = None, before: str | None = None) -> list[Any]:
    """The cut points worth an exit: valid, poolable, between 3 % and 97 % of the MACs (``carried``: only those;
    ``before``: only those before this cut, the feature cut of new classes)."""
    points = source.cut_points(model, size)
    if before is not None:
        points = points[:[c.name for c in points].index(before)]
    points = [c for c in points if c.single_tensor and c.layout not in ("flat", AMBIGUOUS)]
    if carried is not None:
        points = [c for c in points if c.name in carried]
    else:
        total = max((c.macs for c in points), default=0)
        points = [c for c in points if 0.03 * total < c.macs < 0.97 * total]
    if not points:
        raise ConversionError("the model has no cut point where an exit could go; list them with `stagewise cuts MODEL`")
    if len(points) > max_candidates:
        keep = np.unique(np.linspace(0, len(points) - 1, max_candidates).round().astype(int))
        points = [points[i] for i in keep]
    return points


def _time_plans(plans: Sequence[StagePlan], preprocess: Preprocess, image: np.ndarray, options: BuildOptions,
                repeats: int) -> list[float]:
    """Median batch-1 latency (ms) of each plan exported to the first format, timed round robin."""
    from .export import StageInputs, exporter

    export = exporter(options.formats[0])
    sessions = []
    with tempfile.TemporaryDirectory(prefix="stagewise-placement-") as tmp:
        for k, plan in enumerate(plans):
            plan = pixel_plan(plan, preprocess) if options.pixel_input else plan
            x = preprocess.stage_input([image], tuple(plan.source["size"]), plan.input_dtype == "uint8")
            workdir = Path(tmp) / f"c{k}"
            workdir.mkdir()
            files = export.export(plan, workdir, StageInputs(x, x, x), options).files
            session = export.open(plan, files, options.threads)
            session.run(x)
            sessions.append((session, x))
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(repeats):
            for k, (session, x) in enumerate(sessions):
                start = time.perf_counter()
                session.run(x)
                times[k].append(1e3 * (time.perf_counter() - start))
    return [float(np.median(t)) for t in times]


def measure_candidates(source: SourceAdapter, model: Any, preprocess: Preprocess, size: tuple[int, int],
                       probe_images: ImageSet, calibration: ImageSet, options: BuildOptions,
                       carried: dict[str, Any] | None = None, max_candidates: int = 10,
                       repeats: int = 30, store: FeatureStore | None = None,
                       feature: str | None = None) -> tuple[list[Candidate], dict[str, np.ndarray], np.ndarray, float]:
    """Candidates with measured latency and exit accuracy, their calibration logits, the network's and its latency.

    Probes are fitted on pooled features from ``store`` (one pass per image for every candidate).
    ``feature``: new classes — the network ends at this cut with a head fitted for the data's
    classes (:mod:`.new_classes`), which is then what the exits are compared with and timed against.
    """
    points = candidate_cuts(source, model, size, max_candidates, None if carried is None else list(carried), feature)
    cuts = [c.name for c in points]
    targets = np.asarray(calibration.targets)
    whole = StagePlan(name="full", module=model, source={"source": "image", "size": list(size)}, has_carry=False,
                      exit={}, macs=0, params=0, framework=source.framework)
    if carried is not None:
        heads = [carried[cut] for cut in cuts]
        chain = plans_with_heads(source, source.split(model, cuts), cuts, size, [*heads, None],
                                 [None] * (len(cuts) + 1), "max_softmax")
        x = preprocess.tensor([calibration.image(i) for i in range(len(calibration))], size)
        exit_logits = {}
        for cut, plan in zip(cuts, chain):
            x, exit_logits[cut] = source.run(plan.module, x)
        final_logits = source.run(chain[-1].module, x)[0]
    else:
        store = store or FeatureStore(source, model, preprocess, size)
        probe_targets = np.asarray(probe_images.targets)
        wanted = cuts + ([feature] if feature else [])
        probe = store.features(wanted, probe_images, output=feature is None)
        calib = store.features(wanted, calibration, output=feature is None)
        settings = HeadTraining(max_iter=100)
        if feature is None:
            teacher, final_logits = probe[OUTPUT], calib[OUTPUT]
        else:
            final, _ = train_head(probe[feature], probe_targets, None, settings, classes=len(probe_images.classes))
            teacher, final_logits = final.decision(probe[feature]), final.decision(calib[feature])
            whole = plans_with_heads(source, source.split(model, [feature])[:-1], [feature], size, [final], [None],
                                     "max_softmax")[0]
        heads = [train_head(probe[cut], probe_targets, teacher, settings)[0] for cut in cuts]
        exit_logits = {cut: head.decision(calib[cut]) for cut, head in zip(cuts, heads)}
    prefixes = [plans_with_heads(source, source.split(model, [cut]), [cut], size, [head, None], [None, None],
                                 "max_softmax")[0] for cut, head in zip(cuts, heads)]
    latencies = _time_plans([*prefixes, whole], preprocess, calibration.image(0), options, repeats)
    candidates = [Candidate(cut, prefix.macs, prefix.macs - point.macs, ms,
                            float((exit_logits[cut].argmax(1) == targets).mean()))
                  for cut, prefix, point, ms in zip(cuts, prefixes, points, latencies)]
    return candidates, exit_logits, final_logits, latencies[-1]


def placement_record(candidates: Sequence[Candidate], ranked: Sequence[Placement], full_ms: float, drop: float,
                     probe: str) -> dict:
    """What the manifest keeps of an automatic placement: the candidates, the best choices and the rule."""
    return {"rule": f"least expected mean latency at <= {100 * drop:g} points top-1 below the full network "
                    "on the calibration images", "exit_accuracy_from": probe, "full_ms": round(full_ms, 4),
            "candidates": [{"cut": c.cut, "macs": c.macs, "ms": round(c.ms, 4), "accuracy": round(c.accuracy, 4)}
                           for c in candidates],
            "best": [{"cuts": list(p.cuts), "mean_ms": round(p.outcome.mean_cost, 4),
                      "accuracy": round(p.outcome.accuracy, 4),
                      "exit_rates": [round(r, 4) for r in p.outcome.exit_rates]} for p in ranked[:5]]}


def print_placement(candidates: Sequence[Candidate], ranked: Sequence[Placement], full_ms: float, drop: float,
                    chosen: Placement) -> None:
    """The candidates table and the best placements, on stderr (silent when ``STAGEWISE_QUIET`` is set)."""
    if os.environ.get("STAGEWISE_QUIET"):
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="exit candidates (latency on this device, up to the cut with its head)")
    for column in ("cut", "MACs", "ms", "share of the network", "exit top-1 %"):
        table.add_column(column, justify="left" if column == "cut" else "right")
    for c in candidates:
        table.add_row(c.cut, f"{c.macs / 1e6:.2f} M", f"{c.ms:.3f}", f"{c.ms / full_ms:.0%}", f"{100 * c.accuracy:.1f}")
    best = Table(title=f"simulated placements at <= {100 * drop:g} pt top-1 drop (calibration images)")
    for column in ("exits", "expected mean ms", "speed-up", "top-1 %", "exit shares"):
        best.add_column(column, justify="left" if column == "exits" else "right")
    for p in ranked[:6]:
        o = p.outcome
        best.add_row(", ".join(p.cuts) or "(none: full network)", f"{o.mean_cost:.3f}", f"{full_ms / o.mean_cost:.2f}x",
                     f"{100 * o.accuracy:.2f}", " / ".join(f"{100 * r:.0f}%" for r in o.exit_rates))
    console = Console(stderr=True, highlight=False)
    console.print(table)
    console.print(best)
    console.print(f"chosen exits: {', '.join(chosen.cuts)} — the least expected mean latency "
                  f"({chosen.outcome.mean_cost:.3f} ms vs {full_ms:.3f} ms for the full network) among the placements that keep "
                  f"top-1 within {100 * drop:g} points")


def choose_exits(source: SourceAdapter, model: Any, preprocess: Preprocess, size: tuple[int, int], max_exits: int,
                 probe_images: ImageSet, calibration: ImageSet, options: BuildOptions,
                 carried: dict[str, Any] | None = None, store: FeatureStore | None = None,
                 feature: str | None = None) -> tuple[list[str], dict]:
    """The cuts :func:`rank_placements` ranks first (at least one exit), printed, and their manifest record
    (``store``, ``feature``: see :func:`measure_candidates`)."""
    drop = options.default_drop
    candidates, logits, final, full_ms = measure_candidates(source, model, preprocess, size, probe_images,
                                                            calibration, options, carried, store=store,
                                                            feature=feature)
    ranked = rank_placements(candidates, logits, final, full_ms, calibration.targets, max_exits, drop)
    with_exits = [p for p in ranked if p.cuts]
    if not with_exits:
        raise ConversionError(f"no placement of up to {max_exits} exits keeps top-1 within {100 * drop:g} points on the "
                              "calibration images; allow a larger --target-drop or train the exits jointly")
    chosen = with_exits[0]
    if ranked[0] is not chosen:
        note("no exit placement is expected to be faster than the full network alone at this drop; "
             "converting the best one anyway")
    print_placement(candidates, ranked, full_ms, drop, chosen)
    probe = "heads the model carries" if carried is not None else "linear probes on the frozen backbone"
    return list(chosen.cuts), placement_record(candidates, ranked, full_ms, drop, probe)
