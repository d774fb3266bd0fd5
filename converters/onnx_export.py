"""The ONNX exporter: the source's ONNX frontend, verification on ONNX Runtime, INT8 with ONNX Runtime's quantizer.

INT8 is ONNX Runtime's static QDQ quantization (per-tensor activations, per-channel weights, in the
element types of the build machine's CPU family: uint8 x int8 on x86, int8 x int8 on ARM),
calibrated on the stage's real inputs after ``quant_pre_process``. The activation ranges are computed
once per stage and calibration method and reused from ONNX Runtime's calibration cache by every later
candidate. When the fully quantized stage fails the INT8 gate, the search
(:meth:`OnnxExporter.quantize_mixed`, within ``--int8-search-seconds``):

1. tries every calibration recipe of :func:`recipes` (MinMax, Percentile, Entropy, each with
   8-bit and with 7-bit weights, ``reduce_range``) and keeps the first that passes;
2. else ranks the weighted nodes (Conv, Gemm, MatMul) of the best recipe by what keeping each
   one alone in float does to the stage's logits, measured on ONNX Runtime's own CPU kernels,
   and excludes (``nodes_to_exclude``) the 1, 2, 4, … most sensitive until one passes,
   while at least one weighted node stays INT8.

The ranking runs the real kernels on purpose: on x86 CPUs without VNNI, ONNX Runtime's uint8 x
int8 convolutions add pairs of products in int16 with saturation, so a layer whose inputs and
weights both use their full range is wrecked by the kernel, not by the quantize/dequantize pair
that ONNX Runtime's QDQ debugging tools (``qdq_loss_debug``) measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from stagewise.exits import GRAPH_SCORES
from stagewise.machine import family
from stagewise.runtimes.base import DECISION_OUTPUTS, INVERSE_TEMPERATURE

from .export import (RANKING_IMAGES, Exported, Exporter, Judge, SearchClock, StageInputs, TensorSpec,
                     exclude_most_sensitive, try_recipes)
from .options import BuildOptions
from .plans import StagePlan
from .tooling import quiet

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Op types the mixed-precision search may keep in float (the ones with INT8 weights)."""


_TYPE_NAMES = {"QUInt8": "uint8", "QInt8": "int8"}


@dataclass(frozen=True)
class Recipe:
    """One ONNX Runtime static quantization setting: calibration method, 7-bit weights (``reduce_range``) and the
    activation and weight types (``QuantType`` names; uint8 x int8 unless a name says otherwise)."""

    calibration: str = "MinMax"
    reduce_range: bool = False
    activations: str = "QUInt8"
    weights: str = "QInt8"

    @property
    def name(self) -> str:
        types = "" if (self.activations, self.weights) == ("QUInt8", "QInt8") else \
            f", {_TYPE_NAMES[self.activations]} x {_TYPE_NAMES[self.weights]}"
        return f"{self.calibration}, {7 if self.reduce_range else 8}-bit weights{types}"


ELEMENT_TYPES = {"x86": ("QUInt8", "QInt8"), "arm": ("QInt8", "QInt8")}
"""Activation x weight types per CPU family: uint8 x int8 on x86, the types ONNX Runtime's x86 kernels run fastest
(int8 x int8 ran at 0.67-0.92x of fp32 and uint8 x uint8 at 0.19-0.27x on EfficientNet-Lite on an AVX2 CPU,
``benchmarks/int8_recipes``); int8 x int8 on ARM, whose dot-product kernels take signed pairs."""


def recipes(machine: str | None = None) -> tuple[Recipe, ...]:
    """The recipes the search tries, in order (the first is what ``--no-int8-mixed`` uses): MinMax, Percentile and
    Entropy calibration, each with 8-bit and with 7-bit weights, in the element types of the build machine's CPU
    family (:data:`ELEMENT_TYPES`; the bundle should be built on the device's family)."""
    activations, weights = ELEMENT_TYPES.get(family(machine), ELEMENT_TYPES["x86"])
    return tuple(Recipe(method, reduce, activations, weights) for method in ("MinMax", "Percentile", "Entropy")
                 for reduce in (False, True))


