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

:class:`Exporter` implements ``verify`` (source model vs exported model on real inputs) and
``agreement`` (top-1 agreement of two exported models) once for every format on top of ``open``.
:func:`export_stage` is the pipeline: export, check the declared inputs/outputs, verify,
optionally fp16, quantize, measure the agreement with the float model and time both on the build
machine (:meth:`Exporter.host_speed`), keep INT8 only when it meets the tolerance and, if asked, a
minimum speed-up (:func:`keep_int8`), and list the chosen files for the manifest.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from stagewise.errors import ConversionError, VerificationError
from stagewise.progress import note
from stagewise.runtimes.base import RUNTIMES, LoadOptions, StageIO

from .options import BuildOptions
from .plans import StagePlan
from .tooling import plugin

FP16_TOLERANCE = 2e-2
"""Relative tolerance (of the largest output magnitude) of fp16-weight models against the source."""
CONFIDENCE = 0.95
"""Confidence of the Wilson interval around a measured top-1 agreement."""
RANKING_IMAGES = 64
"""Calibration images a mixed-precision search ranks layers on (quantizing and measuring on them)."""
TIMED_RUNS = 30
"""Single-image runs per model when the build machine times a quantized model against its float version."""


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement of a quantized model with its float reference on ``n`` images, with its Wilson interval."""

    agreeing: int
    n: int

    @property
    def rate(self) -> float:
        return self.agreeing / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """The two-sided :data:`CONFIDENCE` Wilson score interval of the agreement rate."""
        from scipy.stats import binomtest

        if not self.n:
            return 0.0, 1.0
        ci = binomtest(self.agreeing, self.n).proportion_ci(CONFIDENCE, method="wilson")
        return float(ci.low), float(ci.high)

    def meets(self, tolerance: float) -> bool:
        """Whether the interval's lower end reaches ``tolerance``."""
        return self.interval[0] >= tolerance

    def record(self) -> dict:
        low, high = self.interval
        return {"agreement_with_fp32": self.rate, "agreement_images": self.n, "agreement_interval": [low, high],
                "interval": f"Wilson {100 * CONFIDENCE:g}%"}


def minimum_agreeing(n: int, tolerance: float) -> int:
    """The fewest agreeing images out of ``n`` whose Wilson interval's lower end reaches ``tolerance`` (n + 1: none)."""
    for k in range(int(np.floor(tolerance * n)), n + 1):
        if Agreement(k, n).meets(tolerance):
            return k
    return n + 1


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
                "host": f"{platform.machine()} {platform.processor() or ''}".strip()}


Judge = Callable[["Exported"], Agreement]
"""Measures a quantized candidate's agreement with the float reference (on the held-back images)."""


@dataclass(frozen=True)
class RecipeSearch:
    """What :func:`try_recipes` found: every try, and the first recipe meeting the tolerance (``met``) or else the
    one with the highest agreement, with its fully quantized model."""

    tried: list[dict]
    recipe: Any
    full: "Exported"
    met: bool


def try_recipes(recipes: Sequence[Any], quantize: Callable[[int, Any], "Exported"], judge: Judge,
                tolerance: float) -> RecipeSearch:
    """Fully quantize by each of ``recipes`` in turn (``quantize(k, recipe)``; a recipe has a ``name``) until one's
    agreement meets ``tolerance``."""
    tried: list[dict] = []
    best = None
    for k, recipe in enumerate(recipes):
        full = quantize(k, recipe)
        verdict = judge(full)
        tried.append({"recipe": recipe.name, "float_layers": [], "agreement_with_fp32": verdict.rate})
        if verdict.meets(tolerance):
            return RecipeSearch(tried, recipe, full, True)
        if best is None or verdict.agreeing > best[1].agreeing:
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
                           tolerance: float, tried: list[dict], recipe: str) -> "Exported | None":
    """The first candidate with the first 1, 2, 4, … of ``ranked`` (most sensitive first) kept in float —
    ``make(count, ranked[:count])`` — whose agreement meets ``tolerance``, or None. Every try is appended to
    ``tried`` with its record's ``float_layers``."""
    for count in exclusion_counts(len(ranked)):
        candidate = make(count, list(ranked[:count]))
        verdict = judge(candidate)
        tried.append({"recipe": recipe, "float_layers": candidate.record["float_layers"],
                      "agreement_with_fp32": verdict.rate})
        if verdict.meets(tolerance):
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
    """Real inputs of one stage (uint8 pixels or fp32 tensors): for verification, quantization and agreement."""

    verify: np.ndarray
    calibrate: np.ndarray
    agree: np.ndarray


@dataclass(frozen=True)
class Exported:
    """Files of one artifact variant (main model file first) and what produced them."""

    files: tuple[Path, ...]
    record: dict


