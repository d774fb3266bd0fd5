"""The Keras source adapter: the layer graph, cut points, exit heads, stage runs, costs, export frontends.

A Keras model enters stagewise the same way a torch model does: a factory named
``path/to/file.py:factory`` (or ``package.module:factory``) returning a ``keras.Model``. The
framework is chosen by what the factory returns. Keras 3 on the TensorFlow backend is required
(the TFLite, ONNX and OpenVINO exporters all start from a TensorFlow graph).

Keras stages are NHWC: a Keras-sourced bundle declares ``input.layout = "NHWC"`` and the
runtimes feed images that way.

A factory may set ``model.stagewise_input = {"mean": [...], "std": [...], "size": 224, ...}``
(0-255 units, as for torch) and ``model.stagewise_labels``. Models whose last layer applies a
softmax (``keras.applications`` by default) are turned into logit models that share the same
weights: stagewise's exit scores and calibration work on logits.

Frontends: ONNX through ``tf2onnx.convert.from_function`` on the stage's inference function;
OpenVINO (``openvino.convert_model``) and TFLite (``tf.lite.TFLiteConverter``, with its own
full-integer INT8 and fp16 quantization) from the stage's SavedModel written by
``keras.export.ExportArchive``, Keras 3's own route to other runtimes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from stagewise.errors import ConversionError, InvalidCutPointError  # noqa: E402
from stagewise.extras import require  # noqa: E402

from .heads import LinearHead  # noqa: E402
from .source import UNSTABLE_BN_GAIN, CutPoint, SourceAdapter  # noqa: E402
from .tooling import package_version, quiet  # noqa: E402

OPSET = 17
SIGNATURE = "serving_default"


def require_tensorflow_backend() -> None:
    """Raise unless Keras runs on TensorFlow (the exporters need a TensorFlow graph)."""
    if keras.backend.backend() != "tensorflow":
        raise ConversionError(f"Keras runs on the {keras.backend.backend()!r} backend; stagewise converts Keras models "
                              "on the TensorFlow backend: set KERAS_BACKEND=tensorflow before importing keras")


def is_keras_model(obj: Any) -> bool:
    """True when ``obj`` is a Keras 3 model (checked without importing Keras if nobody did)."""
    module = sys.modules.get("keras")
    return module is not None and isinstance(obj, module.Model)


def keras_version() -> str:
    return f"{keras.__version__} (tensorflow {tf.__version__})"


def to_numpy(value: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def _as_list(value: Any) -> list:
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, (list, tuple)) else [value]


def run_model(model: keras.Model, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """``model``'s outputs (in order) on ``x``, in inference mode, in batches."""
    parts: list[list[np.ndarray]] = []
    for i in range(0, len(x), batch):
        outs = [to_numpy(o) for o in _as_list(model(x[i:i + batch], training=False))]
        if not parts:
            parts = [[] for _ in outs]
        for store, o in zip(parts, outs):
            store.append(o)
    return [np.concatenate(p) for p in parts]


# --- the layer graph ------------------------------------------------------------------------

def _producer(tensor: Any) -> Any:
    return tensor._keras_history.operation


def layer_graph(model: keras.Model) -> tuple[list[Any], dict[Any, list[Any]]]:
    """The model's operations in topological order and, for each, the operations it reads from.

    Only functional models are supported (``keras.applications``, or any model built with the
    functional API); a layer called twice in the model (shared weights) is reported as such.
    """
    if not hasattr(model, "operations") or not hasattr(model, "_nodes"):
        raise ConversionError(f"{type(model).__name__} is not a functional Keras model; early exits need the layer "
                              "graph: build the model with the functional API (keras.Model(inputs, outputs))")
    ops = list(model.operations)
    parents: dict[Any, list[Any]] = {}
    for op in ops:
        nodes = [n for i, n in enumerate(op._inbound_nodes) if f"{id(op)}_ib-{i}" in model._nodes]
        if len(nodes) > 1:
            raise ConversionError(f"layer {op.name!r} is called {len(nodes)} times in the model (shared weights); "
                                  "stagewise cuts only models whose layers are each called once")
        parents[op] = [_producer(t) for t in nodes[0].input_tensors] if nodes else []
    return ops, parents


