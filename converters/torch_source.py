"""The PyTorch source adapter: cut points, splitting, exit heads, stage runs, costs and export frontends.

Cut points and splitting come from :mod:`.torch_cuts` (``torch.fx``). Stages are NCHW.
Frontends: ONNX through ``torch.onnx.export`` (TorchScript-based, ``dynamo=False``: it exports
the CNN stages here faithfully and several times faster than the dynamo exporter), OpenVINO
through that ONNX file (measured closer to PyTorch than ``convert_model`` on the module, see
docs/openvino.md), TFLite through ``litert-torch``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from stagewise.errors import ConversionError
from stagewise.extras import require

from .heads import LinearHead
from .source import UNSTABLE_BN_GAIN, CutPoint, SourceAdapter
from .torch_heads import Head, Pool
from .tooling import package_version, quiet
from .torch_cam import glance_stage
from .torch_cuts import MacCounter, cut_candidates, split_model

OPSET = 17


class ExitStage(torch.nn.Module):
    """A backbone segment followed by an exit head: returns ``(carry, logits)``."""

    def __init__(self, segment: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.segment = segment
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        carry = self.segment(x)
        return carry, self.head(carry)


class PixelInput(torch.nn.Module):
    """A stage that takes uint8 NHWC pixels ``width`` wide: cast, ``(x - mean) / std`` and NHWC->NCHW in the graph.

    The mean and std are stored as one row of pixels (1 x 1 x width x 3): ONNX Runtime broadcasts a trailing
    axis of 3 channels element by element, which took 1.5 ms of an INT8 EfficientNet-Lite0's 7 ms at 224 x 224
    (1 thread, Intel Xeon with AVX-512 VNNI; docs/int8.md), and broadcasts a whole row in a tenth of that (same values, bit for bit; its transpose optimizer keeps these
    ops in NHWC whatever order they are written in). OpenVINO and LiteRT run either form at the same speed."""

    def __init__(self, module: torch.nn.Module, mean: Sequence[float], std: Sequence[float], width: int):
        super().__init__()
        self.module = module
        row = (1, 1, int(width), 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 1, 1, 3).repeat(row))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 1, 1, 3).repeat(row))

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(((x.float() - self.mean) / self.std).permute(0, 3, 1, 2))


def count_macs(module: torch.nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass on a single sample, counted on the operators that run (:class:`.torch_cuts.MacCounter`:
    convolutions and matrix products, functional ones and attention included)."""
    with torch.no_grad(), MacCounter() as counter:
        module.eval()(example[:1])
    return counter.total


