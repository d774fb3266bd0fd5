"""Optional dependencies (the ``pip install "stagewise[...]"`` extras), imported where a feature needs them.

Every import of an optional package for a user-facing feature goes through :func:`require`, so a
missing extra is a :class:`MissingExtraError` that names the install command, never a bare
``ModuleNotFoundError``. The converters use it too, e.g.::

    torch = require("torch", "torch", "converting a PyTorch model")
    tf = require("tensorflow", "keras", "converting a Keras model")
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import and return ``module``, which the ``extra`` of stagewise installs.

    ``purpose`` says what needs it, as the start of a sentence ("reading video", "converting a
    Keras model"). If the module (or something it imports) is missing, raise
    :class:`MissingExtraError`: ``<purpose> needs <package>: pip install "stagewise[<extra>]"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f'{purpose} needs {module.split(".")[0]}, which is not installed: '
                                f'pip install "stagewise[{extra}]" ({exc})') from exc
