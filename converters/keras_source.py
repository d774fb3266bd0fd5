"""Keras source models: loading, running stages for the build pipeline, the layer graph, costs.

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
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from stagewise.errors import ConversionError  # noqa: E402
from stagewise.images import Preprocess  # noqa: E402


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


class KerasRunner:
    """How the build pipeline runs Keras stages: ``plan.module`` is a ``keras.Model`` whose outputs
    are ``plan.output_names`` in order (``[carry, logits]`` or ``logits``)."""

    framework = "keras"

    @staticmethod
    def version() -> str:
        return keras_version()

    @staticmethod
    def stage_inputs(plans: Sequence[Any], preprocess: Preprocess, images: list[np.ndarray],
                     batch: int = 64) -> list[np.ndarray]:
        """Every stage's fp32 NHWC input for ``images``, computed through the Keras stages."""
        if preprocess.layout != "NHWC":
            raise ConversionError("Keras stages take NHWC input; build the Preprocess with layout='NHWC'")
        per_stage: list[list[np.ndarray]] = [[] for _ in plans]
        index = {p.name: k for k, p in enumerate(plans)}
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            carries: dict[int, np.ndarray] = {}
            for k, plan in enumerate(plans):
                if plan.source["source"] == "image":
                    x = preprocess.tensor(chunk, tuple(plan.source["size"]))
                else:
                    x = carries[index[plan.source["from"]]]
                per_stage[k].append(x)
                if plan.has_carry or k == len(plans) - 1:
                    out = run_model(plan.module, x, batch)
                    if plan.has_carry:
                        carries[k] = out[0]
        return [np.concatenate(xs) for xs in per_stage]

    @staticmethod
    def outputs(plan: Any, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(plan.output_names, run_model(plan.module, np.ascontiguousarray(x, dtype=np.float32))))


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
    from stagewise.errors import InvalidCutPointError

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
    bounds = [model.inputs[0]] + [model.get_layer(c).output for c in cuts] + [model.outputs[0]]
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

SIGNATURE = "serving_default"


def stage_function(plan: Any) -> Any:
    """The stage as a function from its input to ``{output name: tensor}`` (inference mode)."""
    def serve(x: Any) -> dict:
        out = plan.module(x, training=False)
        out = out if isinstance(out, (list, tuple)) else [out]
        return dict(zip(plan.output_names, out))

    return serve


def input_spec(plan: Any, sample_shape: Sequence[int]) -> Any:
    """A dynamic-batch ``tf.TensorSpec`` for the stage input, named as the manifest names it."""
    return tf.TensorSpec([None, *[int(d) for d in sample_shape[1:]]], tf.float32, name=plan.input_name)


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
