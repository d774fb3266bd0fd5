"""Converters: PyTorch or Keras classifiers into stagewise bundles (early exits or cascades).

The Python twin of ``stagewise convert``::

    from stagewise.converters import convert, cut_points

    for cut in cut_points("examples/cifar10/model.py:resnet_cifar", input_size=32):
        print(cut.name, cut.shape, cut.macs, cut.single_tensor)
    convert("examples/cifar10/model.py:resnet_cifar", exits=["layer1", "layer2"],
            data="cifar10-train.tar.gz", out="cifar.swb", int8=True)
    convert(stages=["stagewise.converters.zoo:efficientnet_lite0@224",
                    "stagewise.converters.zoo:efficientnet_lite2@260"], combine="mean_probs",
            data="imagenet-calibration/", out="effnet.swb")
    convert(stages=["zoo:efficientnet_lite0@224"], focus="zoo:efficientnet_lite0@224", patches=3, iou=0.3,
            data="imagenet-calibration/", out="glance.swb")          # glance and focus (AnchorNet)

:mod:`.request` holds the one typed conversion request that this function, the command line and
its TOML configs parse into; :mod:`.convert` runs it. Lower-level pieces, each written once for every
source framework and artifact format: :mod:`.source` (the source-adapter interface; :mod:`.torch_source`, :mod:`.keras_source`),
:mod:`.plans` (early-exit and cascade stage plans), :mod:`.heads` (exit-head training),
:mod:`.export` (the exporter interface and the export pipeline; :mod:`.onnx_export`,
:mod:`.openvino_export`, :mod:`.tflite_export`), :mod:`.build` (export, calibrate on the real
runtime, write the bundle), :mod:`.adapt` (a stage's model adapted to its input size),
:mod:`.search` (cascade search on recorded logits) and :mod:`.candidates` (candidates measured
on the runtime, the chosen cascade built). Importing this package imports no training framework; the one a
model comes from is imported when the model is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from stagewise.deprecation import deprecated

from .adapt import Adaptation
from .convert import run_job
from .factory import build_model
from .heads import HeadTraining
from .options import BuildOptions
from .request import (CascadeSearch, ConversionRequest, StageSource, option_default, request_from_toml,
                      stage_source)
from .source import CutPoint, source_of


def cut_points(model: Any, input_size: int | tuple[int, int] | None = None) -> list[CutPoint]:
    """Every candidate cut of ``model`` (a factory spec or a model object), in graph order.

    One forward pass on a zero image of ``input_size`` (default: the size the model declares in
    ``stagewise_input``, else 224) gives each cut's output shape, channels, layout, spatial
    reduction and cumulative MACs; ``single_tensor`` marks the cuts an early exit can use. Needs no data.
    """
    built = build_model(model, input_size if isinstance(input_size, int) else None)
    if input_size is None:
        input_size = getattr(built, "stagewise_input", {}).get("size", 224)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    return source_of(built).cut_points(built, size)


def convert(model: Any = None, *, out: str | Path, data: str | Path, stages: Sequence[Any] | None = None,
            exits: Sequence[str] | None = None, calibration_data: str | Path | None = None,
            formats: str | Sequence[str] | None = None, int8: bool | None = None, int8_max_drop: float | None = None,
            int8_tolerance: float | None = None, int8_search_seconds: float | None = None,
            int8_mixed: bool | None = None, int8_min_speedup: float | None = None,
            agreement_images: int | None = None, target_drop: float | None = None, combine: str | None = None,
            score: str | None = None, head: HeadTraining | str | None = None, input_size: int | None = None,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None, resize: str | None = None,
            crop_fraction: float | None = None, resizer: str | None = None, fp16: bool | None = None,
            npu: bool | None = None, int8_io: bool | None = None, threads: int | None = None,
            force: bool | None = None, name: str | None = None, max_head_images: int | None = None,
            max_calibration_images: int | None = None, focus: Any = None, patches: int | None = None,
            iou: float | None = None, patch_fraction: float | None = None, adapt: str | None = None,
            search: CascadeSearch | None = None, new_classes: bool | None = None, cache: str | Path | None = None,
            device: str | None = None) -> Path | None:
    """Build a bundle, as ``stagewise convert`` does; returns its path (None on a ``torchrun`` rank other
    than 0, which writes nothing: see :func:`run_job`).

    The keywords are the options of a :class:`ConversionRequest` (:meth:`ConversionRequest.from_options`),
    which is checked whole before any model or image is opened; ``None`` (or leaving a keyword out) means
    the request's default, stated once on its fields (:func:`option_default` says what it is).

    Early exit: ``model`` (a ``file.py:factory`` / ``module:factory`` spec or a model object)
    and ``exits`` (cut points, see :func:`cut_points`). Cascade: ``stages``, each
    ``"factory@SIZE"`` (``"factory@SIZE+bn"``: adapted to its size, see :mod:`.adapt`) or ``(model, size)``,
    cheapest first; ``adapt`` (bn, head) adapts every stage that does not say. Cascade search:
    ``search`` (a :class:`CascadeSearch`) measures candidates and builds the cheapest searched
    cascade within ``target_drop`` of the best single candidate. ``data`` holds labelled images
    (class folders, an archive or ``labels.tsv``); heads train on 80 % of it and thresholds are
    picked on the rest unless ``calibration_data`` is given (cascades calibrate on all of it).
    ``target_drop`` is in points of top-1 for the default operating point (0.5; measured from the float full
    model when stages are INT8). ``int8``: quantize every stage, keeping INT8 where its top-1 on held-back
    calibration images is at most ``int8_max_drop`` points (0.5) below the float stage's (or, with
    ``int8_tolerance``, where its agreement with float reaches it), searching recipes and float layers for
    at most ``int8_search_seconds`` per stage. ``formats``: onnx (the default),
    openvino, tflite (several: a list or ``"onnx,openvino"``). ``head``: a head kind (gap_linear, savchenko,
    conv, mlp) or a :class:`HeadTraining`. Glance and focus: one stage (the
    glance model, ending in global pooling + linear) and ``focus`` (``"factory@SIZE"`` or
    ``(model, size)``), which classifies ``patches`` patches chosen from the glance model's CAM
    (kept when their IoU with every kept one is below ``iou``; side ``patch_fraction`` of the glance
    view's shorter side), one step each. ``new_classes``: every early-exit stage, the last included,
    classifies ``data``'s own classes on the frozen backbone's features (:mod:`.new_classes`; without
    it, data whose classes are not the model's outputs is refused); ``exits`` may then be empty (one
    stage: the new classifier on the penultimate features). ``cache``: a folder keeping extracted
    features for re-runs; ``device``: where torch work runs (auto, cpu, cuda, mps).
    """
    options = {key: value for key, value in locals().items() if value is not None}
    return run_job(ConversionRequest.from_options(options))


_RENAMED = {"ConvertJob": ("ConversionRequest", ConversionRequest),
            "job_from_toml": ("request_from_toml", request_from_toml)}


def __getattr__(name: str) -> Any:
    """The names of earlier releases, with a :class:`DeprecationWarning` naming the new one."""
    if name in _RENAMED:
        new, value = _RENAMED[name]
        deprecated(f"stagewise.converters.{name}", new)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Adaptation", "BuildOptions", "CascadeSearch", "ConversionRequest", "CutPoint", "HeadTraining",
           "StageSource", "build_model", "convert", "cut_points", "option_default", "request_from_toml", "run_job",
           "stage_source"]
