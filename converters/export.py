"""The exporter interface and the one pipeline that drives it for every stage and every format.

An exporter turns a :class:`~stagewise.converters.plans.StagePlan` into the files of one
artifact format and knows that format's tools. It promises:

* ``export(plan, workdir, inputs, options)``: write the float model; return its files and a
  conversion record. Where the step depends on the source framework the exporter asks the
  plan's source adapter for its frontend (``export_onnx``, ``export_openvino``,
  ``export_tflite``);
* ``signature(files)``: the inputs and outputs the written model declares (name, dtype, shape),
  which the pipeline checks against the stage before anything runs it;
* ``open(plan, files, threads)``: the model on the runtime that will run it, through the
  runtime's own adapter, so verification sees what the device will;
* ``quantize(plan, files, workdir, calibrate, options)``: INT8 files from real stage inputs,
  with the format's own quantizer, and its record;
* optionally ``fp16(plan, files, workdir, example, options)``: the float model with fp16 weights.

:class:`Exporter` implements ``verify`` (source model vs exported model on real inputs) and ``judge``
(a quantized candidate against the float model by the INT8 gate, :mod:`.int8_gate`) once for every
format on top of ``open``. :func:`export_stage` is the pipeline: export, check the declared
inputs/outputs, verify, optionally fp16, quantize (searching recipes and float layers within
``--int8-search-seconds`` until a candidate passes the gate), judge it on the held-back images, time
it against the float model on the build machine (:meth:`Exporter.host_speed`), keep INT8 only when it
passes the gate and, if asked, a minimum speed-up (:func:`keep_int8`), and list the chosen files.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from stagewise.errors import ConversionError, VerificationError
from stagewise.formats import format_named
from stagewise.machine import cpu_summary
from stagewise.progress import note
from stagewise.runtimes.base import RUNTIMES, LoadOptions, StageIO

from .int8_gate import Gate, Verdict
from .options import BuildOptions
from .plans import StagePlan
from .tooling import Plugin, plugin

FP16_TOLERANCE = 2e-2
"""Relative tolerance (of the largest output magnitude) of fp16-weight models against the source."""
RANKING_IMAGES = 64
"""Calibration images a mixed-precision search ranks layers on (quantizing and measuring on them)."""
TIMED_RUNS = 30
"""Single-image runs per model when the build machine times a quantized model against its float version."""


class SearchClock:
    """The time budget of one stage's INT8 search (``--int8-search-seconds``): every search step asks
    :meth:`expired` before it starts another candidate, so a search ends within about one candidate's time of
    the budget."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self._clock = float(seconds), clock
        self._start = clock()

    @property
    def spent(self) -> float:
        return self._clock() - self._start

    def expired(self) -> bool:
        return self.spent >= self.seconds


def logit_snr(reference: np.ndarray, quantized: np.ndarray) -> float:
    """Signal-to-noise ratio (dB) of a quantized model's logits against the float model's."""
    reference = reference.astype(np.float64)
    noise = float(((reference - quantized) ** 2).sum())
    return float(10 * np.log10(float((reference ** 2).sum()) / max(noise, 1e-30)))


@dataclass(frozen=True)
class HostSpeed:
    """Median single-image latency of a float model and its quantized version on the build machine, timed round
    robin (one run of each in turn, so both see the same load)."""

    float_ms: float
    int8_ms: float
    runs: int

    @property
    def speedup(self) -> float:
        return self.float_ms / self.int8_ms if self.int8_ms > 0 else float("inf")

    def record(self) -> dict:
        return {"host_latency_ms": {"float": round(self.float_ms, 4), "int8": round(self.int8_ms, 4)},
                "host_speedup": round(self.speedup, 3), "host_timed_runs": self.runs,
                "host": f"{platform.machine()} {platform.processor() or ''}".strip(), "host_cpu": cpu_summary()}


