"""A small Keras ResNet for CIFAR-10 (32x32 RGB), the model of the Keras real-data example.

Layout (NHWC float32 input, 32x32)::

    stem        conv3x3(16) + BN + ReLU                         32x32
    block1      residual block (16)       -> layer block1_out   32x32
    block2      residual block (32), /2   -> layer block2_out   16x16
    block3      residual block (64), /2   -> layer block3_out    8x8
    head        global average pooling -> dense(10) "predictions" (softmax)

Each block's last layer (``blockN_out``) is where a single tensor crosses, so the converter can
cut the network there: ``stagewise convert examples/cifar10_keras/model.py:cifar_resnet
--exits block1_out,block2_out ...``. The classifier ends in a softmax as ``keras.applications``
models do; stagewise converts it to logits with the same weights.

Inputs are RGB normalised per channel as ``(pixel - MEAN) / STD`` (0-255 units), declared to
stagewise through ``model.stagewise_input``. Trained weights live next to this file in
``cifar_resnet.weights.h5`` (written by ``train.py``); without them the factory returns the
untrained network and says so.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)
NUM_CLASSES = 10
WEIGHTS = Path(__file__).resolve().with_name("cifar_resnet.weights.h5")
CUTS = ("block1_out", "block2_out")


def _block(x, filters: int, stride: int, name: str):
    layers = keras.layers
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        x = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
        x = layers.BatchNormalization(name=f"{name}_proj_bn")(x)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, y]))


def build(widths: tuple[int, int, int] = (16, 32, 64)) -> keras.Model:
    """The untrained network."""
    layers = keras.layers
    inp = keras.Input((32, 32, 3), name="image")
    x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem_conv")(inp)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    x = _block(x, widths[0], 1, "block1")
    x = _block(x, widths[1], 2, "block2")
    x = _block(x, widths[2], 2, "block3")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out, name="cifar_resnet")
    model.stagewise_input = {"mean": list(MEAN), "std": list(STD), "resize": "stretch", "crop_fraction": 1.0,
                             "size": 32}
    return model


def cifar_resnet(weights: str | os.PathLike | None = None) -> keras.Model:
    """The example network with its trained weights (``cifar_resnet.weights.h5`` by default)."""
    model = build()
    path = Path(weights) if weights else WEIGHTS
    if path.exists():
        model.load_weights(str(path))
    else:
        warnings.warn(f"{path} not found: the network is untrained (run examples/cifar10_keras/train.py)", stacklevel=2)
    return model
