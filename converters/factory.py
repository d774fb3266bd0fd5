"""Model factories given as ``path/to/file.py:factory`` or ``package.module:factory``.

Framework-neutral: the factory may return a ``torch.nn.Module`` or a ``keras.Model``; the
source adapter is chosen by what it returns (:func:`~stagewise.converters.source.source_of`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from stagewise.errors import ConversionError

from .source import source_of


ZOO = "stagewise.converters.zoo"
"""The built-in model zoo; ``zoo:efficientnet_lite0`` is short for ``stagewise.converters.zoo:efficientnet_lite0``."""


def factory_parts(spec: str) -> tuple[str, str]:
    """``spec``'s module (a ``.py`` path or a module name; ``zoo``: :data:`ZOO`) and factory name, opening nothing."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConversionError(f"model {spec!r}: give it as path/to/file.py:factory or package.module:factory")
    return (ZOO if where == "zoo" else where), name


def load_factory(spec: str) -> Callable[..., Any]:
    """Resolve ``spec`` to the callable it names (``zoo:NAME``: a model of :data:`ZOO`)."""
    where, name = factory_parts(spec)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConversionError(f"model file not found: {path}")
        module_name = "_stagewise_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        module = sys.modules.get(module_name)
        if module is None:
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            try:
                loader.loader.exec_module(module)
            except ImportError as exc:
                del sys.modules[module_name]
                raise ConversionError(f"{path} imports {exc.name or 'a module'}, which is not installed ({exc})") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConversionError(f"cannot import {where!r} for model {spec!r}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConversionError(f"{where} has no callable {name!r}")
    return factory


def build_model(spec: Any, image_size: int | None = None) -> Any:
    """Call the factory named by ``spec`` and return its model, prepared for conversion.

    ``spec`` may also be a model object (a ``torch.nn.Module`` or ``keras.Model``), which is
    prepared as it is.
    A factory that takes an ``image_size`` parameter is given the stage's input size (models
    such as EfficientNet-Lite build their padding for it). Torch models come back in eval
    mode; Keras models ending in a softmax come back as logit models sharing the weights.
    """
    if not isinstance(spec, str):
        return source_of(spec).prepare(spec)
    factory = load_factory(spec)
    kwargs = {}
    if image_size is not None:
        try:
            if "image_size" in inspect.signature(factory).parameters:
                kwargs["image_size"] = image_size
        except (TypeError, ValueError):
            pass
    model = factory(**kwargs)
    return source_of(model).prepare(model)
