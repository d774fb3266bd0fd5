"""Stage plans: what the export pipeline converts, for early exits and cascades, from any source.

An early-exit plan cuts one network after named cut points and attaches a trained exit head
to every segment but the last; a cascade plan makes one stage of each model, cheapest first,
each reading the image at its own size. Both are written once against the
:class:`~stagewise.converters.source.SourceAdapter` interface, so torch and Keras models go
through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from stagewise.datasets import ImageSet
from stagewise.errors import ConversionError
from stagewise.images import Preprocess

from .features import OUTPUT, FeatureStore
from .heads import HeadTraining, train_head
from .source import SourceAdapter, source_named, source_of


@dataclass
class StagePlan:
    """One stage ready for export: a model from its input tensor to its outputs.

    ``module`` returns ``logits``, when ``has_carry`` ``(carry, logits)``, and for a glance stage
    (``cam``: its :class:`~stagewise.manifest.CamGrid` record) ``(logits, cam)``. ``source`` is
    the manifest's stage input without the tensor name: ``{"source": "image", "size": [h, w]}``,
    ``{"source": "carry", "from": <earlier stage name>}`` or a patch source. ``framework`` names
    the source adapter that runs and exports ``module`` (``"torch"`` or ``"keras"``). ``decides``: the
    exported graph also outputs the stage's exit decision (formats that can add one; off in a bundle where a
    stage combines probabilities, whose stages the executor scores in numpy).
    """

    name: str
    module: Any
    source: dict
    has_carry: bool
    exit: dict
    macs: int
    params: int
    head: dict | None = None
    framework: str = "torch"
    cam: dict | None = None
    decides: bool = True

    @property
    def input_name(self) -> str:
        # not "carry": a middle early-exit stage also *outputs* "carry", and ONNX (whose exporter then
        # silently renames the input to "carry.1") and OpenVINO need distinct tensor names
        return "carry_in" if self.source["source"] == "carry" else "image"

    @property
    def input_dtype(self) -> str:
        """The stage input's element type: ``"uint8"`` for pixel input (see :func:`pixel_plan`), else float32."""
        return self.source.get("dtype", "float32")

    @property
    def output_names(self) -> list[str]:
        if self.cam is not None:
            return ["logits", "cam"]
        return ["carry", "logits"] if self.has_carry else ["logits"]

    @property
    def adapter(self) -> SourceAdapter:
        return source_named(self.framework)

    def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The source model's outputs by name on the stage input ``x``."""
        return dict(zip(self.output_names, self.adapter.run(self.module, x)))


def pixel_plan(plan: StagePlan, preprocess: Preprocess) -> StagePlan:
    """``plan`` taking uint8 NHWC pixels when it reads the image (or a patch of it): its source adapter
    puts the cast, ``preprocess``'s mean/std and the layout change into the module, so every exported
    format carries them; other plans are returned as they are."""
    if plan.source["source"] == "carry" or plan.input_dtype == "uint8":
        return plan
    module = plan.adapter.pixel_input(plan.module, preprocess, tuple(plan.source["size"]))
    return replace(plan, module=module, source=dict(plan.source, dtype="uint8", layout="NHWC"))


def exit_rule(score: str, combine: str = "own") -> dict:
    """A stage's exit rule as the manifest records it before calibration fits a temperature."""
    return {"score": score, "temperature": 1.0, "combine": combine}


def plans_with_heads(source: SourceAdapter, segments: Sequence[Any], cuts: Sequence[str], size: tuple[int, int],
                     heads: Sequence[Any], records: Sequence[dict | None], score: str) -> list[StagePlan]:
    """Plans for consecutive ``segments`` (cut after ``cuts``), segment k ending in ``heads[k]``.

    Every segment but the last gets an exit head (a fitted :class:`~.heads.LinearHead` or a head
    of the source's framework) and passes its carry on; the last keeps the network's own output
    when ``heads[-1]`` is None, or ends in that head. Each head record gains the cut and the
    head's own MACs.
    """
    names = [f"exit{k}" for k in range(len(segments) - 1)] + ["final"]
    shape = (1, 3, *size) if source.layout == "NCHW" else (1, *size, 3)
    x = np.zeros(shape, np.float32)
    plans = []
    for k, (segment, head, record) in enumerate(zip(segments, heads, records)):
        last = k == len(segments) - 1
        module = (source.final_stage(segment, head, names[k]) if last
                  else source.exit_stage(segment, head, names[k]))
        macs = source.macs(module, x.shape)
        if record is not None and k < len(cuts):
            record = dict(record, after=cuts[k], macs=int(macs - source.macs(segment, x.shape)))
        stage_input = {"source": "image", "size": list(size)} if k == 0 else {"source": "carry", "from": names[k - 1]}
        plans.append(StagePlan(name=names[k], module=module, source=stage_input, has_carry=not last,
                               exit=exit_rule(score), macs=macs, params=source.params(module),
                               head=record, framework=source.framework))
        x = source.run(module, x)[0]
    return plans


