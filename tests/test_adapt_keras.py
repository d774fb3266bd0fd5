"""BatchNorm re-estimation of a Keras model at a new input size (the Keras side of stagewise.converters.adapt)."""

from __future__ import annotations

import numpy as np
import pytest

from stagewise.converters.adapt import Adaptation, adapt
from stagewise.errors import ConversionError
from stagewise.images import Preprocess

keras = pytest.importorskip("keras", reason='the Keras adaptation test needs Keras: pip install "stagewise[keras]" (the dev install has it)')

from toy_images import texture_images  # noqa: E402
from keras_toy_models import residual_net  # noqa: E402

PRE = Preprocess(mean=(128.0,) * 3, std=(64.0,) * 3, layout="NHWC", resize="stretch", crop_fraction=1.0)


def test_keras_bn_reestimation_is_the_cumulative_average_at_the_stage_size():
    model = residual_net(softmax=False, size=None)
    bn = model.get_layer("block1_bn")
    before = {w.path: np.array(w.numpy()) for w in model.weights}
    images = texture_images(64, 3, size=24)
    record = adapt(model, Adaptation("bn"), PRE, (12, 12), images)
    assert record["batchnorm_layers"] == 1 and record["size"] == [12, 12]
    features = keras.Model(model.inputs, bn.input)
    order = np.random.default_rng(0).permutation(len(images))  # adapt's batches: shuffled with its seed
    x = PRE.tensor([images.image(int(i)) for i in order], (12, 12))
    means = np.stack([np.asarray(features(x[i:i + 32])).mean((0, 1, 2)) for i in (0, 32)])
    variances = np.stack([np.asarray(features(x[i:i + 32])).var((0, 1, 2)) for i in (0, 32)])
    assert np.allclose(bn.moving_mean.numpy(), means.mean(0), atol=1e-4)
    assert np.allclose(bn.moving_variance.numpy(), variances.mean(0), rtol=1e-3)
    assert bn.momentum == 0.99
    changed = {w.path for w in model.weights if not np.array_equal(np.array(w.numpy()), before[w.path])}
    assert changed == {bn.moving_mean.path, bn.moving_variance.path}


def test_keras_head_adaptation_is_refused_with_a_way_out():
    with pytest.raises(ConversionError, match="torch models only; use --adapt bn"):
        adapt(residual_net(softmax=False, size=None), Adaptation("head"), PRE, (12, 12), texture_images(64, 3))
