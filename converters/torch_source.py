"""Load a torch model factory given as ``path/to/file.py:factory`` or ``package.module:factory``."""

from __future__ import annotations

import importlib
import inspect
import importlib.util
import sys
from pathlib import Path
from typing import Callable

import torch

from stagewise.errors import ConversionError


def load_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """Resolve ``spec`` to a callable returning an ``nn.Module``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConversionError(f"model {spec!r}: give it as path/to/file.py:factory or package.module:factory")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConversionError(f"model file not found: {path}")
        module_name = f"_stagewise_model_{abs(hash(path.resolve()))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConversionError(f"cannot import {where!r} for model {spec!r}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConversionError(f"{where} has no callable {name!r}")
    return factory


def build_model(spec: str, image_size: int | None = None) -> torch.nn.Module:
    """Call the factory named by ``spec`` and return the model (a torch model in eval mode, or a Keras model).

    A factory that takes an ``image_size`` parameter is given the stage's input size (models
    such as EfficientNet-Lite build their padding for it).
    """
    factory = load_factory(spec)
    kwargs = {}
    if image_size is not None:
        try:
            if "image_size" in inspect.signature(factory).parameters:
                kwargs["image_size"] = image_size
        except (TypeError, ValueError):
            pass
    model = factory(**kwargs)
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        return model  # a Keras source model (see stagewise.converters.keras_source)
    if not isinstance(model, torch.nn.Module):
        raise ConversionError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module or a keras.Model")
    return model.eval()