def early_exit_plans(model: Any, cuts: Sequence[str], preprocess: Preprocess, size: tuple[int, int],
                     head_images: ImageSet, training: HeadTraining = HeadTraining(),
                     score: str = "max_softmax", held_out: ImageSet | None = None,
                     store: FeatureStore | None = None) -> list[StagePlan]:
    """Stages of ``model`` cut after ``cuts``, each non-final one with a trained exit head.

    By ``training.mode`` (``auto`` resolved by :meth:`~.heads.HeadTraining.resolved`):
    ``frozen`` linear heads are fitted on the frozen backbone's pooled features of ``head_images``
    (:func:`~.heads.train_head`: labels plus distillation from the network's own final softmax,
    or Savchenko's L2 head); ``frozen`` conv/mlp heads and ``joint`` training (backbone and heads
    together) go through the source adapter's ``train_exits`` (torch), which also reports every
    exit's and the original network's accuracy on ``held_out``; ``given`` exports the heads the
    model carries. ``store``: where frozen heads' features come from (default: a fresh in-memory
    :class:`~.features.FeatureStore`; pass the conversion's to reuse features and its cache).
    """
    if not cuts:
        raise ConversionError("an early-exit conversion needs at least one cut point (see `stagewise cuts MODEL`)")
    source = source_of(model)
    model = source.prepare(model)
    source.check_image_size(model, size)
    training = training.resolved(model)
    if training.mode == "given":
        segments, heads, record = source.given_exits(model, cuts)
        records = [dict(kind=record.get("kind"), trained_on="given with the model", training=record) for _ in heads]
    elif training.in_torch:
        classes = int(source.run(model, preprocess.tensor([np.zeros((*size, 3), np.uint8)], size))[0].shape[1])
        segments, heads, record = source.train_exits(source.split(model, cuts), head_images, preprocess, size,
                                                     classes, training, held_out)
        trained_on = "joint fine-tuning with the backbone" if training.mode == "joint" else "frozen backbone"
        records = [dict(kind=training.kind, trained_on=trained_on, training=record) for _ in heads]
    else:
        segments = source.split(model, cuts)
        feats = (store or FeatureStore(source, model, preprocess, size)).features(cuts, head_images, output=True)
        targets = np.asarray(head_images.targets)
        trained = [train_head(feats[cut], targets, feats[OUTPUT], training) for cut in cuts]
        heads = [h for h, _ in trained]
        records = [r for _, r in trained]
    return plans_with_heads(source, segments, cuts, size, [*heads, None], [*records, None], score)


def cascade_plans(models: Sequence[tuple[str, Any, tuple[int, int]]], combine: str = "own",
                  score: str = "max_softmax") -> list[StagePlan]:
    """One stage per ``(name, model, (height, width))``, in order of increasing cost.

    With ``combine="mean_probs"`` every stage after the first decides on the mean of its own
    and the earlier stages' probabilities, so earlier work is not wasted.
    """
    sources = {source_of(model).framework for _, model, _ in models}
    if len(sources) != 1:
        raise ConversionError("the stages of a cascade must all be torch models or all Keras models")
    plans = []
    for k, (name, model, size) in enumerate(models):
        source = source_of(model)
        model = source.prepare(model)
        source.check_image_size(model, size)
        shape = (1, 3, *size) if source.layout == "NCHW" else (1, *size, 3)
        plans.append(StagePlan(name=name, module=model, source={"source": "image", "size": list(size)},
                               has_carry=False, exit=exit_rule(score, combine if k else "own"),
                               macs=source.macs(model, shape), params=source.params(model),
                               framework=source.framework, decides=combine == "own"))
    return plans


def glance_focus_plans(glance: tuple[str, Any, tuple[int, int]], focus: tuple[Any, tuple[int, int]], count: int,
                       iou: float, patch_fraction: float, score: str = "max_softmax") -> list[StagePlan]:
    """AnchorNet's glance and focus: a glance stage and ``count`` focus steps.

    ``glance`` is ``(name, model, (height, width))``: the model sees the whole image and also
    returns the class-activation map of its top class (its last block must be global pooling +
    linear). ``focus`` is ``(model, (height, width))``: focus step ``t`` classifies the ``t``-th
    patch chosen from that CAM (cells from the highest down, kept when the IoU with every kept
    patch is below ``iou``; side ``patch_fraction`` of the glance view's shorter side), resized
    to the focus size, and decides on the mean of the probabilities so far (glance included).
    """
    name, model, size = glance
    focus_model, focus_size = focus
    if count < 1 or not 0 < iou <= 1 or not 0 < patch_fraction <= 1:
        raise ConversionError(f"glance and focus needs --patches >= 1 and --iou, --patch-fraction in (0, 1]; got "
                              f"{count}, {iou}, {patch_fraction}")
    source = source_of(model)
    if source_of(focus_model).framework != source.framework:
        raise ConversionError("the glance and focus models must both be torch models or both Keras models")
    model = source.prepare(model)
    module, cam = source.glance_stage(model, size)
    shape = (1, 3, *size) if source.layout == "NCHW" else (1, *size, 3)
    # costs of the model itself: tracing inlines custom layers, which the MAC counter would not see
    plans = [StagePlan(name=name, module=module, source={"source": "image", "size": list(size)}, has_carry=False,
                       exit=exit_rule(score), macs=source.macs(model, shape), params=source.params(model),
                       framework=source.framework, cam=cam.to_dict(), decides=False)]
    focus_model = source.prepare(focus_model)
    focus_shape = (1, 3, *focus_size) if source.layout == "NCHW" else (1, *focus_size, 3)
    macs, params = source.macs(focus_model, focus_shape), source.params(focus_model)
    for t in range(count):
        patch = {"source": "patch", "from": name, "size": list(focus_size), "count": count, "iou": iou,
                 "patch_fraction": patch_fraction, "index": t}
        plans.append(StagePlan(name=f"focus{t}", module=focus_model, source=patch, has_carry=False,
                               exit=exit_rule(score, "mean_probs"), macs=macs, params=params,
                               framework=source.framework, decides=False))
    return plans
