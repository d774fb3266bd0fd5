"""Where torch work of a conversion runs: feature extraction, head fitting, joint training.

``--device`` (CLI), ``device = ...`` (TOML) and ``device=`` (Python) take one of :data:`DEVICES`;
``auto`` picks CUDA, then Apple's MPS, then the CPU. A device this machine's torch cannot use is
refused before any work. On a GPU the forward passes run under float16 autocast (CUDA) or
bfloat16 (MPS); trained modules always come back to the CPU in float32, so the exported artifacts
do not depend on where they were trained. Keras follows TensorFlow's own device placement.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

from stagewise.errors import ConversionError, unknown_choice

DEVICES = ("auto", "cpu", "cuda", "mps")


def check_device_name(name: str) -> str:
    """``name`` when it is one of :data:`DEVICES` (``cuda:1`` included), else a :class:`ConversionError`."""
    if name.split(":")[0] not in DEVICES:
        raise ConversionError(unknown_choice("device", name, DEVICES) + "; a GPU may be numbered, e.g. cuda:1")
    return name


def resolve_device(name: str = "auto") -> str:
    """The torch device ``name`` means on this machine; refuses one its torch cannot use."""
    import torch

    kind = check_device_name(name).split(":")[0]
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConversionError(f"--device {name}: this machine's torch {torch.__version__} ({build}) sees no CUDA GPU; "
                              "use --device cpu (or auto), or install a CUDA build of torch on a machine with a GPU")
    if kind == "mps" and not mps_ok:
        raise ConversionError(f"--device {name}: Apple's MPS backend is not available here (it needs macOS on Apple "
                              "silicon); use --device cpu (or auto)")
    return name


def autocast(device: str) -> ContextManager[Any]:
    """Mixed precision for forward passes on a GPU (float16 on CUDA, bfloat16 on MPS); nothing on the CPU."""
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if kind == "mps":
        return torch.autocast("mps", dtype=torch.bfloat16)
    return contextlib.nullcontext()
