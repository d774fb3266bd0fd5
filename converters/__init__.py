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

Lower-level pieces, each written once for every source framework and artifact format:
:mod:`.source` (the source-adapter interface; :mod:`.torch_source`, :mod:`.keras_source`),
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

from stagewise.errors import ConversionError

from .adapt import Adaptation
from .convert import CascadeSearch, ConvertJob, StageSource, job_from_toml, make_job, run_job, stage_source
from .factory import build_model
from .heads import HeadTraining
from .options import BuildOptions
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


def convert(model: Any = None, *, out: str | Path, data: str | Path, stages: Sequence[Any] = (),
            exits: Sequence[str] = (), calibration_data: str | Path | None = None,
            formats: str | Sequence[str] = "onnx", int8: bool = False, int8_max_drop: float = 0.5,
            int8_tolerance: float | None = None, int8_search_seconds: float = 240.0, int8_mixed: bool = True,
            int8_min_speedup: float = 0.0, agreement_images: int = 1000, target_drop: float = 0.5,
            combine: str = "own", score: str = "max_softmax", head: HeadTraining | str = "gap_linear",
            input_size: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            resize: str | None = None, crop_fraction: float | None = None, fp16: bool = False, npu: bool = False,
            int8_io: bool = False, threads: int = 1, force: bool = False, name: str | None = None,
            max_head_images: int | None = None, max_calibration_images: int | None = None,
            focus: Any = None, patches: int = 3, iou: float = 0.3, patch_fraction: float = 0.7,
            adapt: str | None = None, search: CascadeSearch | None = None, new_classes: bool = False,
            cache: str | Path | None = None, device: str = "auto") -> Path | None:
    """Build a bundle, as ``stagewise convert`` does; returns its path (None on a ``torchrun`` rank other
    than 0, which writes nothing: see :func:`run_job`).

    Early exit: ``model`` (a ``file.py:factory`` / ``module:factory`` spec or a model object)
    and ``exits`` (cut points, see :func:`cut_points`). Cascade: ``stages``, each
    ``"factory@SIZE"`` (``"factory@SIZE+bn"``: adapted to its size, see :mod:`.adapt`) or ``(model, size)``,
    cheapest first; ``adapt`` (bn, head) adapts every stage that does not say. Cascade search:
    ``search`` (a :class:`CascadeSearch`) measures candidates and builds the cheapest searched
    cascade within ``target_drop`` of the best single candidate. ``data`` holds labelled images
    (class folders, an archive or ``labels.tsv``); heads train on 80 % of it and thresholds are
    picked on the rest unless ``calibration_data`` is given (cascades calibrate on all of it).
    ``target_drop`` is in points of top-1 for the default operating point (measured from the float full
    model when stages are INT8). ``int8``: quantize every stage, keeping INT8 where its top-1 on held-back
    calibration images is at most ``int8_max_drop`` points below the float stage's (or, with
    ``int8_tolerance``, where its agreement with float reaches it), searching recipes and float layers for
    at most ``int8_search_seconds`` per stage. ``formats``: onnx,
    openvino, tflite (several: a list or ``"onnx,openvino"``). Glance and focus: one stage (the
    glance model, ending in global pooling + linear) and ``focus`` (``"factory@SIZE"`` or
    ``(model, size)``), which classifies ``patches`` patches chosen from the glance model's CAM
    (kept when their IoU with every kept one is below ``iou``; side ``patch_fraction`` of the glance
    view's shorter side), one step each. ``new_classes``: every early-exit stage, the last included,
    classifies ``data``'s own classes on the frozen backbone's features (:mod:`.new_classes`; without
    it, data whose classes are not the model's outputs is refused); ``exits`` may then be empty (one
    stage: the new classifier on the penultimate features). ``cache``: a folder keeping extracted
    features for re-runs; ``device``: where torch work runs (auto, cpu, cuda, mps).
    """
    sources = [stage_source(stage, adapt) for stage in stages]
    if sum(map(bool, (sources, model is not None, search is not None))) > 1:
        raise ConversionError("give one of: a model with exits (early exit), stages (cascade or glance and focus) "
                              "or a search")
    spec = {k: v for k, v in (("mean", mean), ("std", std), ("resize", resize), ("crop_fraction", crop_fraction))
            if v is not None}
    kind = ("search" if search is not None else ("glance_focus" if focus is not None else "cascade") if sources
            else "early_exit")
    if search is not None:
        sources = [StageSource(m) for m in search.models]
    job = make_job(kind=kind, sources=sources or [StageSource(model)], out=Path(out), search=search,
                   formats=formats if isinstance(formats, str) else ",".join(formats), int8=int8,
                   int8_max_drop=int8_max_drop, int8_tolerance=int8_tolerance, int8_search_seconds=int8_search_seconds,
                   int8_mixed=int8_mixed, int8_min_speedup=int8_min_speedup,
                   agreement_images=agreement_images,
                   target_drop=target_drop, threads=threads, force=force, fp16=fp16, npu=npu, int8_io=int8_io,
                   head_kind=head if isinstance(head, str) else None, data=Path(data),
                   calibration_data=None if calibration_data is None else Path(calibration_data),
                   exits=list(exits), input=spec, input_size=input_size, combine=combine, score=score, name=name,
                   max_head_images=max_head_images, max_calibration_images=max_calibration_images,
                   focus=None if focus is None else stage_source(focus), patches=patches, iou=iou,
                   patch_fraction=patch_fraction, new_classes=new_classes,
                   cache=None if cache is None else Path(cache), device=device,
                   **({"head": head} if isinstance(head, HeadTraining) else {}))
    return run_job(job)


__all__ = ["Adaptation", "BuildOptions", "CascadeSearch", "ConvertJob", "CutPoint", "HeadTraining", "StageSource",
           "build_model", "convert", "cut_points", "job_from_toml", "make_job", "run_job", "stage_source"]