Judge = Callable[["Exported"], Verdict]
"""Judges a quantized candidate against the float reference on the held-back images (see :mod:`.int8_gate`)."""


def tried_entry(recipe: str, candidate: "Exported", verdict: Verdict) -> dict:
    """One row of a search record: the recipe, the layers kept in float and what the gate measured."""
    entry = {"recipe": recipe, "float_layers": list(candidate.record.get("float_layers", [])),
             "passes": verdict.passes, "agreement_with_fp32": verdict.record["agreement_with_fp32"]}
    if "accuracy_difference" in verdict.record:
        entry["accuracy_difference"] = verdict.record["accuracy_difference"]
    return entry


@dataclass(frozen=True)
class RecipeSearch:
    """What :func:`try_recipes` found: every try, and the first recipe that passes the gate (``met``) or else the
    best by the gate's merit, with its fully quantized model."""

    tried: list[dict]
    recipe: Any
    full: "Exported"
    met: bool


def try_recipes(recipes: Sequence[Any], quantize: Callable[[int, Any], "Exported"], judge: Judge,
                clock: SearchClock | None = None) -> RecipeSearch:
    """Fully quantize by each of ``recipes`` in turn (``quantize(k, recipe)``; a recipe has a ``name``) until one
    passes the gate, or the ``clock`` runs out (the first recipe is always tried)."""
    tried: list[dict] = []
    best = None
    for k, recipe in enumerate(recipes):
        if k and clock is not None and clock.expired():
            tried.append({"recipe": recipe.name, "stopped": f"search time budget ({clock.seconds:g} s) spent"})
            break
        full = quantize(k, recipe)
        verdict = judge(full)
        tried.append(tried_entry(recipe.name, full, verdict))
        if verdict.passes:
            return RecipeSearch(tried, recipe, full, True)
        if best is None or verdict.merit > best[1].merit:
            best = recipe, verdict, full
    if best is None:
        raise ConversionError("no INT8 recipe to try")
    return RecipeSearch(tried, best[0], best[2], False)


def exclusion_counts(n: int) -> list[int]:
    """How many of ``n`` ranked layers a mixed-precision search keeps in float in turn: 1, 2, 4, … up to
    ``n - 1`` (at least one weighted layer stays INT8)."""
    counts, count = [], 1
    while count < n:
        counts.append(count)
        count = min(2 * count, n - 1) if count < n - 1 else n
    return counts


def exclude_most_sensitive(ranked: Sequence[Any], make: Callable[[int, list], "Exported"], judge: Judge,
                           tried: list[dict], recipe: str, clock: SearchClock | None = None) -> "Exported | None":
    """The first candidate with the first 1, 2, 4, … of ``ranked`` (most sensitive first) kept in float —
    ``make(count, ranked[:count])`` — that passes the gate, or None (also when the ``clock`` runs out). Every try
    is appended to ``tried``."""
    for count in exclusion_counts(len(ranked)):
        if clock is not None and clock.expired():
            tried.append({"recipe": recipe, "stopped": f"search time budget ({clock.seconds:g} s) spent"})
            return None
        candidate = make(count, list(ranked[:count]))
        verdict = judge(candidate)
        tried.append(tried_entry(recipe, candidate, verdict))
        if verdict.passes:
            return candidate
    return None


