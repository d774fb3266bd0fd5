"""The source-adapter interface: what the converter needs from a training framework.

Two adapters implement it, :class:`~stagewise.converters.torch_source.TorchSource` and
:class:`~stagewise.converters.keras_source.KerasSource`; everything above them (stage plans,
exit heads, the export pipeline, the build) is written once against :class:`SourceAdapter`.
Adapters are registered by module path (:func:`register_source`) and imported on first use, so a
Keras user never imports torch and a torch user never imports TensorFlow.

An adapter must provide (abstract in :class:`SourceAdapter`):

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
* ``prepare``, ``check_image_size``, ``macs``/``params`` (static costs), ``version()``.

Optional capabilities have defaults here that refuse with a :class:`ConversionError` saying what
to do instead, or return a declared "not supported" value:

* ``train_exits(...)`` (conv/mlp heads, joint fine-tuning) and ``given_exits(model, cuts)`` (the
  trained heads a model carries): refused;
* ``glance_stage(model, size)`` (a stage with a CAM output for glance and focus): refused;
* the frontends the exporters ask for: ``export_onnx``, ``export_openvino`` (an ``ov.Model``),
  ``export_tflite``: refused; ``openvino_route``: the route OpenVINO reads a stage by (``onnx``);
* ``tflite_int8``/``tflite_fp16``: ``None`` (no TFLite quantizer of its own: the AI Edge
  Quantizer works on the float ``.tflite``);
* ``check_formats(model, formats)``: accepts every format; ``unstable_normalisation(module)``: none.
"""

from __future__ import annotations

import abc
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.errors import ConversionError

from .tooling import Plugin, plugin


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