def export_onnx(module: torch.nn.Module, example: np.ndarray, path: Path, input_name: str,
                output_names: Sequence[str]) -> dict:
    """Write ``module`` (one tensor in, ``output_names`` out) as ONNX with a dynamic batch axis; returns the record."""
    axes = {name: {0: "batch"} for name in [input_name, *output_names]}
    try:
        with quiet():
            torch.onnx.export(module.eval(), (torch.from_numpy(np.ascontiguousarray(example[:1])),), str(path),
                              input_names=[input_name], output_names=list(output_names), dynamic_axes=axes,
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ConversionError(f"torch.onnx.export failed for {Path(path).name}: {exc}") from exc
    return {"tool": "torch.onnx.export (TorchScript)", "version": torch.__version__, "opset": OPSET}


class TorchSource(SourceAdapter):
    """:class:`~stagewise.converters.source.SourceAdapter` for ``torch.nn.Module`` classifiers."""

    framework = "torch"
    layout = "NCHW"
    openvino_route = "onnx"

    def version(self) -> str:
        return torch.__version__

    def prepare(self, model: Any) -> torch.nn.Module:
        if not isinstance(model, torch.nn.Module):
            raise ConversionError(f"expected a torch.nn.Module, got {type(model).__name__}")
        return model.eval()

    def check_image_size(self, model: Any, size: tuple[int, int]) -> None:
        """Torch models take any size their layers allow; a wrong one fails in the first forward pass."""

    def example(self, size: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(1, 3, *size)

    def cut_points(self, model: torch.nn.Module, size: tuple[int, int]) -> list[CutPoint]:
        return cut_candidates(model.eval(), self.example(size))

    def split(self, model: torch.nn.Module, cuts: Sequence[str]) -> list[torch.nn.Module]:
        return split_model(model.eval(), list(cuts))

    def exit_stage(self, segment: torch.nn.Module, head: LinearHead | torch.nn.Module, name: str) -> torch.nn.Module:
        """``(carry, logits)`` of ``segment`` and ``head``: a fitted :class:`LinearHead` or a trained head module."""
        return ExitStage(segment, self._head_module(head)).eval()

    def final_stage(self, segment: torch.nn.Module, head: LinearHead | torch.nn.Module | None,
                    name: str) -> torch.nn.Module:
        return segment if head is None else torch.nn.Sequential(segment, self._head_module(head)).eval()

    @staticmethod
    def _head_module(head: LinearHead | torch.nn.Module) -> torch.nn.Module:
        if isinstance(head, torch.nn.Module):
            return head.eval()
        return Head.from_linear(head)

    def train_exits(self, segments: Sequence[torch.nn.Module], images: Any, preprocess: Any, size: tuple[int, int],
                    classes: int, training: Any, held_out: Any = None) -> tuple[list, list, dict]:
        """Heads trained by SGD after every segment but the last, with the segments in ``joint`` mode
        (:func:`.torch_training.train_exits`); returns segments, heads and the training record."""
        from .torch_training import train_exits

        return train_exits(segments, images, preprocess, size, classes, training, held_out)

    def given_exits(self, model: torch.nn.Module, cuts: Sequence[str]) -> tuple[list, list, dict]:
        """The segments of ``model`` and the trained heads it carries at ``cuts`` (``model.stagewise_exits``)."""
        exits = getattr(model, "stagewise_exits", None) or {}
        if not exits:
            raise ConversionError("--train-exits given needs a model that carries trained exit heads "
                                  "(model.stagewise_exits, see stagewise.converters.torch_training.attach_exits); "
                                  "use --train-exits frozen or joint to train them")
        missing = [cut for cut in cuts if cut not in exits]
        if missing:
            raise ConversionError(f"the model carries exit heads at {', '.join(exits)}, not at {', '.join(missing)}; "
                                  "choose --exits among those, or retrain with --train-exits joint")
        return self.split(model, cuts), [exits[cut] for cut in cuts], dict(getattr(model, "stagewise_training", {}))

    def pixel_input(self, module: torch.nn.Module, preprocess: Any, size: tuple[int, int]) -> torch.nn.Module:
        """``module`` reading uint8 NHWC pixels, normalised with ``preprocess``'s mean and std in the graph."""
        return PixelInput(module, preprocess.mean, preprocess.std, size[1]).eval()

    def run(self, module: torch.nn.Module, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = []
        dtype = np.uint8 if x.dtype == np.uint8 else np.float32
        with torch.no_grad():
            for i in range(0, len(x), batch):
                out = module.eval()(torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=dtype)))
                out = out if isinstance(out, (tuple, list)) else (out,)
                parts = parts or [[] for _ in out]
                for store, o in zip(parts, out):
                    store.append(o.numpy())
        return [np.concatenate(p) for p in parts]

    def glance_stage(self, model: torch.nn.Module, size: tuple[int, int]) -> tuple[torch.nn.Module, Any]:
        """``model`` returning ``(logits, cam)`` and its :class:`~stagewise.manifest.CamGrid` (see :mod:`.torch_cam`)."""
        return glance_stage(model, size)

    def pool(self, carry: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return Pool()(torch.from_numpy(carry)).numpy()

    def pooled_features(self, segments: Sequence[torch.nn.Module], x: np.ndarray, device: str = "cpu",
                        pool_last: bool = True) -> list[np.ndarray]:
        """Every segment's output on the batch ``x`` (segments run in turn on ``device``, mixed precision on a
        GPU; the segments stay there), pooled to N x C float32; the last one as it is unless ``pool_last``."""
        from .devices import autocast

        outputs = []
        with torch.no_grad(), autocast(device):
            carry = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
            pool = Pool()
            for k, segment in enumerate(segments):
                carry = segment.eval().to(device)(carry)
                keep = pool(carry) if (pool_last or k < len(segments) - 1) else carry
                outputs.append(keep.float().cpu().numpy())
        return outputs

    def fingerprint(self, model: torch.nn.Module) -> str:
        """A digest of the model's class name and every parameter and buffer (names and values); not of the
        module it was imported as, which differs between a factory file and an import."""
        import hashlib

        digest = hashlib.sha256(type(model).__qualname__.encode())
        for name, value in model.state_dict().items():
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def macs(self, module: torch.nn.Module, input_shape: Sequence[int]) -> int:
        return count_macs(module, torch.zeros(1, *input_shape[1:]))

    def params(self, module: torch.nn.Module) -> int:
        return int(sum(p.numel() for p in module.parameters()))

    def unstable_normalisation(self, module: torch.nn.Module) -> list[tuple[str, float]]:
        found = []
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.running_var is not None:
                weight = layer.weight.detach().abs() if layer.weight is not None else torch.ones_like(layer.running_var)
                gain = float((weight / torch.sqrt(layer.running_var + layer.eps)).max())
                if gain > UNSTABLE_BN_GAIN:
                    found.append((name, gain))
        return sorted(found, key=lambda item: -item[1])

    # --- export frontends ------------------------------------------------------------------

    def export_onnx(self, plan: Any, example: np.ndarray, path: Path) -> dict:
        """Write the stage as ONNX (opset 17, dynamic batch), input/outputs named as the manifest says."""
        return export_onnx(plan.module, example, path, plan.input_name, plan.output_names)

    def export_openvino(self, plan: Any, example: np.ndarray, workdir: Path) -> Any:
        """An ``ov.Model`` converted straight from the module (the ``native`` route)."""
        import openvino as ov

        with quiet():
            return ov.convert_model(plan.module.eval(), example_input=torch.from_numpy(example[:1]))

    def export_tflite(self, plan: Any, example: np.ndarray, path: Path) -> dict:
        """A float ``.tflite`` through litert-torch (batch 1; the signature names input and outputs)."""
        os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
        litert_torch = require("litert_torch", "tflite", "exporting torch stages to TFLite")

        class Named(torch.nn.Module):
            """The stage with named outputs (they become the signature's output names)."""

            def __init__(self, module: torch.nn.Module):
                super().__init__()
                self.module = module

            def forward(self, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
                out = self.module(kwargs[plan.input_name])
                out = out if isinstance(out, (tuple, list)) else (out,)
                return dict(zip(plan.output_names, out))

        try:
            with quiet():
                edge = litert_torch.convert(Named(plan.module.eval()).eval(), sample_args=(),
                                            sample_kwargs={plan.input_name: torch.from_numpy(example[:1])})
                edge.export(str(path))
        except Exception as exc:  # the converter raises many unrelated types
            raise ConversionError(f"litert_torch.convert failed for stage {plan.name}: {exc}") from exc
        return {"tool": "litert_torch.convert", "version": package_version("litert-torch"), "batch": 1}