def _ancestors(op: Any, parents: dict[Any, list[Any]]) -> set:
    seen, stack = {op}, [op]
    while stack:
        for p in parents[stack.pop()]:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def valid_cut_points(model: keras.Model) -> list[str]:
    """Names of the layers after which the model can be cut: a single tensor crosses the cut.

    A cut after layer ``L`` is valid when every layer that does not feed ``L`` reads only ``L``'s
    output or outputs of other such layers (no skip connection jumps over the cut).
    """
    ops, parents = layer_graph(model)
    outputs = {_producer(t) for t in model.outputs}
    valid = []
    for op in ops:
        if isinstance(op, keras.layers.InputLayer) or op in outputs or len(_as_list(op.output)) != 1:
            continue
        before = _ancestors(op, parents)
        if outputs & before:
            continue
        if all(p is op or p not in before for other in ops if other not in before for p in parents[other]):
            valid.append(op.name)
    return valid


def check_cuts(model: keras.Model, cuts: Sequence[str]) -> None:
    """Raise :class:`InvalidCutPointError` for an unknown or invalid cut, listing the valid ones."""
    names = [op.name for op in model.operations]
    valid = valid_cut_points(model)
    for cut in cuts:
        if cut not in names or cut not in valid:
            why = "there is no layer named" if cut not in names else "a skip connection crosses the cut after"
            raise InvalidCutPointError(f"{why} {cut!r}; valid cut points of this model (in order): {', '.join(valid)}")
    order = [valid.index(c) for c in cuts]
    if order != sorted(order) or len(set(order)) != len(order):
        raise InvalidCutPointError(f"cut points must be distinct and in network order; got {list(cuts)}, "
                                   f"valid order: {', '.join(c for c in valid if c in cuts)}")


def logits_model(model: keras.Model) -> keras.Model:
    """``model`` without a final softmax (same weights), or ``model`` itself when it has none."""
    require_tensorflow_backend()
    if len(model.outputs) != 1:
        raise ConversionError(f"the model has {len(model.outputs)} outputs; a classifier has one (the class scores)")
    last = _producer(model.outputs[0])
    softmax = keras.activations.softmax
    if isinstance(last, keras.layers.Softmax) or (
            isinstance(last, keras.layers.Activation) and last.activation is softmax):
        return keras.Model(_single(model.inputs), last._inbound_nodes[0].input_tensors[0], name=f"{model.name}_logits")
    if getattr(last, "activation", None) is softmax:
        config = last.get_config()
        config.update(activation="linear", name=f"{last.name}_logits")
        linear = type(last).from_config(config)
        source = last._inbound_nodes[0].input_tensors[0]
        out = linear(source)
        linear.set_weights(last.get_weights())
        return keras.Model(_single(model.inputs), out, name=f"{model.name}_logits")
    return model


def _single(tensors: list) -> Any:
    return tensors[0] if len(tensors) == 1 else tensors


def split_model(model: keras.Model, cuts: Sequence[str]) -> list[keras.Model]:
    """Segments of ``model`` between consecutive cuts (sharing its layers and weights)."""
    check_cuts(model, cuts)
    ops = {op.name: op for op in model.operations}  # layers and op layers (``x + y`` is an ``add`` op)
    bounds = [model.inputs[0]] + [ops[c].output for c in cuts] + [model.outputs[0]]
    segments = []
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        try:
            segments.append(keras.Model(a, b, name=f"segment{k}"))
        except ValueError as exc:
            raise ConversionError(f"cannot cut the model between {getattr(a, 'name', a)} and {b.name}: {exc}") from exc
    return segments


# --- static costs --------------------------------------------------------------------------

_MAC_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D, keras.layers.Dense)


