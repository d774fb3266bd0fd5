"""stagewise: image classifiers as sequences of stages that stop as soon as they are sure.

Device-side entry point::

    import stagewise
    cascade = stagewise.load("model.swb", backend="auto", threads=2)
    p = cascade.predict(image, budget_ms=12)

``import stagewise`` loads numpy, Pillow and jsonschema only; runtimes are imported when a
bundle is loaded and converters (torch, tensorflow) only from ``stagewise.converters``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (BackendUnavailableError, BundleError, CalibrationError, ConversionError, DatasetError,
                     DeviceUnavailableError, ImageInputError, IntegrityError, InvalidCutPointError, ManifestError,
                     MissingExtraError, StagewiseError, UnknownOperatingPointError, UnsafeArchiveError,
                     VerificationError)

if TYPE_CHECKING:
    from .runtimes import Cascade

__version__ = "0.1.0"


def load(path: Any, backend: str = "auto", **kwargs: Any) -> "Cascade":
    """Load a bundle for inference; see :func:`stagewise.runtimes.load` for every option."""
    from .runtimes import load as _load

    return _load(path, backend=backend, **kwargs)


__all__ = ["BackendUnavailableError", "BundleError", "CalibrationError", "ConversionError", "DatasetError",
           "DeviceUnavailableError", "ImageInputError", "IntegrityError", "InvalidCutPointError", "ManifestError",
           "MissingExtraError", "StagewiseError", "UnknownOperatingPointError", "UnsafeArchiveError",
           "VerificationError", "__version__", "load"]