class _Batches(CalibrationDataReader):
    """Stage inputs in batches; ``set_range`` lets ONNX Runtime calibrate a few batches at a time."""

    def __init__(self, input_name: str, tensors: np.ndarray, batch: int = 16):
        self._chunks = [{input_name: tensors[i:i + batch]} for i in range(0, len(tensors), batch)]
        self._next = iter(self._chunks)

    def get_next(self) -> dict | None:
        return next(self._next, None)

    def __len__(self) -> int:
        return len(self._chunks)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self._chunks[start_index:end_index])


def _spec(arg: ort.NodeArg) -> TensorSpec:
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type),
                      tuple(d if isinstance(d, int) else None for d in arg.shape))


class OnnxExporter(Exporter):
    """:class:`~stagewise.converters.export.Exporter` for ``.onnx`` artifacts (run by ONNX Runtime)."""

    format = "onnx"
    runtime = "onnxruntime"

    def export(self, plan: StagePlan, workdir: Path, inputs: StageInputs, options: BuildOptions) -> Exported:
        path = workdir / f"{plan.name}.onnx"
        record = plan.adapter.export_onnx(plan, inputs.verify[:1], path)
        return Exported((path,), record)

    def signature(self, files: Sequence[Path]) -> tuple[list[TensorSpec], list[TensorSpec]]:
        session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
        return [_spec(a) for a in session.get_inputs()], [_spec(a) for a in session.get_outputs()]

    def quantize(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                 options: BuildOptions, exclude: Sequence[str] = (), tag: str = "int8",
                 recipe: Recipe | None = None) -> Exported:
        """ONNX Runtime's static QDQ quantization by ``recipe`` (default: the first of :func:`recipes`) of every
        node but ``exclude`` (node names of the pre-processed float model, see :meth:`prepared`). The activation
        ranges come from one calibration pass per stage and calibration method over all the calibration inputs,
        a batch at a time (histogram methods keep each batch's tensors in memory), kept in ONNX Runtime's
        calibration cache (:meth:`ranges`) for every later recipe and exclusion step."""
        recipe = recipe or recipes()[0]
        out = workdir / f"{plan.name}.{tag}.onnx"
        calibrate = inputs.calibrate
        with quiet():  # the histogram calibrators print their progress
            quantize_static(str(self.prepared(fp32, workdir)), str(out), _Batches(plan.input_name, calibrate),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=recipe.reduce_range,
                            activation_type=QuantType[recipe.activations], weight_type=QuantType[recipe.weights],
                            nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod[recipe.calibration],
                            extra_options={"CalibStridedMinMax": 1},
                            calibration_cache_path=str(self.ranges(fp32, workdir, recipe)))
        return Exported((out,), {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                                 "per_channel": True, "activations": _TYPE_NAMES[recipe.activations],
                                 "weights": _TYPE_NAMES[recipe.weights], "element_types_for": family(),
                                 "calibration": recipe.calibration, "reduce_range": recipe.reduce_range,
                                 "recipe": recipe.name,
                                 "calibration_images": int(len(calibrate)), "float_layers": list(exclude)})

    def decision(self, plan: StagePlan, exported: Exported, workdir: Path) -> Exported | None:
        """``exported`` with the exit decision outputs of ``plan``'s exit score in its graph (:func:`add_decision`;
        ``None`` for a score the graph cannot compute, a stage that decides on more than its own probabilities, or a
        plan that asks for none).
        The record is the manifest's ``decision`` entry of the artifact."""
        score = plan.exit["score"]
        if not plan.decides or score not in GRAPH_SCORES or plan.exit.get("combine", "own") != "own":
            return None
        src = exported.files[0]
        out = workdir / f"{src.stem}.decision.onnx"
        record = add_decision(src, out, "logits", score)
        return None if record is None else Exported((out,), record)

    def prepared(self, fp32: Exported, workdir: Path) -> Path:
        """The float model after ONNX Runtime's quantization pre-processing (made once per stage)."""
        path = workdir / f"{fp32.files[0].stem}.prepared.onnx"
        if not path.exists():
            quant_pre_process(str(fp32.files[0]), str(path), skip_symbolic_shape=True)
        return path

    @staticmethod
    def ranges(fp32: Exported, workdir: Path, recipe: Recipe) -> Path:
        """Where the activation ranges of one stage by ``recipe``'s calibration method are cached (ONNX Runtime's
        ``calibration_cache_path``: written by the first quantization, read by every later one)."""
        return workdir / f"{fp32.files[0].stem}.{recipe.calibration}.ranges.json"

    def sensitivity(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                    options: BuildOptions, recipe: Recipe, clock: SearchClock | None = None) -> list[tuple[str, float]]:
        """Weighted nodes with the logit SNR (dB) of the stage quantized by ``recipe`` with only that node in
        float, most helpful first, on :data:`RANKING_IMAGES` calibration inputs through ONNX Runtime's CPU
        kernels (nodes not reached within the ``clock`` rank last)."""
        x = inputs.calibrate[:RANKING_IMAGES]
        nodes = [n.name for n in onnx.load(str(self.prepared(fp32, workdir))).graph.node if n.op_type in WEIGHTED]
        return self.rank_by_logit_snr(plan, fp32, nodes, lambda node: self.quantize(
            plan, fp32, workdir, inputs, options, [node], tag="rank", recipe=recipe), x, clock)

    def quantize_mixed(self, plan: StagePlan, fp32: Exported, workdir: Path, inputs: StageInputs,
                       options: BuildOptions, judge: Judge, clock: SearchClock | None = None) -> Exported:
        """The first of :func:`recipes` whose full INT8 passes the gate; else the best of them with the
        1, 2, 4, … most sensitive weighted nodes (:meth:`sensitivity`) in float until one passes, while at
        least one stays INT8; else the best recipe's full INT8 model; all within the ``clock``. The record's
        ``search`` lists every try."""
        found = try_recipes(recipes(), lambda k, recipe: self.quantize(plan, fp32, workdir, inputs, options,
                                                                       tag=f"int8.r{k}", recipe=recipe),
                            judge, clock)
        recipe, full, tried = found.recipe, found.full, found.tried
        if found.met or (clock is not None and clock.expired()):
            return Exported(full.files, dict(full.record, search=tried))
        ranking = self.sensitivity(plan, fp32, workdir, inputs, options, recipe, clock)
        record = {"search": tried, "sensitivity": f"logit SNR with one weighted node in float ({recipe.name}, "
                                                  f"{min(RANKING_IMAGES, len(inputs.calibrate))} calibration images, "
                                                  "ONNX Runtime CPU kernels)",
                  "ranking": [{"node": node, "logit_snr_db": round(snr, 2)} for node, snr in ranking]}
        mixed = exclude_most_sensitive([node for node, _ in ranking], lambda count, exclude: self.quantize(
            plan, fp32, workdir, inputs, options, exclude, tag=f"mixed{count}", recipe=recipe),
            judge, tried, recipe.name, clock)
        chosen = full if mixed is None else mixed
        return Exported(chosen.files, dict(chosen.record, **record))