class SourceAdapter(abc.ABC):
    """What a training framework provides to the converter (see the module docstring)."""

    framework: str = ""
    layout: str = "NCHW"
    openvino_route: str = "onnx"

    @abc.abstractmethod
    def version(self) -> str: ...

    @abc.abstractmethod
    def prepare(self, model: Any) -> Any: ...

    @abc.abstractmethod
    def check_image_size(self, model: Any, size: tuple[int, int]) -> None: ...

    @abc.abstractmethod
    def cut_points(self, model: Any, size: tuple[int, int]) -> list[CutPoint]: ...

    @abc.abstractmethod
    def split(self, model: Any, cuts: Sequence[str]) -> list[Any]: ...

    @abc.abstractmethod
    def exit_stage(self, segment: Any, head: Any, name: str) -> Any: ...

    @abc.abstractmethod
    def final_stage(self, segment: Any, head: Any | None, name: str) -> Any: ...

    @abc.abstractmethod
    def pixel_input(self, module: Any, preprocess: Any, size: tuple[int, int]) -> Any: ...

    @abc.abstractmethod
    def run(self, module: Any, x: np.ndarray) -> list[np.ndarray]: ...

    @abc.abstractmethod
    def pool(self, carry: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def pooled_features(self, segments: Sequence[Any], x: np.ndarray, device: str = "cpu",
                        pool_last: bool = True) -> list[np.ndarray]: ...

    @abc.abstractmethod
    def fingerprint(self, model: Any) -> str: ...

    @abc.abstractmethod
    def macs(self, module: Any, input_shape: Sequence[int]) -> int: ...

    @abc.abstractmethod
    def params(self, module: Any) -> int: ...

    # --- optional capabilities -----------------------------------------------------------

    def train_exits(self, segments: Sequence[Any], images: Any, preprocess: Any, size: tuple[int, int],
                    classes: int, training: Any, held_out: Any = None) -> tuple[list, list, dict]:
        """Heads trained by the framework (conv/mlp heads, joint fine-tuning): segments, heads, training record."""
        raise ConversionError(f"joint exit training (--train-exits joint) and conv/mlp heads are not available for "
                              f"{self.framework} models; use --head gap_linear or savchenko with --train-exits frozen")

    def given_exits(self, model: Any, cuts: Sequence[str]) -> tuple[list, list, dict]:
        """The segments of ``model`` and the trained exit heads it carries at ``cuts``, and their training record."""
        raise ConversionError(f"--train-exits given needs a model carrying trained exit heads, which "
                              f"{self.framework} models cannot yet; use --train-exits frozen")

    def glance_stage(self, model: Any, size: tuple[int, int]) -> tuple[Any, Any]:
        """The model with a class-activation-map output and where its cells sit (a glance stage)."""
        raise ConversionError(f"glance stages (a CAM output) are built from torch models; this stagewise cannot add "
                              f"one to a {self.framework} model yet: use a torch glance model")

    def check_formats(self, model: Any, formats: Sequence[str]) -> None:
        """Refuse, before any work, an artifact format this model cannot be written in (all are accepted here)."""

    def unstable_normalisation(self, module: Any) -> list[tuple[str, float]]:
        """The batch-normalisation layers of ``module`` that scale their input by more than
        :data:`UNSTABLE_BN_GAIN` (a running variance near zero), with that gain, largest first
        (none here: a framework without batch normalisation)."""
        return []

    def _cannot_write(self, artifact_format: str) -> ConversionError:
        return ConversionError(f"the {self.framework} source cannot write {artifact_format} artifacts; "
                               "choose another --format")

    def export_onnx(self, plan: Any, example: np.ndarray, path: Path) -> dict:
        """Write the stage as an ONNX file at ``path``; returns the conversion record."""
        raise self._cannot_write("onnx")

    def export_openvino(self, plan: Any, example: np.ndarray, workdir: Path) -> Any:
        """The stage as an ``ov.Model`` read natively (``openvino_route = "native"``)."""
        raise self._cannot_write("openvino")

    def export_tflite(self, plan: Any, example: np.ndarray, path: Path) -> dict:
        """Write the stage as a float ``.tflite`` at ``path``; returns the conversion record."""
        raise self._cannot_write("tflite")

    def tflite_int8(self, plan: Any, example: np.ndarray, out: Path, calibrate: np.ndarray,
                    integer_io: bool) -> dict | None:
        """Write an INT8 ``.tflite`` with the framework's own quantizer and return its record, or ``None`` when
        the framework has none (the AI Edge Quantizer then works on the float file)."""
        return None

    def tflite_fp16(self, plan: Any, example: np.ndarray, out: Path) -> dict | None:
        """Write an fp16-weight ``.tflite`` with the framework's own converter, or ``None`` (see :meth:`tflite_int8`)."""
        return None


UNSTABLE_BN_GAIN = 1e3
"""A batch-normalisation layer that multiplies its input by more than this (``|gamma| / sqrt(var + eps)``) turns
float rounding into output differences no exporter can avoid."""


@dataclass(frozen=True)
class Source(Plugin):
    """A source framework: its ``name``, adapter class (``target``, a :class:`SourceAdapter`), ``extra``, and the
    class its models are (``model_class``, ``"package.module:Class"``; a model is recognised only when that
    package is already imported, so asking never imports a framework)."""

    model_class: str = ""

    def owns(self, model: Any) -> bool:
        """Whether ``model`` is an instance of :attr:`model_class` (``False`` while its package is not imported)."""
        module, _, name = self.model_class.partition(":")
        found = sys.modules.get(module)
        return found is not None and isinstance(model, getattr(found, name))


SOURCES: dict[str, Source] = {}
"""The registered source frameworks by name (:func:`register_source` adds one)."""


def register_source(source: Source) -> Source:
    """Add ``source`` (or replace the source of the same name); returns it."""
    SOURCES[source.name] = source
    return source


register_source(Source("torch", "stagewise.converters.torch_source:TorchSource", "torch", "torch.nn:Module"))
register_source(Source("keras", "stagewise.converters.keras_source:KerasSource", "keras", "keras:Model"))


def source_named(framework: str) -> SourceAdapter:
    """The adapter of ``framework`` (e.g. ``"torch"`` or ``"keras"``), imported on first use."""
    return plugin(SOURCES, framework, "source framework", f"converting a {framework} model")


def source_of(model: Any) -> SourceAdapter:
    """The adapter for ``model`` (a ``torch.nn.Module``, a ``keras.Model``, or a registered source's model).

    Decided from the frameworks already imported (whoever built the model imported them), so
    asking never imports a framework the model does not come from.
    """
    for source in reversed(SOURCES.values()):
        if source.owns(model):
            return source_named(source.name)
    raise ConversionError(f"the model is a {type(model).__module__}.{type(model).__name__}; stagewise converts "
                          f"{' and '.join(s.model_class.replace(':', '.') for s in SOURCES.values())} classifiers")
