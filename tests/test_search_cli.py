"""The cascade search and stage adaptation through `stagewise convert`, on tiny torch models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch", reason='converting the toy models needs torch: pip install -c constraints.txt -e ".[dev]"')

from stagewise.cli import cli  # noqa: E402
from stagewise.converters import convert  # noqa: E402

TOY = str(Path(__file__).parent / "toy_models.py")


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_convert_search_builds_the_chosen_cascade(image_folder, tmp_path):
    out = tmp_path / "searched"
    result = CliRunner().invoke(cli, ["convert", "--search", f"{TOY}:fragile_net,{TOY}:residual_net",
                                      "--sizes", "8,16", "--max-stages", "2", "--data", str(image_folder),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Pareto front of" in result.output and "candidates measured" in result.output
    m = _manifest(out)
    search = m["producer"]["search"]
    assert [c["name"] for c in search["candidates"]] == ["fragile_net_8", "fragile_net_16", "residual_net_8",
                                                         "residual_net_16"]
    assert search["cascades_searched"] == 4 + 2 * 6  # 4 alone, 6 ordered pairs in both combine modes
    chosen = search["front"][search["chosen"]]
    assert [s["name"] for s in m["stages"]] == chosen["stages"]
    best = max(c["accuracy"] for c in search["candidates"])
    assert search["reference"]["accuracy"] == best and chosen["accuracy"] >= best - 0.005
    assert all(p["accuracy"] < chosen["accuracy"] for p in search["front"][:search["chosen"]])
    point = next(p for p in m["operating_points"] if p["name"] == m["default_operating_point"])
    assert point["name"].startswith("search-") and point["expected"]["accuracy"] == pytest.approx(chosen["accuracy"])
    shown = CliRunner().invoke(cli, ["inspect", str(out)])
    assert shown.exit_code == 0 and "Pareto front of 16 searched cascades" in shown.output


def test_convert_adapts_named_stages_and_records_it(image_folder, tmp_path):
    out = convert(stages=[f"{TOY}:residual_net@8+bn", f"{TOY}:fragile_net@16"], data=image_folder,
                  out=tmp_path / "adapted")
    stages = _manifest(out)["stages"]
    assert stages[0]["adaptation"]["kind"] == "bn" and stages[0]["adaptation"]["size"] == [8, 8]
    assert "adaptation" not in stages[1]


def test_search_and_adapt_errors_are_request_errors(image_folder, tmp_path):
    runner = CliRunner()
    both = runner.invoke(cli, ["convert", "--search", f"{TOY}:residual_net", "--stage", f"{TOY}:residual_net@8",
                               "--data", str(image_folder), "--out", str(tmp_path / "x")])
    assert both.exit_code != 0 and "give one of" in str(both.exception) and "stages and a search" in str(both.exception)
    sizes = runner.invoke(cli, ["convert", f"{TOY}:residual_net", "--sizes", "8", "--data", str(image_folder),
                                "--out", str(tmp_path / "y")])
    assert sizes.exit_code != 0 and "belong to a cascade search" in str(sizes.exception)
    bad = runner.invoke(cli, ["convert", "--stage", f"{TOY}:residual_net@8+fixres", "--data", str(image_folder),
                              "--out", str(tmp_path / "z")])
    assert bad.exit_code != 0 and "MODEL@SIZE+ADAPT" in str(bad.exception)
    unsized = runner.invoke(cli, ["convert", "--search", f"{TOY}:residual_net", "--data", str(image_folder),
                                  "--out", str(tmp_path / "w")])
    assert unsized.exit_code != 0 and "declares no input size" in str(unsized.exception)


def test_toml_search_table_and_stage_adapt(tmp_path):
    from stagewise.converters import request_from_toml, stage_source
    from stagewise.errors import ConversionError

    config = tmp_path / "search.toml"
    config.write_text('out = "s.swb"\ndata = "images"\n[search]\nmodels = ["zoo:efficientnet_lite0"]\n'
                      'sizes = [128, 160]\nadapt = "bn"\nmax_stages = 2\ncombine = ["mean_probs"]\n')
    job = request_from_toml(config, {})
    assert job.kind == "search" and job.search.sizes == (128, 160) and job.search.adapt == "bn"
    assert job.search.max_stages == 2 and job.search.combines == ("mean_probs",)
    config.write_text('out = "c.swb"\ndata = "images"\n[build]\nint8 = true\nint8_min_speedup = 1.2\n'
                      '[[stages]]\nmodel = "m.py:f"\nsize = 96\nadapt = "head"\n')
    assert request_from_toml(config, {}).build.int8_min_speedup == 1.2
    assert request_from_toml(config, {"agreement_images": 4000}).build.agreement_images == 4000
    assert request_from_toml(config, {}).build.agreement_images == 1000
    assert request_from_toml(config, {}).stages[0].adapt == "head"
    config.write_text('out = "s.swb"\ndata = "images"\n[search]\nmodels = ["m.py:f"]\nbudget = 3\n')
    with pytest.raises(ConversionError, match=r"\[search\] takes models"):
        request_from_toml(config, {})
    assert stage_source("m.py:f@128", "bn").adapt == "bn" and stage_source("m.py:f@128+none", "bn").adapt == "none"
