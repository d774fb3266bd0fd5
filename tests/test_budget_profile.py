"""`stagewise profile` on a mock runtime: the stored distribution, named profiles, and the runtime seeding from them."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from stagewise.bundle import read_bundle
from stagewise.cli import cli
from stagewise.runtimes import load
from stagewise.testing import fake_runtime, scripted_bundle
from toy_bundle import assert_manifest_round_trips


@pytest.fixture
def mock_runtime():
    with fake_runtime("mockrt") as runtime:
        yield runtime.name


@pytest.fixture
def bundle(tmp_path):
    return scripted_bundle(tmp_path / "bundle", 2, thresholds={"full": [None, None]})


def test_profile_stores_the_distribution_and_the_runtime_seeds_from_it(bundle, mock_runtime):
    runner = CliRunner()
    out = runner.invoke(cli, ["profile", str(bundle), "--backend", mock_runtime, "--images", "6", "--repeats", "2"])
    assert out.exit_code == 0, out.output
    assert "stored as profile mockrt-cpu-1t" in out.output
    assert_manifest_round_trips(bundle)
    m = read_bundle(bundle).manifest
    prof = m.profiles["mockrt-cpu-1t"]
    assert prof["runtime"] == "mockrt" and prof["threads"] == 1 and prof["precision"] == ("fp32", "fp32")
    assert prof["images"] == 6 and prof["repeats"] == 2 and set(prof["return_ms"]) >= {"p50", "p95"}
    for s in m.stages:
        d = s.cost.latency("mockrt-cpu-1t")
        assert d.n == 12 and d.p50 <= d.p95 <= d.other["p99"] <= d.other["max"]
    # a named profile next to it, and a dry run that writes nothing
    assert runner.invoke(cli, ["profile", str(bundle), "--backend", mock_runtime, "--images", "3",
                               "--name", "busy-device"]).exit_code == 0
    dry = runner.invoke(cli, ["profile", str(bundle), "--backend", mock_runtime, "--images", "3",
                              "--name", "never-stored", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["profile"] == "never-stored"
    m = read_bundle(bundle).manifest
    assert set(m.profiles) == {"mockrt-cpu-1t", "busy-device"}
    # the runtime seeds its latency model from the profile of its configuration, or the one named
    with load(bundle, runtime=mock_runtime, threads=1, warmup=False) as c:
        assert c.profile == "mockrt-cpu-1t"
        assert c.latency.predict(1) == pytest.approx(m.stages[1].cost.latency("mockrt-cpu-1t").p95)
        assert c.latency.return_overhead() == pytest.approx(prof["return_ms"]["p95"])
    with load(bundle, runtime=mock_runtime, threads=1, warmup=False, profile="busy-device") as c:
        assert c.latency.predict(0) == pytest.approx(m.stages[0].cost.latency("busy-device").p95)
