"""The choices of a conversion that reach the export pipeline and the build."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagewise.calibration import DEFAULT_DROPS, Goal
from stagewise.errors import ConversionError

from .int8_gate import DEFAULT_MAX_DROP, Gate

OPENVINO_ROUTES = ("auto", "onnx", "native", "best")
OPENVINO_PRESETS = ("performance", "mixed")


@dataclass(frozen=True)
class BuildOptions:
    """Choices of a conversion. Drops are fractions of top-1 (0.005 = half a point).

    ``formats``: artifact formats the bundle carries (the first is calibrated on). ``int8``:
    post-training INT8, kept per stage only when it passes the INT8 gate (:mod:`.int8_gate`) on up to
    ``agreement_images`` calibration images that the quantizer did not calibrate on: its top-1
    accuracy (against the labels; without labels, the float stage's probability of the answered
    class) at most ``int8_max_drop`` below the float stage's, judged with a paired bootstrap
    interval; or, when ``int8_tolerance`` is set, the agreement rule of earlier releases (the lower
    end of the 95 % Wilson interval of top-1 agreement reaches it). ``int8_mixed``: a stage that
    fails first tries the format's other calibration recipes and then keeps its most sensitive
    layers in float (each backend's own tool), within ``int8_search_seconds`` per stage, and only
    falls back whole when nothing passes. ``int8_min_speedup``: INT8 is also kept only when it runs at
    least this many times as fast as the float model on the build machine (single images, timed
    round robin; the timing is recorded either way); 0 (the default) checks nothing, for builds on
    a machine that is not the device. ``fp16``: OpenVINO and TFLite artifacts store
    fp16 weights. ``npu``: OpenVINO NPU preset (static batch-1 shapes, fp16 weights, NPU INT8
    scheme). ``int8_io``: TFLite INT8 models take and return int8 tensors (integer-only NPUs).
    ``openvino_route``: how OpenVINO reads a stage — ``auto`` (the source's measured best: ONNX
    for torch, the SavedModel for Keras), ``onnx``, ``native`` (from the framework model) or
    ``best`` (both, keep the one closer to the source). ``openvino_preset``: NNCF preset
    (``performance``: symmetric activations, ``mixed``: asymmetric). ``default_drop``: the
    default operating point's allowed drop (also what automatic exit placement and the cascade
    search keep within); ``goal``/``calibration``: a :class:`stagewise.calibration.Goal` instead
    (:attr:`calibration_goal`) and ``Settings`` (default: ``target_drops`` on the front); ``labelled=False`` calibrates against the full model's
    own answers. ``pixel_input``: every stage that reads the image takes uint8 NHWC pixels, with
    the cast, mean/std and layout change inside its exported model (``False``: the float input,
    normalised on the device, of bundles written before).
    """

    formats: tuple[str, ...] = ("onnx",)
    int8: bool = False
    int8_tolerance: float | None = None
    int8_max_drop: float = DEFAULT_MAX_DROP
    int8_search_seconds: float = 240.0
    int8_mixed: bool = True
    int8_min_speedup: float = 0.0
    quantization_images: int = 256
    agreement_images: int = 1000
    target_drops: tuple[float, ...] = DEFAULT_DROPS
    default_drop: float = 0.005
    threads: int = 1
    profile_images: int = 40
    verify_tolerance: float = 1e-3
    overwrite: bool = False
    seed: int = 0
    fp16: bool = False
    npu: bool = False
    int8_io: bool = False
    openvino_route: str = "auto"
    openvino_preset: str = "performance"
    openvino_weights_per_channel: bool = True
    goal: Goal | None = None
    calibration: Any = None
    labelled: bool = True
    pixel_input: bool = True

    def __post_init__(self) -> None:
        if not self.formats:
            raise ConversionError("name at least one artifact format: onnx, openvino or tflite")
        if self.openvino_route not in OPENVINO_ROUTES:
            raise ConversionError(f"unknown OpenVINO route {self.openvino_route!r}; choose from {', '.join(OPENVINO_ROUTES)}")
        if self.openvino_preset not in OPENVINO_PRESETS:
            raise ConversionError(f"unknown NNCF preset {self.openvino_preset!r}; choose from {', '.join(OPENVINO_PRESETS)}")
        if self.int8_min_speedup < 0:
            raise ConversionError(f"int8_min_speedup is a ratio of latencies (1.0: INT8 at least as fast as float, "
                                  f"0: not checked), got {self.int8_min_speedup}")
        if self.int8_tolerance is not None and not 0.0 <= self.int8_tolerance <= 1.0:
            raise ConversionError(f"int8_tolerance is a fraction of agreeing images in [0, 1], got {self.int8_tolerance}")
        if not 0.0 <= self.int8_max_drop <= 1.0:
            raise ConversionError(f"int8_max_drop is a fraction of top-1 in [0, 1] (0.005 = half a point), "
                                  f"got {self.int8_max_drop}")
        if self.threads < 1 or self.agreement_images < 1 or self.quantization_images < 1:
            raise ConversionError(f"threads, agreement images and quantization images must be at least 1, got "
                                  f"{self.threads}, {self.agreement_images}, {self.quantization_images}")
        if not 0.0 <= self.default_drop <= 1.0:
            raise ConversionError(f"the target drop is a fraction of top-1 in [0, 1] (0.005 = half a point; the "
                                  f"flag --target-drop takes points, 0 to 100), got {self.default_drop}")
        if not self.int8_search_seconds >= 0:
            raise ConversionError(f"int8_search_seconds is a time in seconds (0: try one recipe only), "
                                  f"got {self.int8_search_seconds}")

    @property
    def calibration_goal(self) -> Goal:
        """What the default operating point is chosen for: ``goal``, else a drop of ``default_drop``."""
        return self.goal or Goal("drop", self.default_drop)

    @property
    def gate(self) -> Gate:
        """The rule an INT8 stage must pass (:class:`~stagewise.converters.int8_gate.Gate`)."""
        return Gate(self.int8_max_drop, self.int8_tolerance)
