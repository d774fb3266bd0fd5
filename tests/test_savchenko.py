"""Savchenko's method: linear heads on L2-normalised pooled features, BH thresholds, retraining, bundle."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from stagewise.converters.savchenko import (SavchenkoSettings, add_alpha_points, fit_linear_head, l2_normalised,
                                            max_wrong_class, savchenko_heads)


def synthetic_features(n=600, classes=4, seed=0):
    """Three stages of features; class means separate better at later stages."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    out = []
    for sep, dim in ((0.6, 8), (1.2, 16), (2.5, 32)):
        centres = rng.normal(size=(classes, dim)) * sep
        out.append(np.abs(centres[labels] + rng.normal(size=(n, dim))) + 0.1)
    return out, labels


def test_max_wrong_class_hand_example():
    d = np.array([[3.0, 1.0, -2.0], [0.5, 0.7, 0.9]])
    np.testing.assert_array_equal(max_wrong_class(d, np.array([0, 2])), [1.0, 0.7])


def test_heads_use_l2_normalised_features():
    feats, labels = synthetic_features()
    head = fit_linear_head(feats[1], labels, 4, SavchenkoSettings())
    np.testing.assert_allclose(head.decision(feats[1] * 7.0), head.decision(feats[1]), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(l2_normalised(feats[1]), axis=1), 1.0)
    assert (head.decision(feats[1]).argmax(1) == labels).mean() > 0.6


def test_thresholds_follow_the_bh_rule_then_heads_are_retrained():
    feats, labels = synthetic_features()
    settings = SavchenkoSettings(delta=0.5, alphas=(0.02, 0.1, 0.3))
    result = savchenko_heads(feats, labels, 4, settings)
    rec = result.record
    assert (rec["head_images_K"], rec["threshold_images"], rec["images"]) == (300, 300, 600)
    m_total = 3
    for alpha, thr in result.thresholds.items():
        assert np.isinf(thr[-1])
        for m in (1, 2):
            wrong = max_wrong_class(result.held_out_decisions[m - 1], result.held_out_targets)
            rank = int(np.floor(alpha * m * 300 / m_total))
            if rank == 0:
                assert np.isinf(thr[m - 1])
                continue
            # the threshold is the rank-th largest maximal wrong-class score of the N - K images
            assert thr[m - 1] == np.sort(wrong)[::-1][rank - 1]
            assert (wrong >= thr[m - 1]).mean() <= alpha * m / m_total + 1e-12
    # smaller alpha, stricter thresholds
    assert all(a >= b for a, b in zip(result.thresholds[0.02][:2], result.thresholds[0.3][:2]))
    # the final heads are the ones refitted on all N images
    refit = fit_linear_head(feats[2], labels, 4, settings)
    np.testing.assert_allclose(result.heads[2].weight, refit.weight)


def test_logistic_variant_and_bad_delta():
    feats, labels = synthetic_features(n=200)
    result = savchenko_heads(feats, labels, 4, SavchenkoSettings(classifier="logistic", alphas=(0.1,)))
    assert result.record["classifier"] == "logistic_regression"
    from stagewise.errors import ConversionError

    with pytest.raises(ConversionError, match="delta"):
        savchenko_heads(feats, labels, 4, SavchenkoSettings(delta=1.0))


def test_bundle_heads_match_and_alpha_points_drive_the_runtime(tmp_path, image_folder):
    torch = pytest.importorskip("torch")
    from stagewise.bundle import update_manifest
    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.savchenko import backbone_features, plans_from_heads
    from stagewise.datasets import open_image_set
    from stagewise.images import Preprocess
    from stagewise.runtimes import load
    from toy_models import residual_net

    torch.manual_seed(0)
    pre = Preprocess(mean=(128, 128, 128), std=(64, 64, 64), resize="stretch", crop_fraction=1.0)
    images, calib = open_image_set(image_folder).split([0.7, 0.3], seed=0)
    model = residual_net()
    cuts = ["layer1", "pool"]
    feats = backbone_features(model, cuts, pre, (16, 16), images)
    result = savchenko_heads(feats, images.targets, 3, SavchenkoSettings(alphas=(0.1, 0.3)))
    plans = plans_from_heads(model, cuts, pre, (16, 16), result.heads, result.record)
    out = build_bundle(tmp_path / "sav.swb", "sav", plans, pre, images.classes, calib, BuildOptions(profile_images=5))
    manifest = update_manifest(out, lambda m, root: add_alpha_points(m, result, default_alpha=0.3))
    assert manifest.default_operating_point == "alpha-0.3"
    assert manifest.stages[0].exit.score == "max_logit"
    assert manifest.stages[0].head["classifier"] == "linear_svm_squared_hinge"
    assert manifest.point("alpha-0.3").thresholds[0] == pytest.approx(result.thresholds[0.3][0])
    frames = [calib.image(i) for i in range(len(calib))]
    with load(out, threads=1) as cascade:
        logits = cascade.stage_logits(frames)
        expected = backbone_features(model, cuts, pre, (16, 16), calib)
        for k in range(2):  # the exported heads output the heads' decision values
            np.testing.assert_allclose(logits[k], result.heads[k].decision(expected[k]), atol=1e-4)
        t = result.thresholds[0.3][0]
        for frame, d0 in zip(frames, logits[0]):
            assert (cascade.predict(frame).stage_index == 0) == (d0.max() >= t)
