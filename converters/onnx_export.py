"""Export torch stage modules to ONNX and check them against PyTorch on ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from stagewise.errors import ConversionError, VerificationError

OPSET = 17


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
                output_names: Sequence[str]) -> Path:
    """Export ``module`` (one tensor in, ``output_names`` out) with a dynamic batch axis.

    Uses ``torch.onnx.export``'s TorchScript-based exporter (``dynamo=False``), which exports
    the CNN stages here faithfully and several times faster than the dynamo exporter.
    """
    import torch

    axes = {name: {0: "batch"} for name in [input_name, *output_names]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (example,), str(path), input_names=[input_name],
                              output_names=list(output_names), dynamic_axes=axes, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ConversionError(f"torch.onnx.export failed for {path.name}: {exc}") from exc
    return path


def ort_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with fixed threads, as used for verification and profiling."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def verify_onnx(path: Path, module: torch.nn.Module, inputs: torch.Tensor, input_name: str,
                output_names: Sequence[str], tolerance: float = 1e-3) -> dict:
    """Compare the exported model with ``module`` on ``inputs``.

    Returns ``{"max_abs_diff": {output: value}, "top1_agreement": fraction, "n": count}``;
    raises :class:`VerificationError` when an output differs by more than ``tolerance``
    relative to its largest magnitude.
    """
    import torch

    with torch.no_grad():
        expected = module.eval()(inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = ort_session(path).run(list(output_names), {input_name: inputs.numpy()})
    diffs = {}
    for name, e, g in zip(output_names, expected, got):
        e = e.numpy()
        diff = float(np.abs(e - g).max())
        diffs[name] = diff
        if diff > tolerance * max(1.0, float(np.abs(e).max())):
            raise VerificationError(
                f"{path.name}: output {name!r} differs from PyTorch by {diff:.3g} (tolerance {tolerance:g} relative); "
                "the exporter did not reproduce this stage faithfully")
    logits = output_names.index("logits")
    agreement = float((expected[logits].numpy().argmax(1) == got[logits].argmax(1)).mean())
    return {"max_abs_diff": diffs, "top1_agreement": agreement, "n": int(inputs.shape[0])}
