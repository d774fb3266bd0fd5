"""The benchmark harness's own logic: splits, round-robin timing, markdown sections, the skip message."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import harness

DEMO = Path(__file__).resolve().parents[1] / "sdk" / "demo_data" / "imagenet-160"


@pytest.fixture()
def demo_data(tmp_path: Path) -> Path:
    """A data folder whose ImageNet archive is the committed demo set (160 images)."""
    import tarfile

    with tarfile.open(tmp_path / harness.IMAGENET, "w") as tar:
        tar.add(DEMO, arcname=DEMO.name)
    return tmp_path


def test_imagenet_halves_are_the_seed_0_split_and_repeat(demo_data: Path):
    from stagewise.datasets import open_image_set

    a, b = harness.imagenet_parts(demo_data), harness.imagenet_parts(demo_data)
    calib, test = open_image_set(demo_data / harness.IMAGENET).split([0.5, 0.5], seed=0)
    assert list(a.test.targets) == list(b.test.targets) == list(test.targets)
    assert list(a.calibration.targets) == list(calib.targets)
    assert len(a.calibration) + len(a.test) == len(a.images) == 160
    assert a.train is None and a.split == harness.IMAGENET_SPLIT


def test_subset_is_seeded_and_keeps_everything_without_a_smaller_limit(demo_data: Path):
    test = harness.imagenet_parts(demo_data).test
    first, again = harness.subset(test, 20, seed=1), harness.subset(test, 20, seed=1)
    assert len(first) == 20 and list(first.targets) == list(again.targets)
    assert list(harness.subset(test, 20, seed=2).targets) != list(first.targets)
    assert harness.subset(test, None, seed=1) is test and harness.subset(test, 10_000, seed=1) is test


def test_round_robin_gives_medians_and_ratios_of_fake_runners(monkeypatch):
    clock = itertools.count()
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock) / 1000)  # each call: +1 ms
    order = []

    def runner(name: str, extra_ticks: int):
        def run(x):
            order.append((name, x))
            for _ in range(extra_ticks):
                harness.time.perf_counter()
            return f"{name}:{x}"
        return run

    timing = harness.round_robin({"fast": runner("fast", 0), "slow": runner("slow", 3)}, [1, 2, 3, 4], warmup=1)
    assert order[:4] == [("fast", 1), ("slow", 1), ("fast", 2), ("slow", 2)]  # input by input
    assert timing.outputs == {"fast": ["fast:2", "fast:3", "fast:4"], "slow": ["slow:2", "slow:3", "slow:4"]}
    assert timing.ms["fast"] == pytest.approx([1, 1, 1]) and timing.ms["slow"] == pytest.approx([4, 4, 4])
    assert timing.medians() == pytest.approx({"fast": 1.0, "slow": 4.0})
    assert timing.ratios("fast") == pytest.approx({"fast": 1.0, "slow": 4.0})
    assert timing.ratios("slow") == pytest.approx({"fast": 0.25, "slow": 1.0})
    order.clear()
    rotated = harness.round_robin({"fast": runner("fast", 0), "slow": runner("slow", 3)}, [1, 2, 3], rotate=True)
    assert order == [("fast", 1), ("slow", 1), ("slow", 2), ("fast", 2), ("fast", 3), ("slow", 3)]
    assert rotated.outputs["fast"] == ["fast:1", "fast:2", "fast:3"] and rotated.medians()["slow"] == pytest.approx(4.0)


def test_metadata_names_the_module_command_and_machine():
    meta = harness.metadata("cifar10_early_exit", ["--reuse", "--threads", "2"])
    assert meta["benchmark"] == "cifar10_early_exit"
    assert meta["command"] == "python -m benchmarks.cifar10_early_exit --reuse --threads 2"
    assert {"cpu", "cores", "python", "date"} <= set(meta["machine"])


def test_save_writes_json_with_numpy_values_and_markdown(tmp_path: Path):
    out = harness.save({"x": np.float32(0.5), "v": np.arange(3)}, tmp_path / "r" / "b.json",
                       markdown=lambda r: f"| x | {r['x']} |")
    assert harness.load_result(out) == {"x": 0.5, "v": [0, 1, 2]}
    assert (tmp_path / "r" / "b.md").read_text() == "| x | 0.5 |"


def test_write_section_appends_then_replaces_only_its_own_section(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nprose stays\n")
    harness.write_section(doc, "a", "| old |")
    harness.write_section(doc, "b", "| other |")
    harness.write_section(doc, "a", "| new |\n| row |")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose stays\n")
    assert "<!-- benchmark:a -->\n| new |\n| row |\n<!-- /benchmark:a -->" in text
    assert "| old |" not in text and text.count("<!-- benchmark:a -->") == 1
    assert "<!-- benchmark:b -->\n| other |\n<!-- /benchmark:b -->" in text


def test_markdown_of_a_small_result_renders_into_its_section(tmp_path: Path):
    from benchmarks import cifar10_early_exit

    row = {"name": "(a) original", "kind": "single", "precision": "fp32", "top1": 0.9, "mean_ms": 2.0, "p95_ms": 3.0,
           "exit_histogram": [10], "top1_minus_reference": 0.0, "se_vs_reference": 0.0, "speedup_vs_original": 1.0,
           "dominated_by": []}
    training = {"epochs": 5, "images": 40, "seconds": 120.0,
                "held_out": {"accuracy": {"exit0": 0.5, "final": 0.9}, "original_final_accuracy": 0.88}}
    result = {"benchmark": "cifar10_early_exit", "threads": 1, "machine": {"cpu": "Test CPU", "date": "2026-01-02T00:00"},
              "command": "python -m benchmarks.cifar10_early_exit", "top1_se": 0.005,
              "data": {"test": 10, "timed_test_images": 5}, "rows": [row], "placements": {}, "training": training,
              "targets": {"fp32": {"text": "fastest joint-trained point: none"}}}
    path = harness.save(result, tmp_path / "cifar10_early_exit.json")
    doc = tmp_path / "benchmarks.md"
    args = harness.parser("doc", "x.json", render=True).parse_args(["--render", str(path), "--into", str(doc)])
    assert harness.render_only(args, "cifar10_early_exit", cifar10_early_exit.markdown)
    text = doc.read_text()
    assert "n = 10 test images" in text and "Test CPU, 2026-01-02" in text
    assert "| (a) original | fp32 | 90.00 | +0.00 ± 0.00 | 2.000 | 3.000 | 1.00x | - | - |" in text
    assert "**fp32**: fastest joint-trained point: none" in text and "the original network 88.0 %" in text


def test_parser_has_the_shared_options():
    ap = harness.parser("Title.\n\nmore", "r.json", bundles="cifar10", head_images=20000, test_limit=None)
    args = ap.parse_args(["--head-images", "5", "--reuse"])
    assert args.out == harness.RESULTS / "r.json" and args.bundles == harness.RUNS / "cifar10"
    assert (args.head_images, args.test_limit, args.threads, args.reuse) == (5, None, 1, True)
    assert args.data == harness.DEFAULT_DATA and ap.description == "Title."
    assert not hasattr(harness.parser("d", threads=None).parse_args([]), "threads")


def test_missing_data_prints_the_skip_message_and_exits_0(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        harness.require_data(tmp_path / "absent", harness.CIFAR10)
    assert exit_info.value.code == 0
    err = capsys.readouterr().err
    assert err.startswith("SKIPPED: ") and str(tmp_path / "absent" / harness.CIFAR10) in err and "--data DIR" in err


def test_a_benchmark_without_its_data_skips_with_status_0(tmp_path: Path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.risk_guarantee", "--data", str(tmp_path)],
                         cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr.startswith("SKIPPED: ") and not run.stdout