def add_decision(src: Path, dst: Path, logits: str, score: str) -> dict | None:
    """Write ``src`` to ``dst`` with two more outputs: the exit score ``score`` of its ``logits`` (N x 1) and their
    argmax (N x 1, int64), computed in float32 on ``softmax(logits * s)`` where ``s`` (1 value) is fed to one more input, the
    inverse of the stage's temperature (``max_logit`` reads the raw logits and has no such input; the ONNX Runtime
    adapter feeds 1 when it is not told the stage's temperature). An input with a default value (an initializer
    listed as an input) would spare that, but ONNX Runtime warns about it at every load and cannot bind it. Temperatures are
    fitted after export and refitted by ``stagewise calibrate``, so the graph holds none. Only ops that kept their
    signature since opset 13 (and their meaning for 2-D logits since opset 1) are used, so any exported opset works.
    Returns the manifest's ``decision`` record, or ``None`` (nothing written) when the logits are not N x a known
    number (at least 2) of classes."""
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    declared = next(o for o in graph.output if o.name == logits)
    dims = declared.type.tensor_type.shape.dim
    if len(dims) != 2 or dims[1].dim_value < 2:  # not N x a known class count: the executor scores the logits
        return None
    classes = dims[1].dim_value
    names = {"output": DECISION_OUTPUTS[0], "label": DECISION_OUTPUTS[1], "inverse_temperature": INVERSE_TEMPERATURE}
    constants = {"decision_first": np.array([0], np.int64), "decision_second": np.array([1], np.int64),
                 "decision_eps": np.array(1e-12, np.float32), "decision_ones": np.ones((classes, 1), np.float32),
                 "decision_entropy_scale": np.array(1.0 / np.log(classes), np.float32),
                 "decision_unit": np.array(1.0, np.float32)}
    nodes = []
    values = logits
    if declared.type.tensor_type.elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [logits], ["decision_logits"], to=TensorProto.FLOAT))
        values = "decision_logits"
    if score == "max_logit":
        del names["inverse_temperature"]
    else:
        nodes += [helper.make_node("Mul", [values, names["inverse_temperature"]], ["decision_scaled"]),
                  helper.make_node("Softmax", ["decision_scaled"], ["decision_probs"], axis=1)]
        values = "decision_probs"
        graph.input.append(helper.make_tensor_value_info(names["inverse_temperature"], TensorProto.FLOAT, [1]))
    top = 2 if score == "margin" else 1
    constants["decision_k"] = np.array([top], np.int64)
    per_class = score in ("max_softmax", "max_logit")  # TopK's values are the score: no node more (each costs ~1 us)
    nodes.append(helper.make_node("TopK", [values, "decision_k"], [names["output"] if per_class else "decision_top",
                                                                   names["label"] if top == 1 else "decision_index"],
                                  axis=1))
    if score == "margin":
        nodes += [helper.make_node("Gather", ["decision_index", "decision_first"], [names["label"]], axis=1),
                  helper.make_node("Gather", ["decision_top", "decision_first"], ["decision_top1"], axis=1),
                  helper.make_node("Gather", ["decision_top", "decision_second"], ["decision_top2"], axis=1),
                  helper.make_node("Sub", ["decision_top1", "decision_top2"], [names["output"]])]
    elif score == "entropy":  # 1 + sum(p log p) / log(C), p clipped below at 1e-12 as stagewise.exits.confidence does
        nodes += [helper.make_node("Max", [values, "decision_eps"], ["decision_clipped"]),
                  helper.make_node("Log", ["decision_clipped"], ["decision_log"]),
                  helper.make_node("Mul", ["decision_clipped", "decision_log"], ["decision_plogp"]),
                  helper.make_node("MatMul", ["decision_plogp", "decision_ones"], ["decision_sum"]),
                  helper.make_node("Mul", ["decision_sum", "decision_entropy_scale"], ["decision_scaled_sum"]),
                  helper.make_node("Add", ["decision_scaled_sum", "decision_unit"], [names["output"]])]
    used = {i for n in nodes for i in n.input}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items() if k in used)
    graph.node.extend(nodes)
    graph.output.extend([helper.make_tensor_value_info(names["output"], TensorProto.FLOAT, ["n", 1]),
                         helper.make_tensor_value_info(names["label"], TensorProto.INT64, ["n", 1])])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return {"score": score, **names}