class Exporter:
    """Base of the ONNX, OpenVINO and TFLite exporters (see the module docstring)."""

    format: str = ""
    runtime: str = ""
    suffixes: tuple[str, ...] = ()
    io_dtypes: tuple[str, ...] = ("float32",)

    def export(self, plan: StagePlan, workdir: Path, inputs: StageInputs, options: BuildOptions) -> Exported:
        raise NotImplementedError

    def signature(self, files: Sequence[Path]) -> tuple[list[TensorSpec], list[TensorSpec]]:
        raise NotImplementedError

    def quantize(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                 options: BuildOptions) -> Exported:
        raise NotImplementedError

    def quantize_mixed(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                       options: BuildOptions, judge: Judge) -> Exported:
        """INT8 that meets the tolerance by keeping sensitive layers in float, where the format's tools can;
        this base version quantizes everything once. The record lists the layers left in float."""
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
                raise VerificationError(
                    f"stage {plan.name} ({self.format}): output {name!r} differs from {plan.framework} by {diff:.3g} "
                    f"(tolerance {tolerance:g} relative); the exporter did not reproduce this stage faithfully")
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
                          quantize_without: Callable[[Any], Exported], x: np.ndarray) -> list[tuple[Any, float]]:
        """``units`` (what a mixed-precision search may keep in float) with the logit SNR (dB) against the float
        model of the stage quantized with only that unit in float (``quantize_without(unit)``), run on ``x``
        through this format's runtime; most helpful first."""
        reference = self.run(plan, fp32.files, x)["logits"]
        scores = [(unit, logit_snr(reference, self.run(plan, quantize_without(unit).files, x)["logits"]))
                  for unit in units]
        return sorted(scores, key=lambda item: -item[1])

    def judge(self, plan: StagePlan, reference: Exported, inputs: np.ndarray, threads: int = 1) -> Judge:
        """A :data:`Judge` against ``reference`` on ``inputs`` (the reference runs once)."""
        expected = self.run(plan, reference.files, inputs, threads)["logits"].argmax(1)

        def judge(candidate: Exported) -> Agreement:
            got = self.run(plan, candidate.files, inputs, threads)["logits"].argmax(1)
            return Agreement(int((got == expected).sum()), int(len(expected)))
        return judge


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


def keep_int8(record: dict, agreement: Agreement, speed: HostSpeed, options: BuildOptions) -> bool:
    """The fallback shared by every exporter: record the INT8 model's top-1 agreement with the float model
    and its speed on the build machine in ``record``, and say whether it is kept — the agreement interval's
    lower end reaches ``options.int8_tolerance`` and the INT8 model is at least ``options.int8_min_speedup``
    times as fast as the float one (``record["rejected"]`` says which failed)."""
    accurate = agreement.meets(options.int8_tolerance)
    fast = speed.speedup >= options.int8_min_speedup
    record.update(agreement.record(), **speed.record(), tolerance=options.int8_tolerance,
                  min_speedup=options.int8_min_speedup, kept_fp32=not (accurate and fast))
    if not accurate:
        record["rejected"] = "agreement below the tolerance"
    elif not fast:
        record["rejected"] = (f"{speed.speedup:.2f}x the float model's speed on the build machine, below the "
                              f"{options.int8_min_speedup:g}x --int8-min-speedup")
    return accurate and fast


def export_stage(exporter: Exporter, plan: StagePlan, workdir: Path, inputs: StageInputs,
                 options: BuildOptions) -> tuple[dict, dict[str, Path]]:
    """The pipeline for one stage and one format: returns the manifest artifact and ``{bundle path: file}``."""
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
        judge = exporter.judge(plan, reference, inputs.agree, options.threads)
        provable = minimum_agreeing(len(inputs.agree), options.int8_tolerance) <= len(inputs.agree)
        if options.int8_mixed and provable:
            quantized = exporter.quantize_mixed(plan, fp32, workdir, inputs, options, judge)
        else:
            quantized = exporter.quantize(plan, fp32, workdir, inputs, options)
        check_signature(exporter, plan, quantized, integer_io=options.int8_io and exporter.format == "tflite")
        record = dict(quantized.record)
        if options.int8_mixed and not provable:
            record["search_skipped"] = (f"even {len(inputs.agree)} agreeing images out of {len(inputs.agree)} leave the "
                                        f"Wilson interval below the {options.int8_tolerance:g} tolerance; give more "
                                        "calibration images or a lower --int8-tolerance")
        agreement = judge(quantized)
        speed = exporter.host_speed(plan, reference, quantized, inputs.agree, options.threads)
        kept = keep_int8(record, agreement, speed, options)
        if reference is not fp32:
            record["float_reference"] = "fp16 weights"
        artifact["quantization"] = record
        if kept:
            artifact["precision"], chosen = "int8", quantized
            if record.get("float_layers"):
                note(f"stage {plan.name} ({exporter.format}): mixed INT8, {len(record['float_layers'])} layer(s) kept "
                     f"in float, agreement {100 * agreement.rate:.1f}% of {agreement.n} images")
        elif agreement.meets(options.int8_tolerance):
            note(f"stage {plan.name} ({exporter.format}): INT8 meets the agreement tolerance but runs at "
                 f"{record['rejected']}: kept {artifact['precision']}")
        else:
            note(f"stage {plan.name} ({exporter.format}): INT8 agrees with the float model on {100 * agreement.rate:.1f}% "
                 f"of {agreement.n} images (95% interval from {100 * agreement.interval[0]:.1f}%), below the "
                 f"{100 * options.int8_tolerance:g}% tolerance: kept {artifact['precision']}"
                 + ("" if provable else f" ({len(inputs.agree)} images cannot show that tolerance: no mixed-precision search)"))
    target = exporter.target(chosen.files, options)
    if target is not None:
        artifact["target"] = target
    rels = [f"{exporter.format}/{plan.name}{suffix}" for suffix in exporter.suffixes]
    artifact["files"] = [{"path": rel} for rel in rels]
    return artifact, dict(zip(rels, chosen.files))


EXPORTERS: dict[str, tuple[str, str, str]] = {
    "onnx": ("stagewise.converters.onnx_export", "OnnxExporter", "onnxruntime"),
    "openvino": ("stagewise.converters.openvino_export", "OpenVinoExporter", "openvino-convert"),
    "tflite": ("stagewise.converters.tflite_export", "TFLiteExporter", "tflite"),
}
"""Artifact formats: exporter module, class and the ``stagewise[...]`` extra with its tools."""


def exporter(artifact_format: str) -> Exporter:
    """The exporter of ``artifact_format``, imported on first use (converting to ONNX never imports OpenVINO)."""
    return plugin(EXPORTERS, artifact_format, "artifact format", f"exporting {artifact_format!r} artifacts")
