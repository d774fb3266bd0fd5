"""The drift monitor: the sequential test's false-alarm rate on simulated null streams (numpy only), its power,
the calibration record written and read, old bundles without it, agreement sampling, trace logs and the CLI."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from stagewise.testing import manifest_for, stage_entry
from toy_bundle import onnx_stage_model
from stagewise.bundle import read_bundle, write_bundle
from stagewise.cli import cli
from stagewise.runtimes.agreement import Sample, clopper_pearson, estimate
from stagewise.runtimes.edetector import EDetector, MultinomialBet, bernoulli_ratios, bets, chi2_quantile, tolerance
from stagewise.runtimes.monitor import MonitorSettings


# ---- the sequential test, on simulated streams ---------------------------------------------------------

def _rate_detector(means: list[float], n_ref: int, threshold: float) -> tuple[EDetector, tuple]:
    stat, l0, l1 = [], [], []
    for s, m in enumerate(means):
        for a, b, _ in bets(m, tolerance(m, n_ref)):
            stat.append(s)
            l0.append(a)
            l1.append(b)
    weight = np.full(len(stat), 1 / len(stat))
    return EDetector(weight, threshold), (np.array(stat), np.array(l0), np.array(l1))


def _run_null(means, live_means, n_ref, threshold, requests, seed, block=64) -> int:
    detector, (stat, l0, l1) = _rate_detector(means, n_ref, threshold)
    rng = np.random.default_rng(seed)
    alarms = 0
    for _ in range(requests // block):
        x = (rng.random((block, len(means))) < np.asarray(live_means)).astype(np.int8)
        x[rng.random((block, len(means))) < 0.3] = -1  # some requests do not reach the stage
        alarms += len(detector.update(bernoulli_ratios(x, stat, l0, l1)))
    return alarms


def test_vectorised_cusum_equals_the_recursion():
    rng = np.random.default_rng(1)
    ratios = rng.normal(0.05, 0.4, (300, 3))
    fast = EDetector(np.full(3, 1 / 3), 1e300)
    fast.update(ratios[:100])
    fast.update(ratios[100:])
    m = np.ones(3)
    for row in ratios:
        m = np.maximum(m, 1.0) * np.exp(row)
    assert np.allclose(fast.state, np.log(np.maximum(m, 1.0)))
    assert fast.log_evidence == pytest.approx(math.log(m.mean()))


def test_false_alarm_rate_holds_on_null_streams():
    """Live rates anywhere inside the tolerance band: far fewer alarms than 1 per c requests (c = 2,000 here)."""
    means, n_ref = [0.6, 0.3, 0.85], 2000
    live = [m + 0.9 * tolerance(m, n_ref) * s for m, s in zip(means, (1, -1, 1))]  # near the band's edge
    requests, threshold = 200_000, 2000.0
    alarms = sum(_run_null(means, live, n_ref, threshold, requests // 4, seed) for seed in range(4))
    assert alarms / requests <= 1 / threshold


def test_the_bound_is_tight_enough_to_fail_when_the_null_is_wrong():
    """The same test raises alarms quickly once a rate leaves its band: the false-alarm check above can fail."""
    means, n_ref = [0.6, 0.3, 0.85], 2000
    detector, (stat, l0, l1) = _rate_detector(means, n_ref, 1e4)
    rng = np.random.default_rng(0)
    x = (rng.random((500, 3)) < np.array([0.45, 0.3, 0.85])).astype(np.int8)
    crossings = detector.update(bernoulli_ratios(x, stat, l0, l1))
    assert crossings and crossings[0].index < 500
    assert stat[crossings[0].detector] == 0


def _class_alarms(counts, live, requests, threshold, seed, block=128, rho=None) -> list:
    """Alarms of one class test (reference ``counts``; ``rho`` replaces its null set's radius) on a stream drawn
    from ``live`` class shares."""
    bet = MultinomialBet(np.asarray(counts))
    if rho is not None:
        bet.rho = rho
    detector = EDetector(np.ones(1), threshold)
    rng = np.random.default_rng(seed)
    alarms = []
    for _ in range(requests // block):
        cells = rng.choice(len(live), block, p=live)
        cells[rng.random(block) < 0.2] = -1  # some requests do not reach the stage
        alarms += detector.update(bet.log_ratios(cells)[:, None])
    return alarms


def _edge_of_null_set(counts) -> np.ndarray:
    """A live distribution on the edge of the class test's null set (chi-square distance rho from the reference)."""
    bet = MultinomialBet(np.asarray(counts))
    direction = np.zeros(len(bet.p))
    direction[::2], direction[1::2] = 1.0, -1.0
    direction -= bet.p * direction.sum() / bet.p.sum()
    scale = np.sqrt(bet.rho / np.sum(direction ** 2 / bet.p))
    return bet.p + 0.95 * scale * direction


def test_chi2_quantile_matches_the_table():
    assert chi2_quantile(9, 0.001) == pytest.approx(27.877, rel=0.01)
    assert chi2_quantile(3, 0.05) == pytest.approx(7.815, rel=0.01)


def test_class_test_false_alarm_rate_holds_on_null_streams():
    """Live class shares near the edge of the null set: fewer alarms than 1 per c requests (c = 500 here)."""
    counts = np.array([52, 48, 45, 51, 50, 53, 49, 50, 52, 50])  # few calibration images: a wide null set
    live = _edge_of_null_set(counts)
    requests, threshold = 200_000, 500.0
    alarms = sum(len(_class_alarms(counts, live, requests // 4, threshold, seed)) for seed in range(4))
    assert alarms / requests <= 1 / threshold


def test_the_class_test_can_fail():
    """Without its composite-null factor (rho = 0) the same null stream alarms more than the bound allows, and a
    real change of the class shares alarms within a few hundred requests: the false-alarm check above is not vacuous."""
    counts = np.array([52, 48, 45, 51, 50, 53, 49, 50, 52, 50])  # few calibration images: a wide null set
    live = _edge_of_null_set(counts)
    naive = len(_class_alarms(counts, live, 50_000, 500.0, 0, rho=0.0))
    assert naive / 50_000 > 1 / 500
    shifted = counts / counts.sum() * np.array([1.8, 1.8, 0.2, 1, 1, 1, 1, 0.2, 1, 1])
    alarms = _class_alarms(10 * counts, shifted / shifted.sum(), 2000, 1e4, 0)  # 5,000 calibration images
    assert alarms and alarms[0].index < 500


def test_agreement_estimate_and_intervals():
    low, high = clopper_pearson(5, 100)
    assert 0.016 < low < 0.02 and 0.11 < high < 0.12  # the textbook exact interval of 5/100
    samples = [Sample("p", 0, 1, 1, 0.9, 0.9, ())] * 90 + [Sample("p", 0, 2, 1, 0.2, 0.7, ())] * 10
    est = estimate(samples)
    assert est.disagreement == pytest.approx(0.1) and est.loss == pytest.approx(0.05)
    assert est.loss_interval[0] < 0.05 < est.loss_interval[1]
    assert estimate([]) is None


# ---- a real calibrated bundle ------------------------------------------------------------------------------

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _images(root: Path, shift: int = 0, per_class: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 200, (8, 8, 3))
            img[..., c] += 25 - shift
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, Path]:
    """A three-stage ONNX bundle calibrated with `stagewise calibrate`, and its labelled images."""
    root = tmp_path_factory.mktemp("monitor")
    files, stages = {}, []
    for k, (rows, cols) in enumerate([(4, 4), (8, 4), (8, 8)]):
        f = root / f"s{k}.onnx"
        onnx_stage_model(f, rows, cols, scale=6.0)
        files[f"onnx/s{k}.onnx"] = f
        stages.append(stage_entry(f"s{k}", {"source": "image", "size": [8, 8], "tensor": "image"},
                                  [f"onnx/s{k}.onnx"], carry=False))
    manifest = manifest_for(stages, ["class0", "class1", "class2"], {"full": [None, None, None]})
    manifest["input"].update(mean=[128, 128, 128], std=[64, 64, 64])
    old = write_bundle(root / "old.swb", manifest, files)
    data = _images(root / "data")
    bundle = write_bundle(root / "new.swb", manifest, files)
    result = CliRunner().invoke(cli, ["calibrate", str(bundle), "--data", str(data), "--target-drop", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return bundle, data, old


def test_calibration_writes_the_monitor_record(calibrated):
    bundle, _, _ = calibrated
    m = read_bundle(bundle).manifest
    record = m.calibration["monitor"]
    assert record["version"] == 1 and record["n"] == 180 and len(record["edges"]) == 3
    for point in m.operating_points:
        entry = record["points"][point.name]
        assert entry["reached"][0] == 180 and sum(entry["exited"]) == 180
        assert all(sum(h) == r for h, r in zip(entry["histograms"], entry["reached"]))
        assert all(sum(a) == r for a, r in zip(entry["answers"], entry["reached"]))
        expected = point.expected.to_dict()["exit_rates"]
        assert np.allclose(np.array(entry["exited"]) / 180, expected)


def test_old_bundle_loads_and_the_monitor_says_it_has_no_reference(calibrated):
    from stagewise.runtimes import load
    from stagewise.runtimes.monitor import DriftMonitor

    _, data, old = calibrated
    with load(old, runtime="onnxruntime", threads=1) as cascade:
        monitor = DriftMonitor.attach(cascade)
        cascade.predict_batch([data / "class0" / "000.png", data / "class1" / "001.png"])
        report = monitor.report()
    assert report["reference"] is False and "no monitor reference" in report["message"]
    assert report["requests"] == 2 and report["alarm"] is False
    assert report["points"]["full"]["stages"][2]["exit_rate"] == 1.0


def test_a_record_without_class_counts_runs_the_rate_tests_only(calibrated):
    """A monitor record written before the stages' answers were kept: the rate tests run, no class test."""
    from stagewise.manifest import Manifest
    from stagewise.runtimes.monitor import DriftMonitor

    bundle, _, _ = calibrated
    doc = read_bundle(bundle).manifest.to_dict()
    for entry in doc["calibration"]["monitor"]["points"].values():
        assert len(entry.pop("answers")) == 3
    older = DriftMonitor(Manifest.from_dict(doc))
    current = DriftMonitor(read_bundle(bundle).manifest)
    assert older.tests and not older.class_tests and current.class_tests
    assert older.report()["reference"] is True


def test_monitor_is_quiet_in_distribution_and_alarms_and_switches_under_shift(calibrated, tmp_path):
    from stagewise.runtimes import load
    from stagewise.runtimes.monitor import DriftMonitor, MonitorSettings

    bundle, data, _ = calibrated
    same = sorted(data.glob("*/*.png"))
    same = [same[i] for i in np.random.default_rng(0).permutation(len(same))]  # in distribution: no run of one class
    shifted = sorted(_images(tmp_path / "shifted", shift=25, seed=1).glob("*/*.png"))  # no colour cue left
    seen = []
    with load(bundle, runtime="onnxruntime", threads=1) as cascade:
        monitor = DriftMonitor.attach(cascade, MonitorSettings(fallback="full", agreement=1.0, block=16, capacity=200),
                                      on_alarm=seen.append)
        images = [np.asarray(Image.open(p).convert("RGB")) for p in same]
        for im in images:
            monitor.offer(im, cascade.predict(im))
        monitor.drain()
        quiet = monitor.report()
        assert quiet["alarm_count"] == 0 and quiet["reference"] is True
        point = quiet["watching"][0]
        assert quiet["points"][point]["agreement"]["n"] == len(same)
        for _ in range(3):
            cascade.predict_batch(shifted)
        report = monitor.report()
        assert cascade.operating_point == "full"  # the documented reaction
    assert report["alarm_count"] >= 1 and seen and seen[0].kind == "drift"
    assert seen[0].request <= len(same) + 3 * len(shifted)
    assert report["watching"] == ["full"]


def test_monitor_watches_several_operating_points_and_keeps_testing_after_a_switch(calibrated, tmp_path):
    """Traffic split over two operating points: each is tested against its own reference; after the monitor switched
    the cascade to its fallback, the fallback's own test still raises an alarm on shifted traffic."""
    from stagewise.runtimes import load
    from stagewise.runtimes.monitor import DriftMonitor, MonitorSettings

    bundle, data, _ = calibrated
    same = sorted(data.glob("*/*.png"))
    same = [same[i] for i in np.random.default_rng(1).permutation(len(same))]
    shifted = sorted(_images(tmp_path / "shifted", shift=25, seed=1).glob("*/*.png"))
    with load(bundle, runtime="onnxruntime", threads=1) as cascade:
        default = cascade.operating_point
        points = (default, "full")
        both = DriftMonitor.attach(cascade, MonitorSettings(points=points, block=16))
        assert {t.point for t in both.class_tests} == set(points)
        for i, path in enumerate(same):
            cascade.predict(path, operating_point=points[i % 2])
        quiet = both.report()
        assert quiet["alarm_count"] == 0 and quiet["watching"] == list(points)
        assert {p: quiet["points"][p]["requests"] for p in points} == {default: 90, "full": 90}
        for _ in range(3):
            for i, path in enumerate(shifted):
                cascade.predict(path, operating_point=points[i % 2])
        assert both.report()["alarm_count"] >= 1
        both.detach()

        switching = DriftMonitor.attach(cascade, MonitorSettings(fallback="full", block=16))
        for _ in range(3):
            cascade.predict_batch(shifted)
        assert cascade.operating_point == "full" and switching.watching == ("full",)
        before = len(switching.alarms)
        for _ in range(3):
            cascade.predict_batch(shifted)  # still shifted: the fallback's own reference sees it too
        switching.report()
        assert len(switching.alarms) > before and switching.alarms[-1].point == "full"


def test_sample_log_replays_and_recalibrates_label_free(calibrated, tmp_path):
    import shutil

    from stagewise.runtimes import load
    from stagewise.runtimes.monitor import DriftMonitor, MonitorSettings

    bundle, data, _ = calibrated
    copy = shutil.copy(bundle, tmp_path / "field.swb")
    log = tmp_path / "samples.jsonl"
    with load(copy, runtime="onnxruntime", threads=1) as cascade:
        monitor = DriftMonitor.attach(cascade, MonitorSettings(agreement=1.0, capacity=500, log=str(log)))
        paths = sorted(data.glob("*/*.png"))
        for i in np.random.default_rng(0).permutation(len(paths)):  # in distribution: no run of one class
            path = paths[i]
            monitor.offer(path, cascade.predict(path))
        monitor.drain()
        live = monitor.report()
        monitor.detach()
    assert len(log.read_text().splitlines()) == 180
    runner = CliRunner()
    out = runner.invoke(cli, ["monitor", str(log), "--bundle", str(copy), "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    replayed = json.loads(out.output)
    point = live["watching"][0]
    assert replayed["requests"] == 180 and replayed["alarm_count"] == 0
    assert replayed["points"][point]["agreement"] == live["points"][point]["agreement"]
    text = runner.invoke(cli, ["monitor", str(log), "--bundle", str(copy)], catch_exceptions=False).output
    assert "no alarm" in text and "estimated loss" in text
    out = runner.invoke(cli, ["calibrate", str(copy), "--from-log", str(log), "--target-drop", "5"],
                        catch_exceptions=False)
    assert out.exit_code == 0, out.output
    m = read_bundle(copy).manifest
    assert m.default_operating_point == "drop-5pt" and m.calibration["targets"] == "full_model_agreement"
    assert m.calibration["monitor"]["n"] == 180 and str(log) == m.calibration["data"]
    assert m.point("drop-5pt").expected.to_dict()["agreement"] >= 0.95
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"operating_point": "full", "trace": [{"stage": "s0"}]}\n')
    out = runner.invoke(cli, ["monitor", str(bad), "--bundle", str(copy)])
    assert out.exit_code != 0 and "bad.jsonl:1" in str(out.exception)


def test_serve_exports_the_monitor(calibrated, tmp_path):
    import httpx

    from serving import running, toy_service
    from stagewise.runtimes.serve import ServeConfig

    bundle, data, _ = calibrated
    paths = sorted(data.glob("*/*.png"))[::6]
    service = toy_service(ServeConfig(monitor=MonitorSettings(agreement=1.0, block=4)), bundle=bundle)
    with running(service) as (url, _):
        with httpx.Client(base_url=url) as client:
            for path in paths:
                assert client.post("/v1/classify", content=path.read_bytes()).status_code == 200
            for _ in range(100):  # the checks run after answering, when the worker is next idle
                client.post("/v1/classify", content=paths[0].read_bytes())
                report = client.get("/v1/monitor").json()
                if report["points"][report["watching"][0]]["agreement"]["n"] >= len(paths):
                    break
                time.sleep(0.05)
            metrics = client.get("/metrics").text
    point = report["watching"][0]
    assert report["reference"] is True and report["requests"] >= len(paths)
    assert report["points"][point]["agreement"]["n"] >= len(paths) and report["agreement"]["failed"] == 0
    assert "stagewise_monitor_alarm 0.0" in metrics and "stagewise_monitor_reference 1.0" in metrics
    assert f'stagewise_monitor_exit_rate{{operating_point="{point}",source="calibration",stage="s0"}}' in metrics
    assert 'stagewise_monitor_loss{bound="estimate"' in metrics


def test_serve_says_when_the_bundle_has_no_reference():
    import httpx

    from serving import running, toy_service

    with running(toy_service()) as (url, _):
        with httpx.Client(base_url=url) as client:
            report = client.get("/v1/monitor").json()
    assert report["reference"] is False and "no monitor reference" in report["message"]
