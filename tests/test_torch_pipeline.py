"""PyTorch -> ONNX early-exit and cascade conversion, end to end on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stagewise
from stagewise.converters.build import build_bundle, stage_inputs
from stagewise.converters.export import StageInputs, export_stage, exporter
from stagewise.converters.heads import HeadTraining
from stagewise.converters.options import BuildOptions
from stagewise.converters.plans import cascade_plans, early_exit_plans
from stagewise.datasets import open_image_set
from stagewise.errors import ConversionError, InvalidCutPointError
from stagewise.images import Preprocess
from toy_models import concat_net, residual_net

PRE = Preprocess(mean=(128, 128, 128), std=(64, 64, 64), resize="stretch", crop_fraction=1.0)
FAST_HEADS = HeadTraining(max_iter=100)


@pytest.fixture(scope="module")
def splits(image_folder):
    return open_image_set(image_folder).split([0.5, 0.5], seed=0)


@pytest.mark.parametrize("factory, cuts", [(residual_net, ["layer1"]), (concat_net, ["block1"])])
def test_onnx_stages_match_torch(tmp_path, splits, factory, cuts):
    train, calib = splits
    model = factory()
    plans = early_exit_plans(model, cuts, PRE, (16, 16), train, FAST_HEADS)
    images = [calib.image(i) for i in range(12)]
    inputs = stage_inputs(plans, PRE, images)
    carry = None
    for plan, x in zip(plans, inputs):
        art, files, _ = export_stage(exporter("onnx"), plan, tmp_path, StageInputs(x, x, x), BuildOptions())
        assert art["verification"]["top1_agreement"] == 1.0
        assert max(art["verification"]["max_abs_diff"].values()) < 1e-4
        got = exporter("onnx").run(plan, list(files.values()), x if carry is None else carry)
        outs = [got[name] for name in plan.output_names]
        carry = outs[0] if plan.has_carry else None
    with torch.no_grad():
        reference = model(torch.from_numpy(PRE.tensor(images, (16, 16)))).numpy()
    np.testing.assert_allclose(outs[-1], reference, atol=1e-4)


def test_invalid_cut_lists_valid_ones(splits):
    with pytest.raises(InvalidCutPointError) as err:
        early_exit_plans(residual_net(), ["layer1.conv1"], PRE, (16, 16), splits[0], FAST_HEADS)
    for name in ("layer1", "down", "layer2"):
        assert name in str(err.value)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, splits):
    train, calib = splits
    plans = early_exit_plans(residual_net(), ["layer1"], PRE, (16, 16), train, FAST_HEADS)
    out = tmp_path_factory.mktemp("b") / "toy.swb"
    return build_bundle(out, "toy", plans, PRE, train.classes, calib,
                        BuildOptions(int8=True, quantization_images=32, profile_images=5))


def test_bundle_records_precision_agreement_and_calibration(int8_bundle, splits):
    with stagewise.load(int8_bundle, threads=1) as cascade:
        m = cascade.bundle.manifest
        for stage in m.stages:
            onnx = stage.artifacts["onnx"]
            q = onnx.quantization
            assert 0.0 <= q["agreement_with_fp32"] <= 1.0
            assert onnx.precision == ("fp32" if q["kept_fp32"] else "int8")
            low, high = q["agreement_interval"]
            assert low <= q["agreement_with_fp32"] <= high
            low, high = q["difference_interval"]
            assert q["rule"] == "accuracy" and low <= q["accuracy_difference"] <= high and q["max_drop"] == 0.005
            passes = low >= -0.005 or (high >= -0.005 and q["accuracy_difference"] >= -0.005)
            assert q["kept_fp32"] == (not passes)  # the paired interval decides, the point estimate only when it cannot
            assert q["decided_by"] == ("point estimate" if low < -0.005 <= high else "interval")
            assert q["host_speedup"] == pytest.approx(q["host_latency_ms"]["float"] / q["host_latency_ms"]["int8"],
                                                      rel=1e-2)
            assert stage.cost.latency("onnxruntime-cpu-1t").p50 > 0
        from stagewise.reports import manifest_tables

        artifacts = manifest_tables(m)[0].columns[2]._cells  # what `stagewise inspect` prints per stage
        assert all("float speed when built" in cell for cell in artifacts) and len(artifacts) == len(m.stages)
        cal = m.calibration
        quantized = any(stage.artifacts["onnx"].precision == "int8" for stage in m.stages)
        assert ("float_reference_accuracy" in cal) == quantized
        for point in m.operating_points:
            goal = point.goal
            if goal["kind"] == "max_accuracy_drop":
                assert goal.get("reference_model") == ("float" if quantized else None)
                if goal.get("reached", True):  # drops from the float full model, the INT8 loss inside them
                    assert point.expected.accuracy >= goal["reference_accuracy"] - goal["drop"] - 1e-12
        assert m.default_operating_point == "drop-0.5pt"
        assert cal["n"] == len(splits[1])


def test_calibration_expectation_matches_runtime_on_calibration_images(int8_bundle, splits):
    _, calib = splits
    images = [calib.image(i) for i in range(len(calib))]
    with stagewise.load(int8_bundle, threads=1) as cascade:
        for point in cascade.bundle.manifest.operating_points:
            preds = cascade.predict_batch(images, operating_point=point.name)
            acc = np.mean([p.label == y for p, y in zip(preds, calib.targets)])
            assert acc == pytest.approx(point.expected.accuracy)
            rates = np.bincount([p.stage_index for p in preds], minlength=2) / len(preds)
            np.testing.assert_allclose(rates, point.expected.exit_rates)


def test_batch_equals_single_on_real_runtime(int8_bundle, splits):
    _, calib = splits
    images = [calib.image(i) for i in range(len(calib))]
    with stagewise.load(int8_bundle, threads=1) as cascade:
        cascade.use("drop-2pt")
        single = [cascade.predict(im) for im in images]
        batch = cascade.predict_batch(images)
    assert [(p.label, p.stage_index) for p in batch] == [(p.label, p.stage_index) for p in single]


def test_exported_stages_decide_in_their_graph(int8_bundle, splits):
    """Every converted ONNX stage outputs its exit score and answer; they equal the executor's numpy scoring of
    the same stage logits."""
    from stagewise.exits import all_stage_scores

    _, calib = splits
    images = [calib.image(i) for i in range(20)]
    with stagewise.load(int8_bundle, threads=1) as cascade:
        stages = cascade.bundle.manifest.stages
        assert all(s.artifacts["onnx"].decision["score"] == s.exit.score for s in stages)
        assert all(st.decision is not None for st in cascade._stages)
        expected = all_stage_scores([s.exit.score for s in stages], cascade.stage_logits(images),
                                    [s.exit.temperature for s in stages], [s.exit.combine for s in stages])
        got = np.array([[r.score for r in cascade.run_all_stages(im).trace] for im in images]).T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cascade_stages_see_their_own_resolution(tmp_path, splits):
    _, calib = splits
    class SizeProbe(torch.nn.Module):
        def __init__(self, classes=3):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, classes)

        def forward(self, x):
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    plans = cascade_plans([("small", SizeProbe(), (8, 8)), ("large", SizeProbe(), (16, 12))], combine="mean_probs")
    out = build_bundle(tmp_path / "c", "c", plans, PRE, calib.classes, calib, BuildOptions(profile_images=3))
    with stagewise.load(out, threads=1) as cascade:
        inputs = [s.input for s in cascade.bundle.manifest.stages]
        assert [i.size for i in inputs] == [(8, 8), (16, 12)]
        assert [(i.dtype, i.layout) for i in inputs] == [("uint8", "NHWC")] * 2
        shapes = []
        runners = cascade._acquire()  # the warmed-up runners the next request takes
        for runner in runners:
            original = runner.run
            runner.run = lambda x, *a, original=original: (shapes.append((x.shape, x.dtype)), original(x, *a))[1]
        cascade._release(runners)
        cascade.predict(calib.image(0), operating_point="full")
    assert shapes == [((1, 8, 8, 3), np.uint8), ((1, 16, 12, 3), np.uint8)]


def test_label_mismatch_fails_without_writing(tmp_path, splits):
    train, calib = splits
    plans = early_exit_plans(residual_net(), ["layer1"], PRE, (16, 16), train, FAST_HEADS)
    out = tmp_path / "never.swb"
    with pytest.raises(ConversionError, match="predicts 3 classes but 2 class names"):
        build_bundle(out, "x", plans, PRE, ["a", "b"], calib, BuildOptions())
    assert list(tmp_path.iterdir()) == []


def test_exporter_refuses_a_model_that_declares_other_inputs(tmp_path, splits):
    """A converter that turns constants into graph inputs (as tf2onnx did for Keras Normalization) is caught."""
    import onnx
    from onnx import TensorProto, helper

    from stagewise.converters.onnx_export import OnnxExporter

    class ExtraInput(OnnxExporter):
        def export(self, plan, workdir, inputs, options):
            exported = super().export(plan, workdir, inputs, options)
            model = onnx.load(str(exported.files[0]))
            model.graph.input.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [3]))
            onnx.save(model, str(exported.files[0]))
            return exported

    plan = cascade_plans([("only", residual_net(), (16, 16))])[0]
    x = PRE.tensor([splits[1].image(i) for i in range(4)], (16, 16))
    with pytest.raises(ConversionError, match=r"declares inputs \['image', 'mean'\]"):
        export_stage(ExtraInput(), plan, tmp_path, StageInputs(x, x, x), BuildOptions())


def _fragile_stage():
    from toy_models import fragile_net

    x = np.random.default_rng(0).normal(0, 1, (600, 3, 16, 16)).astype(np.float32)
    return cascade_plans([("only", fragile_net(), (16, 16))])[0], StageInputs(x[:16], x[:100], x[100:])


def test_mixed_int8_keeps_the_fragile_layer_in_float(tmp_path):
    plan, inputs = _fragile_stage()
    whole, _, _ = export_stage(exporter("onnx"), plan, tmp_path / "whole", inputs,
                            BuildOptions(int8=True, int8_mixed=False, int8_tolerance=0.9))
    assert whole["precision"] == "fp32" and whole["quantization"]["agreement_with_fp32"] < 0.6
    mixed, files, _ = export_stage(exporter("onnx"), plan, tmp_path / "mixed", inputs,
                                BuildOptions(int8=True, int8_tolerance=0.9))
    q = mixed["quantization"]
    assert mixed["precision"] == "int8" and q["kept_fp32"] is False
    assert {"/amp/Conv", "/mix/Conv"} <= set(q["float_layers"]) and len(q["float_layers"]) <= 3
    low, high = q["agreement_interval"]
    assert q["agreement_images"] == 500 and 0.9 <= low <= q["agreement_with_fp32"] <= high
    import onnx

    graph = onnx.load(str(files["onnx/only.onnx"])).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the rest is still INT8


def test_int8_slower_than_the_minimum_speedup_on_this_machine_is_rejected(tmp_path, monkeypatch):
    from stagewise.converters.export import Exporter, HostSpeed

    plan, inputs = _fragile_stage()
    timed, _, _ = export_stage(exporter("onnx"), plan, tmp_path / "timed", inputs,
                            BuildOptions(int8=True, int8_mixed=False, int8_tolerance=0.0))
    q = timed["quantization"]
    assert timed["precision"] == "int8" and q["min_speedup"] == 0.0 and "rejected" not in q
    assert q["host_latency_ms"]["float"] > 0 and q["host_latency_ms"]["int8"] > 0 and q["host_timed_runs"] > 0
    monkeypatch.setattr(Exporter, "host_speed", lambda *args, **kwargs: HostSpeed(1.0, 2.0, 30))
    slow, files, _ = export_stage(exporter("onnx"), plan, tmp_path / "slow", inputs,
                               BuildOptions(int8=True, int8_mixed=False, int8_tolerance=0.0, int8_min_speedup=1.0))
    q = slow["quantization"]
    assert slow["precision"] == "fp32" and q["kept_fp32"] is True and q["host_speedup"] == 0.5
    assert "0.50x the float model's speed" in q["rejected"] and "--int8-min-speedup" in q["rejected"]
    import onnx

    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(files["onnx/only.onnx"])).graph.node)
    fast, _, _ = export_stage(exporter("onnx"), plan, tmp_path / "fast", inputs,
                           BuildOptions(int8=True, int8_mixed=False, int8_tolerance=0.0, int8_min_speedup=0.4))
    assert fast["precision"] == "int8"
    with pytest.raises(ConversionError, match="int8_min_speedup"):
        BuildOptions(int8_min_speedup=-1.0)


def test_onnx_recipe_sets_the_activation_and_weight_types(tmp_path):
    import onnx
    from onnx import numpy_helper

    from stagewise.converters.onnx_export import Recipe, recipes

    plan, inputs = _fragile_stage()
    onnx_exporter = exporter("onnx")
    fp32 = onnx_exporter.export(plan, tmp_path, inputs, BuildOptions())
    assert all(r.name.endswith("-bit weights") for r in recipes("x86_64"))  # uint8 x int8 on x86
    assert all(r.name.endswith("int8 x int8") for r in recipes("aarch64"))  # int8 x int8 on ARM
    for recipe, activations, weights in [(Recipe(), "uint8", "int8"), (Recipe(activations="QInt8"), "int8", "int8"),
                                         (Recipe(weights="QUInt8"), "uint8", "uint8")]:
        q = onnx_exporter.quantize(plan, fp32, tmp_path, inputs, BuildOptions(int8=True), tag=recipe.name[-5:],
                                   recipe=recipe)
        assert (q.record["activations"], q.record["weights"]) == (activations, weights)
        graph = onnx.load(str(q.files[0])).graph
        zeros = {init.name: numpy_helper.to_array(init).dtype.name for init in graph.initializer}
        activation_types = {zeros[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"}
        all_types = {zeros[n.input[2]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[2] in zeros}
        assert activation_types == {activations} and all_types - {"int32"} == {activations, weights}  # int32: biases


def test_a_stage_that_cannot_meet_the_tolerance_falls_back_whole(tmp_path):
    from stagewise.converters.int8_gate import Verdict
    from stagewise.converters.onnx_export import recipes

    all_recipes = recipes()

    plan, inputs = _fragile_stage()
    onnx_exporter = exporter("onnx")
    fp32 = onnx_exporter.export(plan, tmp_path, inputs, BuildOptions())
    options = BuildOptions(int8=True, int8_tolerance=0.9)
    result = onnx_exporter.quantize_mixed(plan, fp32, tmp_path, inputs, options, lambda candidate: Verdict(False, 0.0, "refused", {"agreement_with_fp32": 0.0}))
    search = result.record["search"]
    assert [t["recipe"] for t in search[:len(all_recipes)]] == [r.name for r in all_recipes]
    assert len(search) > len(all_recipes) and all(t["float_layers"] for t in search[len(all_recipes):])
    assert result.record["float_layers"] == [] and result.record["ranking"]
    ranked = [r["node"] for r in result.record["ranking"]]
    assert len(search[-1]["float_layers"]) == len(ranked) - 1  # at least one weighted node stays INT8
    import onnx

    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(result.files[0])).graph.node)


def test_a_tolerance_the_images_cannot_show_skips_the_search(tmp_path):
    plan, inputs = _fragile_stage()
    art, files, _ = export_stage(exporter("onnx"), plan, tmp_path, inputs, BuildOptions(int8=True, int8_tolerance=1.0))
    q = art["quantization"]
    assert art["precision"] == "fp32" and q["kept_fp32"] is True and "search" not in q
    assert "500 agreeing images out of 500" in q["search_skipped"] and q["agreement_interval"][0] < 1.0
    import onnx

    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(files["onnx/only.onnx"])).graph.node)
