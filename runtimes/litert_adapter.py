"""LiteRT (TensorFlow Lite) adapter: one interpreter per stage.

The interpreter comes from ``ai-edge-litert`` (``pip install "stagewise[litert]"``); on a device
that has only the older ``tflite-runtime`` wheel, that package's interpreter is used instead
(same API). Nothing else is imported: no TensorFlow, no converter.

How a stage is opened and run:

* **Tensors by name.** The stage's input and outputs are found by the manifest's tensor names
  (``image`` or ``carry`` in; ``carry``/``logits`` out) in the model's serving signature, which
  stagewise's TFLite exporters name that way. A model without signatures is matched on its
  tensor names (``serving_default_<name>``, ``<name>``, ``<name>:0`` ...).
* **Quantized I/O.** A full-integer model with int8 (or uint8) inputs/outputs is fed and read in
  float32 like any other: the input is quantized and the outputs dequantized here, with each
  tensor's own scale and zero point from the model's details.
* **Layout.** The executor feeds the manifest's layout (NCHW for torch sources, NHWC for Keras
  sources). If the model's input is in the other layout (a channels-last input), the batch is
  transposed once here; the choice is made from the model's own input shape.
* **Batch size.** A model with a dynamic batch dimension (Keras sources) is resized when the batch
  size changes; a model exported with a fixed batch (litert-torch exports batch 1) is resized too
  when its graph allows it, and otherwise run row by row, so the executor never sees a difference.
  Tensors are reallocated only when the batch size changes; inputs are written once into the
  interpreter's buffer and outputs copied out once.

Options (``stagewise.load(..., options={...})``):

``threads`` (``LoadOptions.threads``)
    ``num_threads`` of the interpreter (LiteRT's Python API uses 1 thread when not given).
``xnnpack`` (default ``True``)
    Apply the XNNPACK CPU delegate (LiteRT's default). ``False`` runs LiteRT's builtin kernels
    only (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``), e.g. to compare or to work around a delegate bug.
``delegates``
    External delegates to attach, each a shared-library path or ``{"library": path, "options":
    {...}}``, loaded with ``load_delegate``: how an Edge TPU (``libedgetpu.so.1``), an NNAPI or a
    vendor NPU delegate is used. Nodes a delegate does not take run on the CPU. With a delegate
    the ``device`` name is only a label (it names the latency profile); without one, any device
    other than ``CPU`` is refused. When the option is not given, ``$STAGEWISE_LITERT_DELEGATES``
    (library paths separated by ``os.pathsep``) is used, so the CLI can attach delegates too.
``batch`` (default ``"auto"``)
    ``"auto"`` (resize when possible), ``"resize"`` (always resize, fail if the graph cannot) or
    ``"rows"`` (run every sample alone at the model's own batch size, as integer-only NPUs need).
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.errors import BackendUnavailableError, BundleError, DeviceUnavailableError, MissingExtraError

from .base import LoadOptions, StageIO, StageSession
from .model_io import DeclaredIO, TensorInfo
from .options import LiteRTOptions

PACKAGES = ("ai_edge_litert", "tflite_runtime")
"""Where the interpreter is looked for, in order."""

BATCH_MODES = ("auto", "resize", "rows")


def interpreter_module() -> Any:
    """The ``interpreter`` module of ai-edge-litert, or of tflite-runtime when only that is installed."""
    errors = []
    for package in PACKAGES:
        try:
            return importlib.import_module(f"{package}.interpreter")
        except ImportError as exc:
            errors.append(f"{package}: {exc}")
    raise MissingExtraError('LiteRT is not installed; install it with: pip install "stagewise[litert]" '
                            f"(or tflite-runtime on a device that ships only that) [{'; '.join(errors)}]")


def _load_delegates(module: Any, specs: Sequence[Any]) -> list[Any]:
    delegates = []
    for spec in specs:
        library, opts = (spec, None) if isinstance(spec, (str, Path)) else (spec.get("library"), spec.get("options"))
        if not library:
            raise BackendUnavailableError(f"LiteRT delegate {spec!r}: give a shared-library path or "
                                          '{"library": path, "options": {...}}')
        try:
            delegates.append(module.load_delegate(str(library), {str(k): str(v) for k, v in (opts or {}).items()}))
        except (OSError, ValueError, RuntimeError) as exc:
            raise DeviceUnavailableError(f"cannot load the LiteRT delegate {library}: {exc} (is the device's "
                                         "driver installed, and the library built for this runtime version?)") from exc
    return delegates


def _find(names: dict[str, int], wanted: str, what: str, model: Path) -> int:
    """The tensor index of ``wanted`` among ``names`` (signature names first, then common spellings)."""
    for candidate in (wanted, f"serving_default_{wanted}", f"serving_default_{wanted}:0", f"{wanted}:0",
                      f"serving_default_{wanted}_output"):
        if candidate in names:
            return names[candidate]
    raise BundleError(f"{model.name}: the model has no {what} tensor named {wanted!r} "
                      f"(it has: {', '.join(sorted(names)) or 'none'}); was it exported by stagewise?")


def _scaled(details: dict) -> bool:
    """Whether a tensor carries quantization parameters (a nonzero scale)."""
    params = details.get("quantization_parameters") or {}
    scales = params.get("scales", [])
    return bool(len(scales) and scales[0] > 0) or details.get("quantization", (0.0, 0))[0] > 0


class _Quant:
    """Per-tensor affine quantization of one int8/uint8 tensor: ``real = scale * (q - zero_point)``."""

    def __init__(self, details: dict, model: Path):
        params = details.get("quantization_parameters") or {}
        scales = np.asarray(params.get("scales", []), dtype=np.float32)
        zeros = np.asarray(params.get("zero_points", []), dtype=np.int64)
        if scales.size == 0:
            scale, zero = details.get("quantization", (0.0, 0))
            scales, zeros = np.asarray([scale], np.float32), np.asarray([zero], np.int64)
        if scales.size != 1 or not scales[0] > 0:
            raise BundleError(f"{model.name}: tensor {details['name']!r} is {np.dtype(details['dtype']).name} without "
                              "per-tensor quantization parameters; stagewise feeds float32 and needs a scale to convert")
        self.dtype = np.dtype(details["dtype"])
        self.scale = float(scales[0])
        self.zero_point = int(zeros[0])
        info = np.iinfo(self.dtype)
        self.low, self.high = info.min, info.max

    def quantize(self, x: np.ndarray) -> np.ndarray:
        q = np.rint(x / np.float32(self.scale))
        q += self.zero_point
        np.clip(q, self.low, self.high, out=q)
        return q.astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        out = q.astype(np.float32)
        out -= np.float32(self.zero_point)
        out *= np.float32(self.scale)
        return out

    def record(self) -> dict:
        return {"dtype": self.dtype.name, "scale": self.scale, "zero_point": self.zero_point}


class LiteRTStage(StageSession):
    """A stage on the LiteRT interpreter."""

    def __init__(self, model: Path, io: StageIO, options: LoadOptions):
        module = interpreter_module()
        settings = options.options_for(LiteRTOptions)
        delegate_specs = settings.delegates
        if delegate_specs is None:
            delegate_specs = [d for d in os.environ.get("STAGEWISE_LITERT_DELEGATES", "").split(os.pathsep) if d]
        if options.device.upper() != "CPU" and not delegate_specs:
            raise DeviceUnavailableError(
                f"LiteRT runs on the CPU unless a delegate is attached; for device {options.device!r} pass its "
                "delegate library, e.g. stagewise.load(..., runtime='litert', options={'delegates': "
                "['libedgetpu.so.1']}), or use device='CPU'")
        self.batch_mode = settings.batch
        if self.batch_mode not in BATCH_MODES:
            raise BackendUnavailableError(f"LiteRT option batch={self.batch_mode!r}; choose {', '.join(BATCH_MODES)}")
        kwargs: dict[str, Any] = {"model_path": str(model)}
        if options.threads:
            kwargs["num_threads"] = int(options.threads)
        if not settings.xnnpack:
            kwargs["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.xnnpack = bool(settings.xnnpack)
        self._delegates = _load_delegates(module, delegate_specs)
        self._delegate_names = [Path(str(d if isinstance(d, (str, Path)) else d.get("library"))).name
                                for d in delegate_specs]
        self._lock = threading.Lock()  # one interpreter per stage: requests on several threads take turns
        if self._delegates:
            kwargs["experimental_delegates"] = self._delegates
        try:
            self._interp = module.Interpreter(**kwargs)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"LiteRT cannot load {model.name}: {exc}") from exc
        self.model = model
        self._bind(io)

    def _bind(self, io: StageIO) -> None:
        interp, model = self._interp, self.model
        signatures = interp._get_full_signature_list() if hasattr(interp, "_get_full_signature_list") else {}
        key = "serving_default" if "serving_default" in signatures else (
            next(iter(signatures)) if len(signatures) == 1 else None)
        if key is not None and signatures[key].get("subgraph_index", 0) == 0:
            inputs, outputs = dict(signatures[key]["inputs"]), dict(signatures[key]["outputs"])
        else:
            inputs = {d["name"]: d["index"] for d in interp.get_input_details()}
            outputs = {d["name"]: d["index"] for d in interp.get_output_details()}
        self.signature = key
        self._inputs, self._outputs = inputs, outputs
        self._in_index = _find(inputs, io.input, "input", model)
        self._out = [(name, _find(outputs, name, "output", model)) for name in io.outputs]
        details = {d["index"]: d for d in interp.get_tensor_details()} if hasattr(interp, "get_tensor_details") else {}
        in_details = details.get(self._in_index) or next(d for d in interp.get_input_details()
                                                          if d["index"] == self._in_index)
        self.input_shape = tuple(int(v) for v in in_details.get("shape_signature", in_details["shape"]))
        self.input_dtype = np.dtype(in_details["dtype"])
        # an integer input without a scale takes raw values: the uint8 pixels of a stage that normalises them itself
        self._in_quant = _Quant(in_details, model) if self.input_dtype.kind in "iu" and _scaled(in_details) else None
        self._out_quant: dict[str, _Quant | None] = {}
        out_by_index = {d["index"]: d for d in interp.get_output_details()}
        for name, index in self._out:
            d = out_by_index.get(index) or details[index]
            self._out_quant[name] = _Quant(d, model) if np.dtype(d["dtype"]).kind in "iu" else None
        self.fixed_batch = self.input_shape[0] if self.input_shape and self.input_shape[0] > 0 else None
        self._batch = int(in_details["shape"][0]) if len(in_details["shape"]) else None
        self._sample_shape = [int(v) for v in in_details["shape"][1:]]
        self._rows = self.batch_mode == "rows" and self.fixed_batch is not None
        self._transpose: dict[tuple[int, ...], tuple[int, ...] | None] = {}

    def declared(self) -> DeclaredIO:
        """The model's signature inputs and outputs (``shape_signature``: -1 is not fixed); LiteRT
        quantizes int8 inputs and transposes NCHW/NHWC itself."""
        interp = self._interp
        details = {d["index"]: d for d in (*interp.get_input_details(), *interp.get_output_details())}
        if hasattr(interp, "get_tensor_details"):
            details.update({d["index"]: d for d in interp.get_tensor_details()})

        def info(index: int) -> TensorInfo:
            d = details[index]
            shape = d.get("shape_signature", d["shape"])
            return TensorInfo(np.dtype(d["dtype"]).name, tuple(int(v) if v > 0 else None for v in shape))

        return DeclaredIO({name: info(i) for name, i in self._inputs.items()},
                          {name: info(i) for name, i in self._outputs.items()},
                          input_dtypes=("float32", "int8", "uint8"), any_layout=True)

    @property
    def quantization(self) -> dict:
        """The input/output quantization read from the model (empty for float I/O)."""
        record = {}
        if self._in_quant:
            record["input"] = self._in_quant.record()
        record.update({name: q.record() for name, q in self._out_quant.items() if q})
        return record

    def _layout(self, x: np.ndarray) -> np.ndarray:
        """``x`` in the model's own input layout (transposed NCHW<->NHWC when the model wants the other)."""
        key = x.shape[1:]
        if key not in self._transpose:
            want = self.input_shape[1:]

            def fits(shape: tuple[int, ...]) -> bool:
                return len(shape) == len(want) and all(w < 0 or w == s for w, s in zip(want, shape))

            order = None
            if not fits(key) and x.ndim == 4:
                for perm in ((0, 2, 3, 1), (0, 3, 1, 2)):
                    if fits(tuple(x.shape[p] for p in perm[1:])):
                        order = perm
                        break
                else:
                    raise BundleError(f"{self.model.name}: input of shape {tuple(x.shape)} does not fit the model's "
                                      f"input {self.input_shape} in either layout")
            elif not fits(key):
                raise BundleError(f"{self.model.name}: input of shape {tuple(x.shape)} does not fit the model's "
                                  f"input {self.input_shape}")
            self._transpose[key] = order
        order = self._transpose[key]
        return np.ascontiguousarray(x.transpose(order)) if order else x

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = self._layout(np.asarray(x))
        if self._in_quant is not None:
            return self._in_quant.quantize(x)
        if x.dtype != self.input_dtype:
            x = x.astype(self.input_dtype)
        return np.ascontiguousarray(x)

    def _resize(self, n: int) -> bool:
        """Make the interpreter take batch ``n``; False when this model cannot be resized."""
        if n == self._batch:
            return True
        try:
            self._interp.resize_tensor_input(self._in_index, [n, *self._sample_shape], strict=False)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError):
            if self.batch_mode == "resize":
                raise
            self._rows, self._batch = True, None
            self._restore()
            return False
        self._batch = n
        return True

    def _restore(self) -> None:
        """Back to the batch size the model was exported with."""
        base = self.fixed_batch or 1
        if self._batch != base:
            self._interp.resize_tensor_input(self._in_index, [base, *self._sample_shape], strict=False)
            self._interp.allocate_tensors()
            self._batch = base

    def _invoke(self, q: np.ndarray) -> dict[str, np.ndarray]:
        interp = self._interp
        interp.set_tensor(self._in_index, q)
        interp.invoke()
        out = {}
        for name, index in self._out:
            quant = self._out_quant[name]
            if quant is None:
                out[name] = interp.get_tensor(index)
            else:
                view = interp.tensor(index)
                out[name] = quant.dequantize(view())
                del view
        return out

    @property
    def ran_on(self) -> str:
        """The delegate(s) attached, else the CPU kernels (XNNPACK or LiteRT's builtin ones)."""
        return ",".join(self._delegate_names) or ("CPU (XNNPACK)" if self.xnnpack else "CPU (builtin kernels)")

    def device_problem(self, device: str) -> str | None:
        """Why this stage does not run on ``device`` (``None`` when it does): only a delegate takes a stage off the CPU."""
        if device.upper() != "CPU" and not self._delegates:
            return f"LiteRT runs it on the CPU: no delegate for {device!r} is attached"
        return None

    def close(self) -> None:
        """Release the interpreter and its delegates."""
        with self._lock:
            self._interp = None
            self._delegates = []

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name (copies) for ``tensor``; calls from several threads take turns on the interpreter."""
        with self._lock:
            return self._run(tensor)

    def _run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        q = self._prepare(tensor)
        n = int(q.shape[0])
        if not self._rows and self._resize(n):
            out = self._invoke(q)
            if all(v.shape[:1] == (n,) for v in out.values()):
                return out
            if self.batch_mode == "resize":
                raise BundleError(f"{self.model.name}: resized to batch {n}, the model returned outputs of batch "
                                  f"{[v.shape[0] for v in out.values()]}; load with options={{'batch': 'rows'}}")
            self._rows = True  # the graph took the new size but does not honour it: never resize again
            self._restore()
        return self._run_rows(q)

    def _run_rows(self, q: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``q`` in chunks of the model's own batch size (the last chunk padded)."""
        n, step = int(q.shape[0]), self._batch or 1
        parts = []
        for i in range(0, n, step):
            chunk = q[i:i + step]
            k = len(chunk)
            if k < step:
                chunk = np.concatenate([chunk, np.zeros((step - k, *chunk.shape[1:]), chunk.dtype)])
            parts.append({name: v[:k] for name, v in self._invoke(chunk).items()})
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name, _ in self._out}


def open_stage(files: Sequence[Path], io: StageIO, options: LoadOptions) -> LiteRTStage:
    """Open the ``.tflite`` file of one stage."""
    return LiteRTStage(Path(files[0]), io, options)
