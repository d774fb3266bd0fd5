"""A misspelt choice in a conversion request (flags, TOML, Python) is refused with the name it was meant to be,
before any model, image or heavy library is opened; runtime names get the same suggestion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from stagewise.cli import cli
from stagewise.converters import CascadeSearch, convert, job_from_toml
from stagewise.errors import BackendUnavailableError, ConversionError
from stagewise.runtimes import resolve_runtime

CHECK = """
import json, sys
from stagewise.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": [m for m in ("scipy", "torch", "tensorflow", "onnx") if m in sys.modules]}))
"""


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


@pytest.mark.parametrize("change, message", [
    ({"formats": ["onnx", "tflit"]}, "unknown artifact format 'tflit'; did you mean 'tflite'?"),
    ({"score": "margn"}, "unknown exit score 'margn'; did you mean 'margin'?"),
    ({"combine": "mean_prob"}, "unknown combine mode 'mean_prob'; did you mean 'mean_probs'?"),
])
def test_the_python_api_refuses_a_misspelt_choice_before_opening_anything(tmp_path, change, message):
    with pytest.raises(ConversionError, match=message.replace("?", r"\?")):
        convert(str(tmp_path / "models.py") + ":net", exits=["layer1"], data=tmp_path / "no-images",
                out=tmp_path / "out.swb", **change)
    assert list(tmp_path.iterdir()) == []


def test_a_toml_request_is_checked_when_it_is_read(tmp_path):
    config = tmp_path / "convert.toml"
    config.write_text('model = "models.py:net"\nexits = ["layer1"]\nout = "out.swb"\ndata = "no-images"\n'
                      '[build]\nformat = "openvno"\n')
    with pytest.raises(ConversionError, match=r"unknown artifact format 'openvno'; did you mean 'openvino'\?"):
        job_from_toml(config, {})
    config.write_text('model = "models.py:net"\nexits = ["layer1"]\nout = "out.swb"\ndata = "no-images"\n'
                      '[input]\nresizer = "opencv2"\n')
    with pytest.raises(ConversionError, match=r"unknown resizer 'opencv2'; did you mean 'opencv'\?"):
        job_from_toml(config, {})
    with pytest.raises(ConversionError, match=r"unknown combine mode 'owm'; did you mean 'own'\?"):
        CascadeSearch(models=("a.py:f",), combines=("owm",))


def test_a_misspelt_runtime_names_the_runtime_it_was_meant_to_be():
    with pytest.raises(BackendUnavailableError, match=r"unknown runtime 'onnxruntme'; did you mean 'onnxruntime'\?"):
        resolve_runtime("onnxruntme", ["onnx"])
    with pytest.raises(BackendUnavailableError, match=r"unknown preferred runtime 'openvno'; did you mean 'openvino'\?"):
        resolve_runtime("openvno,onnxruntime", ["onnx"])


def test_an_unknown_device_is_refused_with_the_other_named_choices(tmp_path):
    from stagewise.converters import StageSource, make_job

    with pytest.raises(ConversionError, match="unknown device 'tpu'"):
        make_job(kind="early_exit", sources=[StageSource(str(tmp_path / "models.py") + ":net")],
                 out=tmp_path / "out.swb", device="tpu", data=tmp_path / "no-images")
    assert list(tmp_path.iterdir()) == []