def _layer_macs(layer: Any, cin: int, out_shape: Sequence[int]) -> int:
    spatial = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
    cout = int(out_shape[-1])
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return spatial * cout * kh * kw
    if isinstance(layer, keras.layers.SeparableConv2D):
        kh, kw = layer.kernel_size
        mid = cin * layer.depth_multiplier
        return spatial * (mid * kh * kw + mid * cout)
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        return spatial * cout * (cin // layer.groups) * kh * kw
    return spatial * cout * cin  # Dense


def count_macs(model: keras.Model, size: tuple[int, int] | None = None) -> int:
    """MACs of one sample through ``model``: convolutions (incl. depthwise/separable) and dense layers.

    Shapes come from the graph; a model built with a dynamic image size is probed once at
    ``size`` (height, width) to learn them.
    """
    layers = [layer for layer in _flat_layers(model) if isinstance(layer, _MAC_LAYERS)]
    shapes = [(layer.input.shape, layer.output.shape) for layer in layers]
    dynamic = any(d is None for a, b in shapes for d in list(a)[1:] + list(b)[1:])
    if dynamic:
        if size is None or any(m is not model for m in _owners(model)):
            return 0
        probe = keras.Model(model.inputs, [t for layer in layers for t in (layer.input, layer.output)])
        x = np.zeros((1, *size, model.inputs[0].shape[-1]), np.float32)
        got = [tuple(o.shape) for o in _as_list(probe(x, training=False))]
        shapes = list(zip(got[0::2], got[1::2]))
    return int(sum(_layer_macs(layer, int(a[-1]), b) for layer, (a, b) in zip(layers, shapes)))


def _owners(model: keras.Model) -> list[Any]:
    """The models whose graphs hold ``model``'s layers (``model`` itself when nothing is nested)."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model)] or [model]


def _flat_layers(model: keras.Model) -> list[Any]:
    layers = []
    for layer in model.layers:
        layers.extend(_flat_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def count_params(model: keras.Model) -> int:
    return int(sum(int(np.prod(w.shape)) for w in model.weights))


# --- SavedModel of a stage --------------------------------------------------------------------

def stage_function(plan: Any) -> Any:
    """The stage as a function from its input to ``{output name: tensor}`` (inference mode)."""
    def serve(x: Any) -> dict:
        out = plan.module(x, training=False)
        out = out if isinstance(out, (list, tuple)) else [out]
        return dict(zip(plan.output_names, out))

    return serve


def input_spec(plan: Any, sample_shape: Sequence[int]) -> Any:
    """A dynamic-batch ``tf.TensorSpec`` for the stage input, named as the manifest names it."""
    return tf.TensorSpec([None, *[int(d) for d in sample_shape[1:]]], tf.as_dtype(plan.input_dtype),
                         name=plan.input_name)


def stage_saved_model(plan: Any, directory: str | os.PathLike, sample_shape: Sequence[int]) -> Path:
    """Write the stage as a SavedModel whose ``serving_default`` signature is ``input -> outputs``.

    Written with ``keras.export.ExportArchive`` (Keras 3's route to TFLite and other runtimes),
    which freezes the weights cleanly for the converters.
    """
    import warnings

    path = Path(directory)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive = keras.export.ExportArchive()
            archive.track(plan.module)
            archive.add_endpoint(SIGNATURE, stage_function(plan), input_signature=[input_spec(plan, sample_shape)])
            archive.write_out(str(path), verbose=False)
    except Exception as exc:  # TensorFlow's tracing raises many unrelated types
        raise ConversionError(f"cannot export Keras stage {plan.name} as a SavedModel: {exc}") from exc
    return path


def _pool_layer(carry: Any, name: str) -> Any:
    rank = len(carry.shape)
    if rank == 4:
        return keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(carry)
    if rank == 3:
        return keras.layers.GlobalAveragePooling1D(name=f"{name}_pool")(carry)
    return keras.layers.Flatten(name=f"{name}_flatten")(carry) if rank != 2 else carry


def attach_head(carry: Any, head: LinearHead, name: str) -> Any:
    """Apply a trained head's Keras layers (pool, optional L2 norm, dense) to the symbolic ``carry``."""
    x = _pool_layer(carry, name)
    if head.normalise:
        x = keras.layers.UnitNormalization(axis=-1, name=f"{name}_l2norm")(x)
    dense = keras.layers.Dense(head.classes, name=f"{name}_logits")
    out = dense(x)
    dense.set_weights([np.asarray(head.weight.T, np.float32), np.asarray(head.bias, np.float32)])
    return out


class KerasSource(SourceAdapter):
    """:class:`~stagewise.converters.source.SourceAdapter` for functional Keras 3 models (TensorFlow backend)."""

    framework = "keras"
    layout = "NHWC"
    openvino_route = "native"

    def version(self) -> str:
        return f"{keras.__version__} (tensorflow {tf.__version__})"

    def prepare(self, model: Any) -> keras.Model:
        """The logit model (same weights), keeping the factory's ``stagewise_input``/``stagewise_labels``."""
        prepared = logits_model(model)
        for attribute in ("stagewise_input", "stagewise_labels"):
            if prepared is not model and hasattr(model, attribute):
                setattr(prepared, attribute, getattr(model, attribute))
        return prepared

    def check_image_size(self, model: keras.Model, size: tuple[int, int]) -> None:
        fixed = tuple(model.inputs[0].shape[1:3])
        if any(d is not None for d in fixed) and fixed != tuple(size):
            raise ConversionError(f"the Keras model takes {fixed[0]}x{fixed[1]} images but the stage is "
                                  f"{size[0]}x{size[1]}; build the model for the stage's input size "
                                  "(or with input_shape=(None, None, 3))")
        if len(model.inputs) != 1:
            raise ConversionError(f"the model has {len(model.inputs)} inputs; a stage reads one image")

    def cut_points(self, model: keras.Model, size: tuple[int, int]) -> list[CutPoint]:
        ops, _ = layer_graph(model)
        valid = set(valid_cut_points(model))
        outputs = {_producer(t) for t in model.outputs}
        probe_layers = [op for op in ops if not isinstance(op, keras.layers.InputLayer) and op not in outputs
                        and len(_as_list(op.output)) == 1]
        probe = keras.Model(model.inputs, [op.output for op in probe_layers])
        shapes = [tuple(o.shape[1:]) for o in _as_list(probe(np.zeros((1, *size, 3), np.float32), training=False))]
        records, total = [], 0
        for op in ops:
            if isinstance(op, _MAC_LAYERS):
                cin = int(op.input.shape[-1]) if op.input.shape[-1] is not None else 0
                out_shape = shapes[probe_layers.index(op)] if op in probe_layers else tuple(op.output.shape[1:])
                total += _layer_macs(op, cin, (1, *out_shape))
            if op not in probe_layers:
                continue
            shape = tuple(int(d) for d in shapes[probe_layers.index(op)])
            reduction = max(1, size[0] // max(1, shape[0])) if len(shape) == 3 else None
            layout = {3: "NHWC", 2: "tokens"}.get(len(shape), "flat")
            records.append(CutPoint(op.name, shape, int(shape[-1]) if shape else 0, reduction, int(total),
                                    op.name in valid, layout))
        return records

    def split(self, model: keras.Model, cuts: Sequence[str]) -> list[keras.Model]:
        require_tensorflow_backend()
        return split_model(model, cuts)

    def exit_stage(self, segment: keras.Model, head: LinearHead, name: str) -> keras.Model:
        logits = attach_head(segment.outputs[0], head, name)
        return keras.Model(segment.inputs[0], [segment.outputs[0], logits], name=name)

    def final_stage(self, segment: keras.Model, head: LinearHead | None, name: str) -> keras.Model:
        if head is None:
            return segment
        return keras.Model(segment.inputs[0], attach_head(segment.outputs[0], head, name), name=name)

    def pixel_input(self, module: keras.Model, preprocess: Any, size: tuple[int, int]) -> keras.Model:
        """``module`` reading uint8 NHWC pixels: a ``Rescaling`` layer (cast, then ``x / std - mean / std``) in front.

        ``Rescaling`` holds its per-channel scale and offset as constants of the traced graph (a
        ``Normalization`` layer's mean and variance are variables, which tf2onnx turns into inputs), stored as
        one row of pixels (width x 3) like the torch adapter's :class:`PixelInput` (torch_source): ONNX Runtime broadcasts a
        trailing axis of 3 channels element by element (4.9 ms against 0.43 ms for a 224 x 224 stem,
        1 thread, Intel Xeon with AVX-512 VNNI; docs/int8.md).
        """
        pixels = keras.Input(shape=(*size, 3), dtype="uint8", name=f"{module.name}_pixels")
        std = np.asarray(preprocess.std, np.float64)
        mean = np.asarray(preprocess.mean, np.float64)
        row = (size[1], 1)
        x = keras.layers.Rescaling(scale=np.tile(1.0 / std, row).tolist(), offset=np.tile(-mean / std, row).tolist(),
                                   name=f"{module.name}_normalise")(pixels)
        return keras.Model(pixels, module(x), name=module.name)

    def run(self, module: keras.Model, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
        return run_model(module, np.ascontiguousarray(x, dtype=np.uint8 if x.dtype == np.uint8 else np.float32), batch)

    def pool(self, carry: np.ndarray) -> np.ndarray:
        if carry.ndim == 4:
            return carry.mean(axis=(1, 2))
        if carry.ndim == 3:
            return carry.mean(axis=1)
        return carry.reshape(len(carry), -1)

    def pooled_features(self, segments: Sequence[keras.Model], x: np.ndarray, device: str = "cpu",
                        pool_last: bool = True) -> list[np.ndarray]:
        """Every segment's output on the batch ``x`` (in turn), pooled to N x C; the last as it is unless
        ``pool_last``. ``device`` is ignored: TensorFlow places the work itself."""
        outputs = []
        for k, segment in enumerate(segments):
            x = self.run(segment, x)[0]
            outputs.append(self.pool(x) if (pool_last or k < len(segments) - 1) else x)
        return outputs

    def fingerprint(self, model: keras.Model) -> str:
        """A digest of every weight's shape and values, in order (not of names, which Keras numbers per
        process: ``functional_3``, ``conv2d_7``)."""
        import hashlib

        digest = hashlib.sha256(str(len(model.weights)).encode())
        for weight in model.weights:
            value = np.ascontiguousarray(to_numpy(weight))
            digest.update(str(value.shape).encode())
            digest.update(value.tobytes())
        return digest.hexdigest()

    def macs(self, module: keras.Model, input_shape: Sequence[int]) -> int:
        return count_macs(module, tuple(input_shape[1:3]))

    def params(self, module: keras.Model) -> int:
        return count_params(module)

    def unstable_normalisation(self, module: keras.Model) -> list[tuple[str, float]]:
        found = []
        for layer in module._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                variance = np.asarray(layer.moving_variance)
                weight = np.abs(np.asarray(layer.gamma)) if layer.gamma is not None else np.ones_like(variance)
                gain = float((weight / np.sqrt(variance + layer.epsilon)).max())
                if gain > UNSTABLE_BN_GAIN:
                    found.append((layer.name, gain))
        return sorted(found, key=lambda item: -item[1])

    # --- export frontends ------------------------------------------------------------------

    def check_formats(self, model: keras.Model, formats: Sequence[str]) -> None:
        """Refuse, before any work, a format this model cannot reach: tf2onnx writes grouped convolutions
        (``Conv2D(groups>1)``) as an invalid ONNX graph, while OpenVINO and TFLite read them."""
        grouped = [layer.name for layer in _flat_layers(model)
                   if isinstance(layer, keras.layers.Conv2D) and getattr(layer, "groups", 1) > 1]
        if "onnx" in formats and grouped:
            raise ConversionError(f"the model has grouped convolutions ({', '.join(grouped[:3])}"
                                  f"{', ...' if len(grouped) > 3 else ''}), which tf2onnx writes as an invalid ONNX "
                                  "graph; convert it with --format openvino or --format tflite (both read them)")

    def export_onnx(self, plan: Any, example: np.ndarray, path: Path) -> dict:
        """Write the stage as ONNX with tf2onnx (opset 17, dynamic batch, NHWC input as the stage is fed)."""
        self.check_formats(plan.module, ("onnx",))
        tf2onnx = require("tf2onnx", "keras", "exporting Keras stages to ONNX")
        try:  # tf2onnx predates numpy 2; Keras ships the patch it uses for its own ONNX export
            from keras.src.export.tf2onnx_lib import patch_tf2onnx

            patch_tf2onnx()
        except ImportError:
            pass
        spec = input_spec(plan, example.shape)
        fn = tf.function(stage_function(plan), input_signature=[spec])
        try:
            with quiet():
                tf2onnx.convert.from_function(fn, input_signature=[spec], opset=OPSET, output_path=str(path))
        except Exception as exc:  # the converter raises many unrelated types
            raise ConversionError(f"tf2onnx failed for Keras stage {plan.name}: {exc}") from exc
        return {"tool": "tf2onnx.convert.from_function", "version": package_version("tf2onnx"), "opset": OPSET}

    def export_openvino(self, plan: Any, example: np.ndarray, workdir: Path) -> Any:
        """An ``ov.Model`` read by OpenVINO from the stage's SavedModel."""
        import openvino as ov

        saved = stage_saved_model(plan, tempfile.mkdtemp(prefix=f"{plan.name}-savedmodel-", dir=workdir),
                                  example.shape)
        with quiet():
            return ov.convert_model(str(saved))

    def _tflite(self, plan: Any, example: np.ndarray, workdir: Path, out: Path, configure: Any = None) -> None:
        saved = stage_saved_model(plan, tempfile.mkdtemp(prefix=f"{plan.name}-savedmodel-", dir=workdir),
                                  example.shape)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=[SIGNATURE])
        if configure:
            configure(converter)
        try:
            with quiet():
                out.write_bytes(converter.convert())
        except Exception as exc:
            raise ConversionError(f"tf.lite.TFLiteConverter failed for stage {plan.name}: {exc}") from exc

    def export_tflite(self, plan: Any, example: np.ndarray, path: Path) -> dict:
        """A float ``.tflite`` (dynamic batch) through ``tf.lite.TFLiteConverter``."""
        self._tflite(plan, example, path.parent, path)
        return {"tool": "tf.lite.TFLiteConverter.from_saved_model (keras.export.ExportArchive)",
                "version": tf.__version__, "batch": "dynamic"}

    def tflite_int8(self, plan: Any, example: np.ndarray, out: Path, calibrate: np.ndarray, integer_io: bool) -> dict:
        """Full-integer post-training INT8 (``TFLITE_BUILTINS_INT8``) with the stage's real inputs."""
        name = plan.input_name

        def representative():
            for i in range(len(calibrate)):
                yield {name: calibrate[i:i + 1]}

        def configure(c: Any) -> None:
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.representative_dataset = representative
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if integer_io:
                if plan.input_dtype != "uint8":  # pixel input is integer already
                    c.inference_input_type = tf.int8
                c.inference_output_type = tf.int8

        self._tflite(plan, example, out.parent, out, configure)
        return {"tool": "tf.lite.TFLiteConverter full-integer post-training quantization", "version": tf.__version__,
                "activations": "int8 per-tensor (asymmetric)", "weights": "int8 per-channel (symmetric)",
                "ops": "TFLITE_BUILTINS_INT8", "io": "int8" if integer_io else "float32",
                "calibration_images": int(len(calibrate))}

    def tflite_fp16(self, plan: Any, example: np.ndarray, out: Path) -> dict:
        """The float model with fp16 weights (``supported_types = [tf.float16]``)."""
        def configure(c: Any) -> None:
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.target_spec.supported_types = [tf.float16]

        self._tflite(plan, example, out.parent, out, configure)
        return {"tool": "tf.lite.TFLiteConverter (supported_types float16)", "weights": "fp16", "compute": "fp32 on CPU"}
