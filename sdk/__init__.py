"""stagewise: image classifiers as sequences of stages that stop as soon as they are sure.

Device-side entry point::

    import stagewise
    cascade = stagewise.load("model.swb", runtime="auto", threads=2)
    p = cascade.predict(image, budget_ms=12)

``import stagewise`` loads numpy, Pillow and jsonschema only; runtimes are imported when a
bundle is loaded and converters (torch, tensorflow) only from ``stagewise.converters``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .deprecation import renamed_keywords
from .errors import (BackendUnavailableError, BundleError, CalibrationError, ConversionError, DatasetError,
                     DeadlineExceededError, DeviceUnavailableError,
                     ImageInputError, IntegrityError, InvalidCutPointError,
                     InvalidOptionError, ManifestError, MissingExtraError, SignatureError, StagewiseError,
                     UnknownOperatingPointError, UnknownOptionError, UnsafeArchiveError, VerificationError)

if TYPE_CHECKING:
    from .runtimes import Cascade
    from .runtimes.options import RuntimeOptions

__version__ = "0.1.0"


@renamed_keywords(backend="runtime")
def load(path: str | os.PathLike, runtime: str = "auto", device: str = "CPU", threads: int | None = None,
         options: "RuntimeOptions | Mapping[str, Any] | None" = None, *, prefer: Sequence[str] | None = None,
         warmup: bool = True, mean_budget_ms: float | None = None, profile: str | None = None,
         latency: dict | None = None, trusted_keys: Sequence[Any] | None = None) -> "Cascade":
    """Open a bundle (directory or ``.swb`` file) and return a :class:`~stagewise.runtimes.Cascade`.

    ``runtime``: ``"onnxruntime"``, ``"openvino"``, ``"litert"``, ``"auto"`` (the
    first installed runtime, in the order of ``prefer`` or ``$STAGEWISE_PREFER``, whose format the
    bundle carries) or a comma-separated preference list. ``device``: the runtime's device (CPU;
    OpenVINO also GPU, NPU, AUTO; LiteRT a delegate's label). ``threads``: intra-op threads
    (``None``: the runtime's default). ``options``: the runtime's own settings, as its options
    dataclass (:class:`~stagewise.runtimes.options.OnnxRuntimeOptions`, ``OpenVinoOptions``,
    ``LiteRTOptions``) or a dict of them; an unknown key raises :class:`UnknownOptionError`
    listing the valid ones. ``warmup``: run every stage once before returning.
    ``mean_budget_ms``: start the average-budget mode; ``profile``: the device profile that
    seeds the latency model; ``latency``: options of the latency model. ``trusted_keys``: Ed25519
    public keys (PEM files or bytes): only a bundle signed by one of them loads (``stagewise sign``).
    ``backend=`` is the deprecated name of ``runtime=``.
    """
    from .runtimes import load as _load

    return _load(path, runtime=runtime, device=device, threads=threads, prefer=prefer, warmup=warmup,
                 options=options, mean_budget_ms=mean_budget_ms, profile=profile, latency=latency,
                 trusted_keys=trusted_keys)


__all__ = ["BackendUnavailableError", "BundleError", "CalibrationError", "ConversionError", "DatasetError",
           "DeadlineExceededError", "DeviceUnavailableError",
           "ImageInputError", "IntegrityError", "InvalidCutPointError", "InvalidOptionError",
           "ManifestError", "MissingExtraError", "SignatureError", "StagewiseError", "UnknownOperatingPointError",
           "UnknownOptionError", "UnsafeArchiveError", "VerificationError", "__version__", "load"]
