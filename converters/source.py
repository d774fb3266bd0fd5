"""The source-adapter interface: what the converter needs from a training framework.

Two adapters implement it, :class:`~stagewise.converters.torch_source.TorchSource` and
:class:`~stagewise.converters.keras_source.KerasSource`; everything above them (stage plans,
exit heads, the export pipeline, the build) is written once against this interface. Adapters
are imported on first use, so a Keras user never imports torch and a torch user never imports
TensorFlow.

An adapter promises:

* ``cut_points(model, size)``: every candidate cut as a :class:`CutPoint`, in graph order,
  without needing any data (one forward pass on a zero image of ``size``);
* ``split(model, cuts)``: segments between consecutive cuts (composing them gives the model);
* ``exit_stage(segment, head, name)`` / ``final_stage(segment, head, name)``: a segment with a
  :class:`~stagewise.converters.heads.LinearHead` attached, returning ``(carry, logits)`` or
  ``logits``;
* ``run(module, x)``: a stage module's outputs, in order, on a numpy batch (inference mode);
* ``pixel_input(module, preprocess, size)``: an image-reading stage module wrapped so it takes
  uint8 NHWC pixels and normalises them (cast, mean/std, layout) inside the exported graph;
* ``pool(carry)``: the pooled features a head sees, by the carry's layout;
* ``pooled_features(segments, x, device, pool_last)``: the segments run in turn on a batch, each
  output pooled (:class:`~stagewise.converters.features.FeatureStore`); ``fingerprint(model)``:
  a digest of the model's weights (the feature cache's key);
* ``train_exits(segments, images, preprocess, size, classes, training, held_out)``: heads trained
  by the framework (conv/mlp heads, joint fine-tuning), and ``given_exits(model, cuts)``: the
  trained heads a model carries — torch only, Keras raises a ``ConversionError``;
* ``macs``/``params``: static costs; ``version()``;
* frontends used by the exporters: ``export_onnx``, ``export_openvino`` (an ``ov.Model``),
  ``export_tflite``; optional ``tflite_int8``/``tflite_fp16`` when the framework has its own
  TFLite quantizer (otherwise the AI Edge Quantizer works on the float ``.tflite``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from stagewise.errors import ConversionError

from .tooling import plugin


#: The layout of a cube carry (C = H = W, e.g. Swin at 384 px: 96 x 96 x 96), which its shape cannot tell.
AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class CutPoint:
    """A place after which a model can be cut (in the style of timm's ``feature_info``).

    ``name`` is the module (torch) or layer (Keras) whose output crosses the cut; ``shape`` is
    that output's shape for one image (without the batch axis); ``channels`` its channel count;
    ``reduction`` the input size divided by the output's spatial size (None for token or flat
    outputs); ``macs`` the multiply-accumulates from the input up to and including this point;
    ``single_tensor`` whether only this one tensor crosses the cut (only such cuts are valid);
    ``layout`` how an exit head pools it: ``NCHW``, ``NHWC``, ``tokens`` or ``flat``, or
    :data:`AMBIGUOUS` for a cube feature map (C = H = W) that no exit can pool.
    """

    name: str
    shape: tuple[int, ...]
    channels: int
    reduction: int | None
    macs: int
    single_tensor: bool
    layout: str = "NCHW"

    def to_dict(self) -> dict:
        return asdict(self)


class SourceAdapter(Protocol):
    """What a training framework provides to the converter (see the module docstring)."""

    framework: str
    layout: str

    def version(self) -> str: ...

    def accepts(self, model: Any) -> bool: ...

    def prepare(self, model: Any) -> Any: ...

    def check_image_size(self, model: Any, size: tuple[int, int]) -> None: ...

    def cut_points(self, model: Any, size: tuple[int, int]) -> list[CutPoint]: ...

    def split(self, model: Any, cuts: Sequence[str]) -> list[Any]: ...

    def exit_stage(self, segment: Any, head: Any, name: str) -> Any: ...

    def final_stage(self, segment: Any, head: Any | None, name: str) -> Any: ...

    def pixel_input(self, module: Any, preprocess: Any, size: tuple[int, int]) -> Any: ...

    def run(self, module: Any, x: np.ndarray) -> list[np.ndarray]: ...

    def pool(self, carry: np.ndarray) -> np.ndarray: ...

    def pooled_features(self, segments: Sequence[Any], x: np.ndarray, device: str = "cpu",
                        pool_last: bool = True) -> list[np.ndarray]: ...

    def fingerprint(self, model: Any) -> str: ...

    def train_exits(self, segments: Sequence[Any], images: Any, preprocess: Any, size: tuple[int, int],
                    classes: int, training: Any, held_out: Any = None) -> tuple[list, list, dict]: ...

    def given_exits(self, model: Any, cuts: Sequence[str]) -> tuple[list, list, dict]: ...

    def macs(self, module: Any, input_shape: Sequence[int]) -> int: ...

    def params(self, module: Any) -> int: ...

    def unstable_normalisation(self, module: Any) -> list[tuple[str, float]]:
        """The batch-normalisation layers of ``module`` that scale their input by more than
        :data:`UNSTABLE_BN_GAIN` (a running variance near zero), with that gain, largest first."""
        ...


UNSTABLE_BN_GAIN = 1e3
"""A batch-normalisation layer that multiplies its input by more than this (``|gamma| / sqrt(var + eps)``) turns
float rounding into output differences no exporter can avoid."""


SOURCES: dict[str, tuple[str, str, str]] = {
    "torch": ("stagewise.converters.torch_source", "TorchSource", "torch"),
    "keras": ("stagewise.converters.keras_source", "KerasSource", "keras"),
}
"""Source frameworks: adapter module, class and the ``stagewise[...]`` extra that installs it."""


def source_named(framework: str) -> SourceAdapter:
    """The adapter of ``framework`` (``"torch"`` or ``"keras"``), imported on first use."""
    return plugin(SOURCES, framework, "source framework", f"converting a {framework} model")


def source_of(model: Any) -> SourceAdapter:
    """The adapter for ``model``: a ``torch.nn.Module`` or a ``keras.Model``.

    Decided from the frameworks already imported (whoever built the model imported them), so
    asking never imports a framework the model does not come from.
    """
    if "keras" in sys.modules and isinstance(model, sys.modules["keras"].Model):
        return source_named("keras")
    if "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        return source_named("torch")
    raise ConversionError(f"the model is a {type(model).__module__}.{type(model).__name__}; stagewise converts "
                          "torch.nn.Module and keras.Model classifiers")