@dataclass(frozen=True)
class TensorSpec:
    """One input or output a model declares: name, element type (numpy name) and shape (None: dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class StageInputs:
    """Real inputs of one stage (uint8 pixels or fp32 tensors): for verification, quantization and the INT8 gate,
    which judges on the held-back ``agree`` inputs and their labels ``agree_targets`` (``None``: no labels)."""

    verify: np.ndarray
    calibrate: np.ndarray
    agree: np.ndarray
    agree_targets: np.ndarray | None = None


@dataclass(frozen=True)
class Exported:
    """Files of one artifact variant (main model file first) and what produced them."""

    files: tuple[Path, ...]
    record: dict


class Exporter:
    """Base of the ONNX, OpenVINO and TFLite exporters (see the module docstring)."""

    format: str = ""
    runtime: str = ""
    io_dtypes: tuple[str, ...] = ("float32",)

    def export(self, plan: StagePlan, workdir: Path, inputs: StageInputs, options: BuildOptions) -> Exported:
        raise NotImplementedError

    def signature(self, files: Sequence[Path]) -> tuple[list[TensorSpec], list[TensorSpec]]:
        raise NotImplementedError

    def quantize(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                 options: BuildOptions) -> Exported:
        raise NotImplementedError

    def quantize_mixed(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                       options: BuildOptions, judge: Judge, clock: SearchClock | None = None) -> Exported:
        """INT8 that passes the gate (``judge``) by trying recipes and keeping sensitive layers in float, where the
        format's tools can, within the ``clock``'s budget; this base version quantizes everything once. The record
        lists the layers left in float."""
        return self.quantize(plan, fp32, workdir, inputs, options)

    supports_fp16: bool = False

    def fp16(self, plan: StagePlan, fp32: Exported, workdir: Path, example: np.ndarray,
             options: BuildOptions) -> Exported:
        """The float model with fp16 weights (formats with ``supports_fp16``)."""
        raise ConversionError(f"{self.format} artifacts have no fp16 variant")

    def wants_fp16(self, options: BuildOptions) -> bool:
        return self.supports_fp16 and options.fp16

    def target(self, files: Sequence[Path], options: BuildOptions) -> dict | None:
        """A device-target record for the manifest (e.g. the OpenVINO NPU preset), or None."""
        return None

    def decision(self, plan: StagePlan, exported: Exported, workdir: Path) -> Exported | None:
        """``exported`` with the stage's exit decision in its graph (its record: the artifact's manifest ``decision``
        entry), or ``None`` where this format does not add one (the runtime then scores the logits in numpy)."""
        return None

    def load_options(self, threads: int) -> LoadOptions:
        return LoadOptions(threads=threads)

    def open(self, plan: StagePlan, files: Sequence[Path], threads: int = 1) -> Any:
        """The exported model on this format's runtime, opened by the runtime's own adapter."""
        opener = RUNTIMES[self.runtime].opener()
        return opener(list(files), StageIO(plan.input_name, tuple(plan.output_names)), self.load_options(threads))

    def run(self, plan: StagePlan, files: Sequence[Path], x: np.ndarray, threads: int = 1,
            batch: int = 64) -> dict[str, np.ndarray]:
        """The exported model's outputs on ``x``, in batches."""
        session = self.open(plan, files, threads)
        parts = [session.run(np.ascontiguousarray(x[i:i + batch])) for i in range(0, len(x), batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def verify(self, plan: StagePlan, exported: Exported, inputs: np.ndarray, tolerance: float,
               threads: int = 1) -> dict:
        """Compare the exported model with the source model on ``inputs``.

        Returns ``{"max_abs_diff": {output: value}, "top1_agreement": fraction, "n": count,
        "tolerance": t, "runtime": name}``; raises :class:`VerificationError` when an output's
        shape differs or a value differs by more than ``tolerance`` relative to the output's
        largest magnitude.
        """
        expected = plan.outputs(inputs)
        got = self.run(plan, exported.files, inputs, threads)
        diffs = {}
        for name in plan.output_names:
            e, g = expected[name], got[name]
            if e.shape != g.shape:
                raise VerificationError(f"stage {plan.name} ({self.format}): output {name!r} has shape {g.shape} on "
                                        f"{self.runtime}, {e.shape} in {plan.framework}")
            diff = float(np.abs(e - g).max())
            diffs[name] = diff
            if diff > tolerance * max(1.0, float(np.abs(e).max())):
                unstable = plan.adapter.unstable_normalisation(plan.module)
                why = ("the exporter did not reproduce this stage faithfully" if not unstable else
                       "this is the network, not the exporter: its batch-normalisation layer(s) "
                       + ", ".join(f"{layer} ({gain:.3g}x)" for layer, gain in unstable[:3])
                       + " multiply their input by more than a thousand (a running variance near zero), which turns "
                         "float rounding into output differences; re-estimate their statistics on real images "
                         "(e.g. train or adapt the network further) or convert a checkpoint whose statistics are sane")
                raise VerificationError(
                    f"stage {plan.name} ({self.format}): output {name!r} differs from {plan.framework} by {diff:.3g} "
                    f"(tolerance {tolerance:g} relative); {why}")
        agreement = float((expected["logits"].argmax(1) == got["logits"].argmax(1)).mean())
        return {"max_abs_diff": diffs, "top1_agreement": agreement, "n": int(len(inputs)), "tolerance": tolerance,
                "runtime": self.runtime}

    def host_speed(self, plan: StagePlan, reference: Exported, candidate: Exported, inputs: np.ndarray,
                   threads: int = 1, runs: int = TIMED_RUNS) -> HostSpeed:
        """Median latency of ``reference`` and ``candidate`` on single inputs of ``inputs`` on this machine, the two
        run in turn (which goes first alternates: the second run of a pair finds warmer caches) after one warm-up
        run each."""
        sessions = [self.open(plan, reference.files, threads), self.open(plan, candidate.files, threads)]
        times: list[list[float]] = [[], []]
        for i in range(runs + 1):
            x = np.ascontiguousarray(inputs[i % len(inputs):i % len(inputs) + 1])
            for k in (0, 1) if i % 2 else (1, 0):
                start = time.perf_counter()
                sessions[k].run(x)
                times[k].append(1000 * (time.perf_counter() - start))
        return HostSpeed(float(np.median(times[0][1:])), float(np.median(times[1][1:])), runs)

    def rank_by_logit_snr(self, plan: StagePlan, fp32: Exported, units: Sequence[Any],
                          quantize_without: Callable[[Any], Exported], x: np.ndarray,
                          clock: SearchClock | None = None) -> list[tuple[Any, float]]:
        """``units`` (what a mixed-precision search may keep in float) with the logit SNR (dB) against the float
        model of the stage quantized with only that unit in float (``quantize_without(unit)``), run on ``x``
        through this format's runtime; most helpful first. Units not reached before the ``clock`` ran out are
        ranked last, in their order (SNR ``-inf``)."""
        reference = self.run(plan, fp32.files, x)["logits"]
        scores = []
        for unit in units:
            if clock is not None and clock.expired():
                scores.append((unit, float("-inf")))
            else:
                scores.append((unit, logit_snr(reference, self.run(plan, quantize_without(unit).files, x)["logits"])))
        return sorted(scores, key=lambda item: -item[1])

    def judge(self, plan: StagePlan, reference: Exported, inputs: StageInputs, gate: Gate, threads: int = 1) -> Judge:
        """A :data:`Judge` by ``gate`` against ``reference`` on the held-back inputs (the reference runs once)."""
        verdict = gate.judge(self.run(plan, reference.files, inputs.agree, threads)["logits"], inputs.agree_targets)
        return lambda candidate: verdict(self.run(plan, candidate.files, inputs.agree, threads)["logits"])


def check_signature(exporter: Exporter, plan: StagePlan, exported: Exported, integer_io: bool = False) -> None:
    """Raise :class:`ConversionError` naming every way the model's declared inputs/outputs differ from the stage's."""
    where = f"stage {plan.name}: the exported {exporter.format} model ({exported.files[0].name})"
    try:
        inputs, outputs = exporter.signature(exported.files)
    except Exception as exc:  # each format's reader raises its own types for an unreadable model
        raise ConversionError(f"{where} cannot be read back by {exporter.runtime}: {exc}") from exc
    dtypes = ("int8",) if integer_io else exporter.io_dtypes
    problems = []
    if [t.name for t in inputs] != [plan.input_name]:
        problems.append(f"declares inputs {[t.name for t in inputs]}, the stage has one input {plan.input_name!r} "
                        "(constants the converter turned into graph inputs, e.g. normalisation layers, show up here)")
    if sorted(t.name for t in outputs) != sorted(plan.output_names):
        problems.append(f"declares outputs {[t.name for t in outputs]}, the stage has {plan.output_names}")
    pixels = ("uint8",) if plan.input_dtype == "uint8" else None  # a pixel input stays uint8 in every variant
    for t, expected in [*((t, pixels or dtypes) for t in inputs), *((t, dtypes) for t in outputs)]:
        if t.dtype not in expected:
            problems.append(f"tensor {t.name!r} has element type {t.dtype}, expected {' or '.join(expected)}")
    if problems:
        raise ConversionError(f"{where} " + "; ".join(problems))


def keep_int8(record: dict, verdict: Verdict, speed: HostSpeed, options: BuildOptions) -> bool:
    """The fallback shared by every exporter: record what the gate measured on the held-back images (``verdict``)
    and the INT8 model's speed on the build machine in ``record``, and say whether it is kept — it passes the gate
    and is at least ``options.int8_min_speedup`` times as fast as the float one (``record["rejected"]`` says which
    failed)."""
    fast = speed.speedup >= options.int8_min_speedup
    record.update(verdict.record, **speed.record(), gate=options.gate.describe(), min_speedup=options.int8_min_speedup,
                  kept_fp32=not (verdict.passes and fast))
    if options.int8_tolerance is not None:
        record["tolerance"] = options.int8_tolerance
    if not verdict.passes:
        record["rejected"] = f"{options.gate.rule} gate: {verdict.summary}"
    elif not fast:
        record["rejected"] = (f"{speed.speedup:.2f}x the float model's speed on the build machine, below the "
                              f"{options.int8_min_speedup:g}x --int8-min-speedup")
    return verdict.passes and fast


class StageExport(NamedTuple):
    """One stage in one format: the manifest ``artifact``, the chosen ``files`` (``{bundle path: file}``) and the
    float model's files under the same paths (``float_files``, what a float reference of the bundle runs)."""

    artifact: dict
    files: dict[str, Path]
    float_files: dict[str, Path]


def export_stage(exporter: Exporter, plan: StagePlan, workdir: Path, inputs: StageInputs,
                 options: BuildOptions) -> StageExport:
    """The pipeline for one stage and one format (see the module docstring)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    example = np.ascontiguousarray(inputs.verify[:1])
    fp32 = exporter.export(plan, workdir, inputs, options)
    check_signature(exporter, plan, fp32)
    verification = exporter.verify(plan, fp32, inputs.verify, options.verify_tolerance, options.threads)
    verification["conversion"] = fp32.record
    artifact: dict[str, Any] = {"precision": "fp32", "verification": verification}
    reference = chosen = fp32
    if exporter.wants_fp16(options):
        half = exporter.fp16(plan, fp32, workdir, example, options)
        check_signature(exporter, plan, half)
        tolerance = max(options.verify_tolerance, FP16_TOLERANCE)
        verification16 = exporter.verify(plan, half, inputs.verify, tolerance, options.threads)
        verification16.update(conversion=fp32.record, fp16=half.record, fp32_max_abs_diff=verification["max_abs_diff"])
        artifact.update(precision="fp16", verification=verification16)
        reference = chosen = half
    if options.int8:
        quantized, record = _quantize_stage(exporter, plan, fp32, reference, workdir, inputs, options)
        if quantized is not None:
            artifact["precision"], chosen = "int8", quantized
        artifact["quantization"] = record
    decided = exporter.decision(plan, chosen, workdir)  # after verification and the gate: they judge the logits
    if decided is not None:
        artifact["decision"] = decided.record
        chosen, reference = decided, (decided if reference is chosen else exporter.decision(plan, reference, workdir))
    target = exporter.target(chosen.files, options)
    if target is not None:
        artifact["target"] = target
    rels = format_named(exporter.format).files(plan.name)
    artifact["files"] = [{"path": rel} for rel in rels]
    return StageExport(artifact, dict(zip(rels, chosen.files)), dict(zip(rels, reference.files)))


def _quantize_stage(exporter: Exporter, plan: StagePlan, fp32: Exported, reference: Exported, workdir: Path,
                    inputs: StageInputs, options: BuildOptions) -> tuple[Exported | None, dict]:
    """Quantize one stage, judge it by the gate on the held-back images and time it: the INT8 model when it is
    kept (else ``None``) and the record. The mixed-precision search runs within ``options.int8_search_seconds``."""
    gate = options.gate
    started = time.monotonic()
    judge = exporter.judge(plan, reference, inputs, gate, options.threads)
    searchable = options.int8_mixed and gate.can_pass(len(inputs.agree))
    if searchable:
        quantized = exporter.quantize_mixed(plan, fp32, workdir, inputs, options, judge,
                                            SearchClock(options.int8_search_seconds))
    else:
        quantized = exporter.quantize(plan, fp32, workdir, inputs, options)
    check_signature(exporter, plan, quantized, integer_io=options.int8_io and exporter.format == "tflite")
    record = dict(quantized.record)
    if options.int8_mixed and not searchable:
        record["search_skipped"] = (f"even {len(inputs.agree)} agreeing images out of {len(inputs.agree)} leave the "
                                    f"Wilson interval below the {options.int8_tolerance:g} tolerance; give more "
                                    "calibration images or a lower --int8-tolerance")
    verdict = judge(quantized)
    speed = exporter.host_speed(plan, reference, quantized, inputs.agree, options.threads)
    kept = keep_int8(record, verdict, speed, options)
    record["search_seconds"] = round(time.monotonic() - started, 1)
    if reference is not fp32:
        record["float_reference"] = "fp16 weights"
    where = f"stage {plan.name} ({exporter.format})"
    if kept:
        mixed = f"mixed INT8 ({len(record['float_layers'])} layer(s) in float)" if record.get("float_layers") else "INT8"
        note(f"{where}: {mixed} kept, {verdict.summary}; {speed.speedup:.2f}x float speed here")
    elif verdict.passes:
        note(f"{where}: INT8 passes the gate but runs at {record['rejected']}: kept float")
    else:
        note(f"{where}: INT8 refused, {verdict.summary}: kept float"
             + ("" if searchable or not options.int8_mixed else f" ({len(inputs.agree)} images cannot show the "
                                                                 "agreement tolerance: no mixed-precision search)"))
    return (quantized if kept else None), record


EXPORTERS: dict[str, Plugin] = {}
"""The registered exporters by the artifact format they write (:func:`register_exporter` adds one)."""


def register_exporter(exporter: Plugin) -> Plugin:
    """Add the exporter of format ``exporter.name`` (or replace it); returns it. The format must be registered
    (:func:`stagewise.formats.register_format`); ``exporter.target`` is an :class:`Exporter` subclass, imported on
    first use, and ``exporter.extra`` the ``stagewise[...]`` extra that installs its tools."""
    format_named(exporter.name)
    EXPORTERS[exporter.name] = exporter
    return exporter


register_exporter(Plugin("onnx", "stagewise.converters.onnx_export:OnnxExporter", "onnxruntime"))
register_exporter(Plugin("openvino", "stagewise.converters.openvino_export:OpenVinoExporter", "openvino-convert"))
register_exporter(Plugin("tflite", "stagewise.converters.tflite_export:TFLiteExporter", "tflite"))


def exporter(artifact_format: str) -> Exporter:
    """The exporter of ``artifact_format``, imported on first use (converting to ONNX never imports OpenVINO)."""
    return plugin(EXPORTERS, artifact_format, "artifact format", f"exporting {artifact_format!r} artifacts")
