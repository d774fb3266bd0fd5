"""Keras side of :mod:`~stagewise.converters.adapt`: BatchNorm statistics re-estimated at a new input size."""

from __future__ import annotations

from typing import Iterable

import keras
import numpy as np

from stagewise.errors import ConversionError


def _layers(model: keras.Layer) -> list[keras.Layer]:
    """Every layer of ``model``, nested models included, each once."""
    seen: dict[int, keras.Layer] = {}
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop(0)
        if id(layer) not in seen:
            seen[id(layer)] = layer
            stack.extend(getattr(layer, "layers", []))
    return list(seen.values())


def reestimate_bn(model: keras.Model, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> int:
    """Replace every BatchNormalization layer's moving mean and variance by their cumulative average over ``batches``.

    The model runs with ``training=True``; batch ``k`` (1-based) gets momentum ``(k - 1) / k``, so
    after the pass the moving statistics are the mean of the per-batch statistics. Dropout layers
    run at rate 0 and no weights other than the moving statistics change. Returns how many
    BatchNormalization layers were re-estimated.
    """
    layers = _layers(model)
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        raise ConversionError("the Keras model has no BatchNormalization layers, so --adapt bn has nothing to "
                              "re-estimate; convert it without --adapt")
    drops = [layer for layer in layers if isinstance(layer, keras.layers.Dropout)]
    saved = [(layer.momentum, layer.trainable) for layer in norms]
    rates = [layer.rate for layer in drops]
    weights = [(w, np.array(w.numpy())) for layer in layers if layer not in norms for w in layer.weights]
    for layer in drops:
        layer.rate = 0.0
    try:
        for k, (_, x) in enumerate(batches, start=1):
            for layer in norms:
                layer.momentum = (k - 1) / k
                layer.trainable = True
            model(x, training=True)
    finally:
        for layer, (momentum, trainable) in zip(norms, saved):
            layer.momentum, layer.trainable = momentum, trainable
        for layer, rate in zip(drops, rates):
            layer.rate = rate
    for w, value in weights:
        if not np.array_equal(np.array(w.numpy()), value):
            raise ConversionError(f"re-estimating BatchNorm statistics changed the weight {w.path}; a layer of "
                                  "this model updates state in training mode, so use it without --adapt")
    return len(norms)
