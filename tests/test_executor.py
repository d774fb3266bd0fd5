"""The sequential executor on a scripted mock backend: routing, budgets, batch routing, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stagewise.errors import ImageInputError, UnknownOperatingPointError
from stagewise.testing import scripted_cascade, scripted_image


def make_cascade(tmp_path, thresholds=None, **options):
    """Three chained scripted stages of 2, 5 and 20 ms with operating points ``default`` and ``strict``."""
    thresholds = thresholds or {"default": [0.8, 0.6, None], "strict": [0.99, 0.99, None]}
    return scripted_cascade(tmp_path / "bundle", thresholds=thresholds, **options)


def test_exits_at_first_confident_stage(tmp_path):
    cascade, sessions, _ = make_cascade(tmp_path)
    early = cascade.predict(scripted_image([240, 0, 0], label=2))
    assert (early.stage_index, early.label, early.name) == (0, 2, "c")
    assert [r.decision for r in early.trace] == ["exit"]
    assert early.score == pytest.approx(240 / 255, abs=1e-3)
    middle = cascade.predict(scripted_image([100, 200, 0], label=1))
    assert middle.stage_index == 1 and [r.decision for r in middle.trace] == ["continue", "exit"]
    last = cascade.predict(scripted_image([100, 100, 10], label=0))
    assert last.stage_index == 2 and [r.decision for r in last.trace] == ["continue", "continue", "last"]
    assert [len(s.calls) for s in sessions] == [3, 2, 1]


def test_operating_points_switch_and_unknown_name_is_refused(tmp_path):
    cascade, _, _ = make_cascade(tmp_path)
    image = scripted_image([240, 0, 0], label=1)
    assert cascade.predict(image).stage_index == 0
    assert cascade.predict(image, operating_point="strict").stage_index == 2
    cascade.use("strict")
    assert cascade.predict(image).stage_index == 2
    with pytest.raises(UnknownOperatingPointError, match="default, strict"):
        cascade.predict(image, operating_point="fastest")
    with pytest.raises(UnknownOperatingPointError):
        cascade.use("fastest")
    assert cascade.operating_point == "strict"


def test_budget_skips_stage_that_would_overrun(tmp_path):
    cascade, sessions, _ = make_cascade(tmp_path, latencies=(2.0, 5.0, 20.0))
    cascade.warm_up()
    unsure = scripted_image([10, 10, 10], label=1)
    p = cascade.predict(unsure, budget_ms=10)
    assert p.budget_limited and p.stage_index == 1
    assert [r.decision for r in p.trace] == ["continue", "continue", "skipped_budget"]
    assert p.trace[2].predicted_ms == pytest.approx(20.0)
    assert p.elapsed_ms <= 10
    roomy = cascade.predict(unsure, budget_ms=30)
    assert not roomy.budget_limited and roomy.stage_index == 2


def test_budget_always_runs_first_stage(tmp_path):
    cascade, _, _ = make_cascade(tmp_path, latencies=(2.0, 5.0, 20.0))
    cascade.warm_up()
    p = cascade.predict(scripted_image([10, 10, 10], label=0), budget_ms=0.5)
    assert p.stage_index == 0 and p.budget_limited
    assert [r.decision for r in p.trace] == ["continue", "skipped_budget", "skipped_budget"]


def test_latency_model_learns_a_slower_stage(tmp_path):
    cascade, sessions, _ = make_cascade(tmp_path, latencies=(2.0, 5.0, 20.0))
    cascade.warm_up()
    unsure = scripted_image([10, 10, 10], label=0)
    assert cascade.predict(unsure, budget_ms=12).stage_index == 1
    sessions[1].latency = 15.0
    for _ in range(10):
        cascade.predict(unsure, budget_ms=100)
    p = cascade.predict(unsure, budget_ms=12)
    assert p.stage_index == 0 and p.trace[1].decision == "skipped_budget"


def test_batch_routing_matches_one_by_one(tmp_path):
    cascade, sessions, _ = make_cascade(tmp_path)
    rng = np.random.default_rng(0)
    images = [scripted_image(list(rng.integers(0, 256, 3)), int(rng.integers(0, 3))) for _ in range(40)]
    single = [cascade.predict(im) for im in images]
    for s in sessions:
        s.calls.clear()
    batch = cascade.predict_batch(images)
    assert [(p.label, p.stage_index) for p in batch] == [(p.label, p.stage_index) for p in single]
    np.testing.assert_allclose([p.score for p in batch], [p.score for p in single], rtol=1e-6)
    exited_first = sum(p.stage_index == 0 for p in single)
    assert sessions[0].calls == [40]
    assert sessions[1].calls == [40 - exited_first]
    assert sessions[2].calls == [sum(p.stage_index == 2 for p in single)]
    chunked = cascade.predict_batch(images, max_batch=7)
    assert [(p.label, p.stage_index) for p in chunked] == [(p.label, p.stage_index) for p in single]
    assert sessions[0].calls[1:] == [7, 7, 7, 7, 7, 5]


def test_mean_probs_combines_earlier_stages(tmp_path):
    cascade, _, _ = make_cascade(tmp_path, combine="mean_probs", thresholds={"full": [None, None, None]})
    p = cascade.predict(scripted_image([200, 100, 50], label=1))
    own = [r.score for r in p.trace]
    assert own[0] == pytest.approx(200 / 255, abs=1e-3)
    assert own[1] == pytest.approx((200 + 100) / 2 / 255, abs=1e-3)
    assert p.probabilities.sum() == pytest.approx(1.0)


def test_image_inputs_are_checked(tmp_path):
    cascade, _, _ = make_cascade(tmp_path)
    good = scripted_image([240, 0, 0], label=2)
    with pytest.raises(ImageInputError, match="uint8"):
        cascade.predict(good.astype(np.float32))
    with pytest.raises(ImageInputError, match="HxWx3"):
        cascade.predict(good[..., 0])
    with pytest.raises(ImageInputError, match="HxWx3"):
        cascade.predict(np.zeros((8, 8, 4), dtype=np.uint8))
    with pytest.raises(ImageInputError, match="not found"):
        cascade.predict(tmp_path / "missing.png")
    with pytest.raises(ImageInputError, match="unsupported image type"):
        cascade.predict([1, 2, 3])
    path = tmp_path / "good.png"
    Image.fromarray(good).save(path)
    assert cascade.predict(path).label == cascade.predict(Image.fromarray(good)).label == 2


def test_listeners_see_every_answer_of_predict_and_predict_batch(tmp_path):
    cascade, _, _ = make_cascade(tmp_path)
    seen = []
    cascade.add_listener(seen.append)
    one = cascade.predict(scripted_image([240, 0, 0], label=2))
    many = cascade.predict_batch([scripted_image([100, 200, 0], label=1), scripted_image([100, 100, 10], label=0)])
    assert seen == [one, *many]
    cascade.remove_listener(seen.append)
    cascade.predict(scripted_image([240, 0, 0], label=2))
    assert len(seen) == 3
