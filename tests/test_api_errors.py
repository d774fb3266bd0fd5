"""The Python API refuses bad arguments with a StagewiseError saying what to do, never a raw exception
or a silent wrong answer: budgets, stage indices, a closed cascade, typed runtime options, NaN scores."""

from __future__ import annotations

import pytest

import stagewise
from stagewise.bundle import write_bundle
from stagewise.errors import InvalidOptionError, StagewiseError
from toy_bundle import onnx_stage_model, toy_bundle, toy_files, toy_image, toy_manifest

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    return toy_bundle(folder / "b", folder / "models")


@pytest.fixture()
def cascade(bundle):
    with stagewise.load(bundle, runtime="onnxruntime", warmup=False) as c:
        yield c


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0, "5", True],
                         ids=["nan", "inf", "negative", "string", "bool"])
def test_a_budget_that_is_not_a_finite_number_of_milliseconds_is_refused(cascade, budget):  # 10**400: no deadline
    with pytest.raises(InvalidOptionError, match="budget_ms"):
        cascade.predict(toy_image(), budget_ms=budget)


@pytest.mark.parametrize("stage", [5, 3, -1, 1.0, "0", True])
def test_predict_stage_takes_only_an_existing_stage_index(cascade, stage):
    with pytest.raises(InvalidOptionError, match="stage"):
        cascade.predict_stage(toy_image(), stage)


def test_predict_stage_still_answers_for_every_stage(cascade):
    assert [cascade.predict_stage(toy_image(), k).stage_index for k in range(3)] == [0, 1, 2]


def test_a_closed_cascade_says_so(bundle):
    cascade = stagewise.load(bundle, runtime="onnxruntime", warmup=False)
    cascade.close()
    for call in (lambda: cascade.predict(toy_image()), lambda: cascade.predict_batch([toy_image()]),
                 lambda: cascade.predict_stage(toy_image(), 0)):
        with pytest.raises(StagewiseError, match="closed"):
            call()


@pytest.mark.parametrize("options, name", [({"providers": 5}, "providers"), ({"session_config": [1]}, "session_config"),
                                           ({"cache_dir": 3}, "cache_dir"), ("cache_dir", "options must be")])
def test_typed_runtime_options_of_the_wrong_type_are_refused(bundle, options, name):
    with pytest.raises(InvalidOptionError, match=name):
        stagewise.load(bundle, runtime="onnxruntime", warmup=False, options=options)


def test_a_stage_that_answers_nan_is_an_error_not_an_answer(tmp_path):
    files = toy_files(tmp_path / "models")
    onnx_stage_model(files["onnx/s0.onnx"], 4, 4, scale=float("nan"))
    out = write_bundle(tmp_path / "nan", toy_manifest(), files)
    with stagewise.load(out, runtime="onnxruntime", warmup=False) as cascade:
        with pytest.raises(StagewiseError, match="(?i)nan|finite"):
            cascade.predict(toy_image(), operating_point="fast")
