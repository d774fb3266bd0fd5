"""Fixtures shared by the tests, and the markers of the quick loop.

Helpers live in modules the tests import: stagewise.testing (scripted stages, bundles and a fake
runtime), tests/toy_images.py, tests/toy_bundle.py, tests/toy_models.py.

The markers (registered in pyproject.toml) are applied here from the tables below, so test files
carry none: ``slow`` and one marker per framework or extra. An entry names a test module
(``test_keras.py``), a test in it (``test_keras.py::test_name``, every parametrization), or, for
``SLOW_FIXTURES``, a module fixture whose every user is slow because building it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from toy_images import make_image_folder

# Every test and module fixture that took 1 s or more (setup + call) in `python -m pytest --durations=0`
# on the 2-core development machine. Keep `python -m pytest -m "not slow" --durations=15` under a minute:
# a test that shows up there at 1 s or more belongs here.
SLOW = (
    "test_adapt.py::test_bn_reestimation_moves_statistics_and_recovers_accuracy",
    "test_deadline.py::test_onnxruntime_run_is_cancelled_within_a_bound",
    "test_deadline.py::test_openvino_run_is_cancelled_within_a_bound",
    "test_ddp.py::test_two_gloo_processes_train_the_exits_as_one_process_does",
    "test_device_install.py",
    "test_exit_training.py::test_auto_exits_on_the_command_line_pick_valid_cuts_and_print_the_table",
    "test_exit_training.py::test_joint_training_beats_frozen_heads_at_an_early_exit",
    "test_first_run.py::test_readme_early_exit_convert_runs_as_written",
    "test_fuzz.py::test_fuzzed_manifests_and_archives_end_in_stagewise_errors_or_answers",
    "test_glance_focus.py::test_other_runtimes_run_the_glance_and_focus_bundle_like_onnx_runtime",
    "test_keras.py::test_keras_applications_cut_and_convert",
    "test_keras.py::test_keras_conversion_imports_no_torch",
    "test_keras.py::test_keras_resolution_cascade_fp16",
    "test_litert.py::test_mixed_int8_leaves_the_fragile_tensors_in_float",
    "test_litert.py::test_mixed_int8_search_that_cannot_meet_the_tolerance_ends_with_int16_activations_tried",
    "test_openvino.py::test_exporter_fp16_int8_fallback_and_sources",
    "test_openvino.py::test_openvino_accuracy_control_reverts_the_fragile_layer",
    "test_openvino.py::test_openvino_accuracy_control_that_reverts_every_weighted_layer_is_no_int8",
    "test_openvino.py::test_openvino_agrees_with_onnxruntime",
    "test_pixel_input.py::test_pixel_stage_agrees_with_float_stage",
    "test_reliability.py::test_zip_bomb_is_refused_before_writing_more_than_the_cap",
    "test_risk.py::test_guarantee_holds_at_promised_rate_in_simulation",
    "test_serve.py::test_classify_answers_equal_predict_alone_and_in_micro_batches",
    "test_torch_cuts.py::test_segment_exports_to_onnx",
    "test_runtime_loop.py::test_load_predict_close_cycles_leave_the_thread_count_flat",
    "test_runtime_loop.py::test_batch_equals_single_with_carries_kept_in_the_runtime",
    "test_runtime_loop.py::test_two_concurrent_budgeted_requests_honour_their_own_deadlines",
    "test_new_classes.py::test_a_keras_backbone_takes_new_classes",
    "test_new_classes.py::test_automatic_placement_with_new_classes",
    "test_serve.py::test_a_full_queue_sheds_requests_with_503_and_retry_after",
    "test_int8_gate.py::test_calibration_runs_once_per_stage_and_method",
    "test_openvino.py::test_second_load_comes_from_the_content_keyed_cache",
    "test_exit_decisions.py::test_openvino_adds_the_decision_at_load",
)
SLOW_FIXTURES = (
    "test_adapt.py::trained",
    "test_keras.py::cli_bundle",
    "test_keras.py::multi_bundle",
    "test_litert.py::fp32_bundle",
    "test_litert.py::int8_bundle",
    "test_openvino.py::cascade_bundle",
    "test_openvino.py::ee_bundle",
    "test_openvino.py::npu_bundle",
    "test_runtime_loop.py::slow",
)
# What each test exercises beyond ONNX Runtime and numpy: `-m openvino` after a change to the OpenVINO
# adapter or exporter, `-m "not keras"` where TensorFlow is not installed.
FRAMEWORKS = {
    "torch": ("test_adapt.py", "test_calibration_cli.py", "test_cli.py", "test_ddp.py", "test_exit_training.py",
              "test_first_run.py", "test_glance_focus.py", "test_litert.py", "test_openvino.py", "test_pixel_input.py",
              "test_resizer.py", "test_savchenko.py", "test_search_cli.py", "test_torch_cuts.py", "test_torch_pipeline.py"),
    "keras": ("test_adapt_keras.py", "test_keras.py"),
    "openvino": ("test_openvino.py", "test_deadline.py::test_openvino_run_is_cancelled_within_a_bound",
                 "test_glance_focus.py::test_other_runtimes_run_the_glance_and_focus_bundle_like_onnx_runtime",
                 "test_keras.py::test_keras_bundle_carries_onnx_and_openvino",
                 "test_pixel_input.py::test_pixel_stage_agrees_with_float_stage"),
    "litert": ("test_litert.py", "test_keras.py", "test_device_install.py::test_tflite_runtime_extra_alone_runs_a_tflite_bundle",
               "test_glance_focus.py::test_other_runtimes_run_the_glance_and_focus_bundle_like_onnx_runtime",
               "test_pixel_input.py::test_pixel_stage_agrees_with_float_stage"),
    "serve": ("test_serve.py",
              "test_device_install.py::test_onnxruntime_and_serve_extras_run_and_serve_a_bundle_without_frameworks"),
}


def _names(item: pytest.Item) -> set[str]:
    """The entries that name ``item``: its module, and its module with its test function."""
    module = item.path.name
    return {module, f"{module}::{getattr(item, 'originalname', item.name)}"}


def _check_entries() -> None:
    """Every entry names a test module of this folder and, after ``::``, a function defined in it."""
    folder = Path(__file__).parent
    for entry in (*SLOW, *SLOW_FIXTURES, *(e for entries in FRAMEWORKS.values() for e in entries)):
        module, _, name = entry.partition("::")
        path = folder / module
        if not path.is_file() or (name and f"def {name}(" not in path.read_text()):
            raise pytest.UsageError(f"tests/conftest.py names {entry!r}, which does not exist: update its tables")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _check_entries()
    slow, slow_fixtures = set(SLOW), set(SLOW_FIXTURES)
    for item in items:
        names = _names(item)
        if names & slow or {f"{item.path.name}::{f}" for f in getattr(item, "fixturenames", ())} & slow_fixtures:
            item.add_marker(pytest.mark.slow)
        for marker, entries in FRAMEWORKS.items():
            if names & set(entries):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))
