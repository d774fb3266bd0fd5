"""The command line, end to end on a tiny model: convert, inspect, run, bench, calibrate, profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from toy_bundle import assert_manifest_round_trips
from stagewise.bundle import read_bundle
from stagewise.cli import cli

TOY = str(Path(__file__).with_name("toy_models.py"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("cli") / "toy.swb"
    result = CliRunner().invoke(cli, ["convert", f"{TOY}:residual_net", "--exits", "layer1", "--data", str(image_folder),
                                      "--out", str(out), "--target-drop", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_convert_writes_calibrated_bundle(converted):
    out, output = converted
    assert f"wrote {out}" in output and "drop-1pt" in output
    manifest = read_bundle(out).manifest
    assert manifest.default_operating_point == "drop-1pt"
    assert manifest.stages[0].input.size == (16, 16)
    assert manifest.calibration["n"] == 24
    assert_manifest_round_trips(out)


def test_inspect_run_bench(converted, image_folder, tmp_path):
    out, _ = converted
    runner = CliRunner()
    shown = runner.invoke(cli, ["inspect", str(out)])
    assert shown.exit_code == 0 and "exit0" in shown.output and "operating points" in shown.output
    image = next((image_folder / "class1").iterdir())
    ran = runner.invoke(cli, ["run", str(out), str(image), "--json", "--threads", "1"])
    assert ran.exit_code == 0, ran.output
    answer = json.loads(ran.output)
    assert answer["class_name"] in {"class0", "class1", "class2"} and answer["stage_name"] in {"exit0", "final"}
    assert answer["stage_index"] == ["exit0", "final"].index(answer["stage_name"])
    assert [r["stage_name"] for r in answer["trace"]][-1] == answer["stage_name"]
    report = tmp_path / "bench.json"
    plot = tmp_path / "pareto.png"
    benched = runner.invoke(cli, ["bench", str(out), "--data", str(image_folder), "--json", str(report),
                                  "--plot", str(plot)])
    assert benched.exit_code == 0, benched.output
    result = json.loads(report.read_text())
    names = {(r["kind"], r["name"]) for r in result["rows"]}
    assert ("operating_point", "full") in names and ("stage_alone", "exit0") in names
    assert result["n"] == 120 and plot.stat().st_size > 1000


def test_calibrate_and_profile_rewrite_manifest(converted, image_folder, tmp_path):
    out, _ = converted
    copy = tmp_path / "copy.swb"
    copy.write_bytes(out.read_bytes())
    runner = CliRunner()
    done = runner.invoke(cli, ["calibrate", str(copy), "--data", str(image_folder), "--budget-ms", "50"])
    assert done.exit_code == 0, done.output
    manifest = read_bundle(copy).manifest
    assert manifest.default_operating_point == "budget-50ms"
    assert manifest.calibration["n"] == 120
    profiled = runner.invoke(cli, ["profile", str(copy), "--threads", "2", "--images", "5"])
    assert profiled.exit_code == 0, profiled.output
    assert "onnxruntime-cpu-2t" in read_bundle(copy).manifest.profiles
    assert_manifest_round_trips(copy)


def test_errors_are_clear(converted, image_folder, tmp_path):
    out, _ = converted
    runner = CliRunner()
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (20, 20)).save(image)
    bad_point = runner.invoke(cli, ["run", str(out), str(image), "--operating-point", "warp"])
    assert bad_point.exit_code != 0 and "unknown operating point 'warp'" in str(bad_point.exception)
    bad_cut = runner.invoke(cli, ["convert", f"{TOY}:residual_net", "--exits", "layer1.conv1",
                                  "--data", str(image_folder), "--out", str(tmp_path / "b")])
    assert bad_cut.exit_code != 0
    assert "layer1.conv1" in str(bad_cut.exception) and "down" in str(bad_cut.exception)
    assert not (tmp_path / "b").exists()
    no_data = runner.invoke(cli, ["convert", f"{TOY}:residual_net", "--exits", "layer1", "--out", str(tmp_path / "c")])
    assert "pass --data" in str(no_data.exception)


def test_bench_runs_reference_bundles_side_by_side(converted, image_folder):
    from stagewise.datasets import open_image_set
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import benchmark

    out, _ = converted
    images = open_image_set(image_folder)
    pictures = [images.image(i) for i in range(0, len(images), 6)]
    labels = images.targets[::6]
    with load(out) as cascade, load(out) as reference:
        result = benchmark(cascade, pictures, labels, references={"the same bundle": reference})
    row = next(r for r in result["rows"] if r["kind"] == "reference")
    full = next(r for r in result["rows"] if r["name"] == "full" and r["kind"] == "operating_point")
    assert row["name"] == "the same bundle" and row["top1"] == full["top1"] and row["n"] == len(pictures)
    assert sum(row["exit_histogram"]) == len(pictures)
    reached = [r for r in result["rows"] if r["kind"] == "operating_point" and "equal_accuracy_reference" in r]
    assert reached and all(r["equal_accuracy_reference"] is None or r["speedup_vs_equal_accuracy_single"] > 0
                           for r in reached)
