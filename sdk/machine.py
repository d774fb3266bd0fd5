"""What CPU this is: the instruction-set extensions that decide INT8 speed.

INT8 kernels differ by 2x between CPUs of one architecture: on x86, AVX-512 VNNI / AVX-VNNI add 8-bit dot
products into 32-bit sums in one instruction (AMX adds tile matrix units); without them, 8-bit products go
through 16-bit pair sums. On ARM, the dot-product (``asimddp``) and int8 matrix-multiply (``i8mm``)
extensions play that part. Every benchmark result, ``stagewise profile`` and the converter's INT8 timing
record :func:`cpu_record`, so a figure always says which CPU made it.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

INT8_FEATURES = {
    "x86": (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
            ("avx512_bf16", "AVX-512 BF16"), ("amx_int8", "AMX-INT8")),
    "arm": (("asimd", "NEON"), ("asimddp", "dotprod"), ("i8mm", "i8mm"), ("sve", "SVE"), ("sve2", "SVE2")),
}
"""The extensions worth naming, per architecture family: (``/proc/cpuinfo`` flag, name)."""

_MAC_FEATURES = {"hw.optional.arm.FEAT_DotProd": "asimddp", "hw.optional.arm.FEAT_I8MM": "i8mm",
                 "hw.optional.neon": "asimd"}


def family(machine: str | None = None) -> str:
    """``x86`` or ``arm`` (or the machine name as ``platform.machine()`` gives it, lower case)."""
    m = (machine or platform.machine()).lower()
    if m in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "x86"
    if m.startswith(("arm", "aarch64")):
        return "arm"
    return m


def cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """The model name and the flags (x86) or features (ARM) of the first processor in ``/proc/cpuinfo`` (Linux)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _sysctl() -> tuple[str, set[str]]:
    """The model and the ARM features macOS reports through ``sysctl``."""
    try:
        out = subprocess.run(["sysctl", "machdep.cpu.brand_string", *_MAC_FEATURES], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "", set()
    model, flags = "", set()
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key == "machdep.cpu.brand_string":
            model = value.strip()
        elif key in _MAC_FEATURES and value.strip() == "1":
            flags.add(_MAC_FEATURES[key])
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_record() -> dict:
    """This CPU: ``machine``, ``model``, ``cores`` and the INT8-relevant ``features`` it has (names from
    :data:`INT8_FEATURES`), plus ``flags``: those features' raw flag names."""
    model, flags = _sysctl() if sys.platform == "darwin" else cpuinfo()
    known = INT8_FEATURES.get(family(), ())
    present = [(flag, name) for flag, name in known if flag in flags]
    return {"machine": platform.machine(), "model": model or platform.processor() or "unknown",
            "cores": os.cpu_count(), "features": [name for _, name in present], "flags": [flag for flag, _ in present]}


def cpu_summary() -> str:
    """One line: model, core count and INT8 features, e.g. ``Intel Xeon (2 cores; AVX2, AVX-512 VNNI)``."""
    cpu = cpu_record()
    features = ", ".join(cpu["features"]) or "no INT8 dot-product extensions found"
    return f"{cpu['model']} ({cpu['machine']}, {cpu['cores']} cores; {features})"


def has_int8_dot_product() -> bool:
    """Whether this CPU adds 8-bit products in one instruction (VNNI, AVX-VNNI, AMX, ARM dotprod or i8mm)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"} & set(cpu_record()["flags"]))
