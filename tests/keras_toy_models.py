"""Tiny Keras classifiers for converter tests (also loadable by the CLI as keras_toy_models.py:factory)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

INPUT = {"mean": [128, 128, 128], "std": [64, 64, 64], "resize": "stretch", "crop_fraction": 1.0}


def residual_net(classes: int = 3, size: int = 16, softmax: bool = True) -> keras.Model:
    """stem -> block1 (residual, output layer ``block1_out``) -> down -> block2 (``block2_out``) -> GAP -> dense.

    Like ``keras.applications`` models, the classifier ends in a softmax unless ``softmax=False``.
    """
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inp = keras.Input((size, size, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    y = layers.Conv2D(8, 3, padding="same", name="block1_conv1")(x)
    y = layers.BatchNormalization(name="block1_bn")(y)
    y = layers.ReLU(name="block1_relu")(y)
    y = layers.Conv2D(8, 3, padding="same", name="block1_conv2")(y)
    x = layers.ReLU(name="block1_out")(layers.Add(name="block1_add")([x, y]))
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="down")(x)
    y = layers.DepthwiseConv2D(3, padding="same", name="block2_dw")(x)
    y = layers.Conv2D(16, 1, name="block2_pw")(y)
    x = layers.ReLU(name="block2_out")(layers.Add(name="block2_add")([x, y]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(classes, activation="softmax" if softmax else None, name="predictions")(x)
    model = keras.Model(inp, out, name="toy_residual")
    model.stagewise_input = dict(INPUT, size=size)
    return model


def small_cnn(classes: int = 3, size: int | None = None) -> keras.Model:
    """A plain CNN with a dynamic input size (for resolution cascades)."""
    keras.utils.set_random_seed(1)
    layers = keras.layers
    inp = keras.Input((size, size, 3), name="image")
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(classes, name="logits")(x)
    model = keras.Model(inp, out, name="toy_cnn")
    model.stagewise_input = dict(INPUT)
    return model


def factory() -> keras.Model:
    """CLI entry point: ``tests/keras_toy_models.py:factory``."""
    return residual_net()
