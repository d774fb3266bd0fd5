"""One conversion request: the command line, ``convert()`` and a TOML config make the same
:class:`ConversionRequest`; its defaults live on its fields (the CLI help reads them there); a misspelt
choice (flags, TOML, Python) is refused with the name it was meant to be, before any model, image or
heavy library is opened; runtime names get the same suggestion."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import stagewise.converters as converters
from stagewise.cli import cli
from stagewise.converters import (BuildOptions, CascadeSearch, ConversionRequest, HeadTraining, StageSource, convert,
                                  option_default, request_from_toml)
from stagewise.converters.heads import FineTuning
from stagewise.converters.request import OPTIONS, SOURCE_OPTIONS, FocusSteps, InputSpec
from stagewise.errors import BackendUnavailableError, ConversionError, StagewiseError
from stagewise.images import Preprocess
from stagewise.runtimes import resolve_runtime

pipeline = importlib.import_module("stagewise.converters.convert")  # the module (the package's `convert` is the function)

CHECK = """
import json, sys
from stagewise.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": [m for m in ("scipy", "torch", "tensorflow", "onnx") if m in sys.modules]}))
"""


@pytest.fixture
def nothing_opened(monkeypatch):
    """Opening a model or images (or starting the pipeline) fails the test: a request must be refused first."""
    def opened(*args, **kwargs):
        raise AssertionError(f"opened {args} before the request was checked")

    for name in ("build_model", "open_image_set", "check_output"):
        monkeypatch.setattr(pipeline, name, opened)
    monkeypatch.setattr(converters, "run_job", opened)


def test_a_misspelt_format_on_the_command_line_fails_before_model_data_or_scipy(tmp_path):
    """The model file and the data folder do not exist: an error about either would mean it was opened first."""
    args = ["convert", str(tmp_path / "models.py") + ":net", "--exits", "layer1", "--format", "onnx,onxx",
            "--data", str(tmp_path / "no-images"), "--out", str(tmp_path / "out.swb")]
    result = subprocess.run([sys.executable, "-c", CHECK, *args], capture_output=True, text=True, check=True)
    answer = json.loads(result.stdout)
    assert answer == {"code": 2, "loaded": []}, result.stderr
    assert "unknown artifact format 'onxx'; did you mean 'onnx'? (choose from onnx, openvino, tflite)" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_misspelt_choice_option_names_the_choice_it_was_meant_to_be():
    result = CliRunner().invoke(cli, ["convert", "m.py:f", "--score", "margn"])
    assert result.exit_code == 2
    assert "unknown choice 'margn'; did you mean 'margin'?" in result.output


MISSPELT = [
    ({"formats": ["onnx", "tflit"]}, "unknown artifact format 'tflit'; did you mean 'tflite'?"),
    ({"score": "margn"}, "unknown exit score 'margn'; did you mean 'margin'?"),
    ({"combine": "mean_prob"}, "unknown combine mode 'mean_prob'; did you mean 'mean_probs'?"),
    ({"resizer": "opencv2"}, "unknown resizer 'opencv2'; did you mean 'opencv'?"),
    ({"device": "cdua"}, "unknown device 'cdua'; did you mean 'cuda'?"),
    ({"head": "savchenk"}, "unknown exit head 'savchenk'; did you mean 'savchenko'?"),
    ({"train_exits": "joitn"}, "unknown exit training 'joitn'; did you mean 'joint'?"),
    ({"augment": "flip_crp"}, "unknown augmentation 'flip_crp'; did you mean 'flip_crop'?"),
    ({"int8_max_drop": 200}, "int8_max_drop is a fraction of top-1"),
    ({"target_drop": -1}, "the target drop is a fraction of top-1"),
]


@pytest.mark.parametrize("change, message", MISSPELT)
def test_the_python_api_refuses_a_misspelt_choice_before_opening_anything(tmp_path, nothing_opened, change,
                                                                         message):
    """``convert()``'s keywords, or the request's options that only the CLI and TOML name (exit training)."""
    options = dict(model=str(tmp_path / "models.py") + ":net", exits=["layer1"], data=tmp_path / "no-images",
                   out=tmp_path / "out.swb", **change)
    with pytest.raises(ConversionError, match=re.escape(message)):
        if set(change) <= set(inspect.signature(convert).parameters):
            convert(**options)
        else:
            ConversionRequest.from_options(options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, message", [
    ("--format", "onxx", "did you mean 'onnx'?"), ("--combine", "mean_prob", "did you mean 'mean_probs'?"),
    ("--device", "cdua", "did you mean 'cuda'?"), ("--resizer", "pilow", "did you mean 'pillow'?"),
    ("--head", "gap_linaer", "did you mean 'gap_linear'?"), ("--adapt", "nb", "write MODEL@SIZE"),
])
def test_the_command_line_refuses_a_misspelt_choice_with_a_stagewise_error(tmp_path, nothing_opened, flag, value,
                                                                          message):
    stages = ["--stage", "a.py:f@32", "--stage", "b.py:g@64"]
    result = CliRunner().invoke(cli, ["convert", *stages, "--data", str(tmp_path / "none"), "--out",
                                      str(tmp_path / "o.swb"), flag, value])
    assert isinstance(result.exception, StagewiseError), result.output
    assert message in str(result.exception)


def test_a_toml_request_is_checked_when_it_is_read(tmp_path, nothing_opened):
    config = tmp_path / "convert.toml"
    head = 'model = "models.py:net"\nexits = ["layer1"]\nout = "out.swb"\ndata = "no-images"\n'
    for table, message in [('[build]\nformat = "openvno"\n', "unknown artifact format 'openvno'; did you mean 'openvino'?"),
                           ('[input]\nresizer = "opencv2"\n', "unknown resizer 'opencv2'; did you mean 'opencv'?"),
                           ('[build]\nfromat = "onnx"\n', "unknown key at [build] 'fromat'; did you mean 'format'?"),
                           ('[exit]\nscroe = "margin"\n', "unknown key at [exit] 'scroe'; did you mean 'score'?"),
                           ('kind = "cascade"\n', "kind = 'cascade', but the tables describe a early_exit conversion"),
                           ('kind = "casacde"\n', "unknown conversion kind 'casacde'; did you mean 'cascade'?")]:
        config.write_text(head + table)
        with pytest.raises(ConversionError, match=re.escape(message)):
            request_from_toml(config)
    with pytest.raises(ConversionError, match=r"unknown combine mode 'owm'; did you mean 'own'\?"):
        CascadeSearch(models=("a.py:f",), combines=("owm",))
    assert list(tmp_path.iterdir()) == [config]


def test_a_misspelt_keyword_is_refused_with_the_one_it_was_meant_to_be(tmp_path):
    with pytest.raises(ConversionError, match=r"unknown conversion option 'fromats'; did you mean 'formats'\?"):
        ConversionRequest.from_options({"model": "m.py:f", "exits": "layer1", "out": tmp_path, "data": tmp_path,
                                        "fromats": "onnx"})


def test_a_value_of_the_wrong_type_is_a_conversion_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('model = "m.py:f"\nexits = ["a"]\nout = "o"\ndata = "d"\n[build]\nthreads = "two"\n')
    with pytest.raises(ConversionError, match="option threads: cannot read 'two'"):
        request_from_toml(config)
    with pytest.raises(ConversionError, match="--mean: give 3 comma-separated numbers"):
        ConversionRequest.from_options({"model": "m.py:f", "exits": "a", "out": tmp_path, "data": tmp_path,
                                        "mean": "1,2"})


def test_a_misspelt_runtime_names_the_runtime_it_was_meant_to_be():
    with pytest.raises(BackendUnavailableError, match=r"unknown runtime 'onnxruntme'; did you mean 'onnxruntime'\?"):
        resolve_runtime("onnxruntme", ["onnx"])
    with pytest.raises(BackendUnavailableError, match=r"unknown preferred runtime 'openvno'; did you mean 'openvino'\?"):
        resolve_runtime("openvno,onnxruntime", ["onnx"])


def _requests(monkeypatch, tmp_path: Path, flags: list[str], keywords: dict, toml: str) -> list[ConversionRequest]:
    """The requests the command line, ``convert()`` and a TOML config make (the pipeline does not run)."""
    made = []
    monkeypatch.setattr(pipeline, "run_job", made.append)
    monkeypatch.setattr(converters, "run_job", made.append)
    result = CliRunner().invoke(cli, ["convert", *flags])
    assert result.exit_code == 0, result.output
    convert(**keywords)
    config = tmp_path / "convert.toml"
    config.write_text(toml)
    made.append(request_from_toml(config))
    assert len(made) == 3
    return made


def test_the_three_entry_points_make_the_same_request(monkeypatch, tmp_path):
    out, data = tmp_path / "out.swb", tmp_path / "images"
    flags = ["m.py:net", "--exits", "layer1,layer2", "--data", str(data), "--out", str(out), "--format",
             "onnx,openvino", "--int8", "--int8-max-drop", "1", "--target-drop", "2", "--score", "margin",
             "--head", "savchenko", "--mean", "1,2,3", "--std", "4,5,6", "--resizer", "opencv", "--device", "cpu",
             "--threads", "2", "--force"]
    keywords = dict(model="m.py:net", exits=["layer1", "layer2"], data=data, out=out, formats=["onnx", "openvino"],
                    int8=True, int8_max_drop=1.0, target_drop=2.0, score="margin", head="savchenko",
                    mean=(1, 2, 3), std=(4, 5, 6), resizer="opencv", device="cpu", threads=2, force=True)
    toml = ('model = "m.py:net"\nexits = ["layer1", "layer2"]\ndata = "images"\nout = "out.swb"\ndevice = "cpu"\n'
            '[exit]\nscore = "margin"\nhead = "savchenko"\n[input]\nmean = [1, 2, 3]\nstd = [4, 5, 6]\n'
            'resizer = "opencv"\n[build]\nformat = "onnx,openvino"\nint8 = true\nint8_max_drop = 1.0\n'
            'target_drop = 2\nthreads = 2\nforce = true\n')
    cli_request, python_request, toml_request = _requests(monkeypatch, tmp_path, flags, keywords, toml)
    assert cli_request == python_request == toml_request
    assert cli_request == ConversionRequest(
        out=out, data=data, model=StageSource("m.py:net"), exits=("layer1", "layer2"), score="margin",
        head=HeadTraining(kind="savchenko"), input=InputSpec(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), resizer="opencv"),
        build=BuildOptions(formats=("onnx", "openvino"), int8=True, int8_max_drop=0.01, default_drop=0.02, threads=2,
                           overwrite=True), device="cpu")
    assert cli_request.kind == "early_exit" and cli_request.build.calibration_goal.value == 0.02


def test_the_three_entry_points_agree_on_a_glance_and_focus_request(monkeypatch, tmp_path):
    out, data = tmp_path / "g.swb", tmp_path / "images"
    flags = ["--stage", "zoo:efficientnet_lite0@224", "--focus", "zoo:efficientnet_lite0@160", "--patches", "2",
             "--iou", "0.4", "--data", str(data), "--out", str(out), "--epochs", "2", "--exit-weights", "0.5,1"]
    keywords = dict(stages=["zoo:efficientnet_lite0@224"], focus="zoo:efficientnet_lite0@160", patches=2, iou=0.4,
                    data=data, out=out, head=HeadTraining(tuning=FineTuning(epochs=2, exit_weights=(0.5, 1.0))))
    toml = ('kind = "glance_focus"\nout = "g.swb"\ndata = "images"\n[[stages]]\nmodel = "zoo:efficientnet_lite0"\n'
            'size = 224\n[focus]\nmodel = "zoo:efficientnet_lite0"\nsize = 160\npatches = 2\niou = 0.4\n'
            '[training]\nepochs = 2\nexit_weights = [0.5, 1]\n')
    requests = _requests(monkeypatch, tmp_path, flags, keywords, toml)
    assert requests[0] == requests[1] == requests[2]
    assert requests[0].kind == "glance_focus" and requests[0].steps == FocusSteps(patches=2, iou=0.4)


def test_flags_win_over_the_toml_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('out = "c.swb"\ndata = "images"\n[[stages]]\nmodel = "m.py:f"\nsize = 96\n'
                      '[build]\ntarget_drop = 1\n')
    assert request_from_toml(config).build.default_drop == 0.01
    assert request_from_toml(config, {"target_drop": 0.5, "formats": None}).build.default_drop == 0.005


def test_defaults_live_on_the_request_and_the_help_shows_them(tmp_path):
    """A request of only the required options has its fields' defaults; the CLI help shows each default
    read from those fields, and the CLI's options are exactly the request's options."""
    plain = ConversionRequest.from_options({"model": "m.py:f", "exits": "auto:2", "out": tmp_path, "data": tmp_path})
    assert plain == ConversionRequest(out=tmp_path, data=tmp_path, model=StageSource("m.py:f"), exits=("auto:2",))
    assert plain.build == BuildOptions() and plain.head == HeadTraining() and plain.input == InputSpec()
    assert option_default("target_drop") == 100 * BuildOptions().default_drop
    assert option_default("int8_max_drop") == 100 * BuildOptions().int8_max_drop
    assert option_default("epochs") == FineTuning().epochs and option_default("head") == HeadTraining().kind
    assert option_default("resize") == Preprocess((0, 0, 0), (1, 1, 1)).resize
    assert option_default("max_stages") == CascadeSearch(("m.py:f",)).max_stages
    command = cli.commands["convert"]
    named = {p.name for p in command.params} - {"model", "legacy_formats", "verbose"}
    assert named == (set(OPTIONS) | set(SOURCE_OPTIONS)) - {"model", "interpolation"}
    help_text = " ".join(CliRunner().invoke(cli, ["convert", "--help"]).output.split())
    for name in ("target_drop", "int8_max_drop", "int8_search_seconds", "agreement_images", "patches", "iou",
                 "epochs", "lr", "head_lr", "crop_fraction", "threads", "combine", "device", "formats"):
        flag = "--format" if name == "formats" else "--" + name.replace("_", "-")
        shown = option_default(name)
        shown = ",".join(shown) if isinstance(shown, tuple) else shown
        assert re.search(rf"{flag} \S+ [^\[]*\[default: {re.escape(str(shown))}\]", help_text), name


def test_the_kind_is_decided_by_the_sources_given(tmp_path):
    base = {"out": tmp_path, "data": tmp_path}
    kinds = {ConversionRequest.from_options({**base, **extra}).kind for extra in (
        {"model": "m.py:f", "exits": "a"}, {"stages": ["m.py:f@8", "m.py:g@16"]},
        {"stages": ["m.py:f@8"], "focus": "m.py:g@16"}, {"search": "m.py:f,m.py:g", "sizes": "8,16"})}
    assert kinds == {"early_exit", "cascade", "glance_focus", "search"}
    for extra, message in [({}, "give one of"), ({"model": "m.py:f", "stages": ["m.py:f@8"]}, "a model and stages"),
                           ({"model": "m.py:f"}, "needs --exits"), ({"model": "m.py:f", "exits": "a", "adapt": "bn"},
                                                                    "--adapt adapts cascade stages"),
                           ({"stages": ["m.py:f@8"], "new_classes": True}, "--new-classes builds an early-exit"),
                           ({"stages": ["m.py:f@8", "m.py:g@8"], "focus": "m.py:h@8"}, "one glance model"),
                           ({"model": "m.py", "exits": "a"}, "give it as path/to/file.py:factory")]:
        with pytest.raises(ConversionError, match=re.escape(message)):
            ConversionRequest.from_options({**base, **extra})


def test_the_old_names_still_work_with_a_warning(tmp_path):
    with pytest.warns(DeprecationWarning, match="use request_from_toml"):
        old = converters.job_from_toml
    with pytest.warns(DeprecationWarning, match="use ConversionRequest"):
        assert converters.ConvertJob is ConversionRequest
    assert old is request_from_toml
