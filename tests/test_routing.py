"""The stage router: image and carry inputs for any rows of a batch, for bundles and converter plans."""

from __future__ import annotations

import numpy as np
import pytest

from stagewise.errors import ManifestError
from stagewise.images import Preprocess
from stagewise.manifest import StageInput
from stagewise.runtimes.routing import Carries, StageRouter, run_chain, stage_tensors

PRE = Preprocess(mean=(0, 0, 0), std=(1, 1, 1), layout="NHWC", resize="stretch")


def images(n: int, size: int = 8) -> list[np.ndarray]:
    return [np.full((size, size, 3), 10 * i, dtype=np.uint8) for i in range(n)]


def three_stages() -> StageRouter:
    """s0 reads the image at 4x4 and hands on a carry, s1 reads it, s2 reads the image at 8x8."""
    return StageRouter(("s0", "s1", "s2"), (StageInput.image((4, 4), "image"), StageInput.carry("s0", "carry_in"),
                                            StageInput.image((8, 8), "image")), PRE, ("carry", None, None))


def test_image_and_carry_inputs_for_a_subset_of_rows():
    router = three_stages()
    imgs = images(5)
    carries = Carries(5)
    x0 = router.input(0, imgs, carries)
    assert x0.shape == (5, 4, 4, 3) and x0[3, 0, 0, 0] == 30
    router.keep(0, {"logits": np.zeros((5, 2)), "carry": np.arange(5.0)[:, None] * np.ones((5, 6))}, carries)
    rows = np.array([1, 4])
    np.testing.assert_array_equal(router.input(1, imgs, carries, rows)[:, 0], [1.0, 4.0])
    x2 = router.input(2, imgs, carries, rows)
    assert x2.shape == (2, 8, 8, 3) and list(x2[:, 0, 0, 0]) == [10, 40]
    assert router.chain(1) == [0, 1] and router.chain(2) == [2]
    assert router.reads_image(2) and not router.reads_image(1) and router.carry_from(1) == 0
    assert router.image_sizes() == [(4, 4), (8, 8)]


def test_carries_stored_for_some_rows_are_read_back_by_row():
    carries = Carries(4)
    carries.store(0, np.array([[1.0], [3.0]]), np.array([1, 3]))
    carries.store(0, np.array([[2.0]]), np.array([2]))
    np.testing.assert_array_equal(carries.take(0, np.array([3, 1, 2]))[:, 0], [3.0, 1.0, 2.0])


def test_converter_plans_route_the_same_way():
    sources = [{"source": "image", "size": [4, 4]}, {"source": "carry", "from": "a"},
               {"source": "image", "size": [8, 8]}]
    router = StageRouter.from_sources(["a", "b", "c"], sources, PRE)
    assert router.carry_outputs == ("carry", None, None) and router.inputs[1].tensor is None
    ran = []

    def run_stage(k: int, x: np.ndarray) -> dict[str, np.ndarray]:
        ran.append(k)
        flat = x.reshape(len(x), -1)
        return {"carry": flat[:, :3] + 1.0, "logits": flat[:, :2]} if k == 0 else {"logits": flat[:, :2]}

    imgs = images(5)
    only_inputs = stage_tensors(router, imgs, run_stage, batch=2)
    assert ran == [0, 0, 0] and only_inputs.outputs is None  # only the stage whose carry is read runs
    assert [x.shape for x in only_inputs.inputs] == [(5, 4, 4, 3), (5, 3), (5, 8, 8, 3)]
    np.testing.assert_array_equal(only_inputs.inputs[1][:, 0], 10.0 * np.arange(5) + 1.0)
    ran.clear()
    full = stage_tensors(router, imgs, run_stage, batch=2, outputs=True)
    assert sorted(set(ran)) == [0, 1, 2] and full.outputs[2]["logits"].shape == (5, 2)
    np.testing.assert_array_equal(full.outputs[1]["logits"], only_inputs.inputs[1][:, :2])


@pytest.mark.parametrize("inputs, carry_outputs, message", [
    ((StageInput.image((4, 4)), StageInput.carry("a")), (None, None), "not an earlier stage with a carry output"),
    ((StageInput.carry("b"), StageInput.image((4, 4))), ("carry", None), "not an earlier stage"),
    ((StageInput.image((4, 4)), StageInput("mask", size=(2, 2))), ("carry", None), "routes 'image', 'carry' and 'patch'"),
    ((StageInput.image((4, 4)), StageInput("patch", size=(2, 2), from_stage="a", count=1, iou=0.5, patch_fraction=0.5,
                                           index=0)), (None, None), "not an earlier stage with a CAM output"),
])
def test_bad_routes_are_refused(inputs, carry_outputs, message):
    with pytest.raises(ManifestError, match=message):
        StageRouter(("a", "b"), inputs, PRE, carry_outputs)


def test_run_chain_runs_what_is_asked_and_what_later_stages_read():
    router = three_stages()

    def run_stage(k: int, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"carry": np.ones((len(x), 2)) * k, "logits": np.zeros((len(x), 2))}

    ran = [(k, out is not None) for k, _, out in run_chain(router, images(3), run_stage, run={2})]
    assert ran == [(0, True), (1, False), (2, True)]
