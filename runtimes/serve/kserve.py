"""The Open Inference Protocol (KServe v2) tensors of ``/v2/models/{name}/infer``, JSON and binary.

The model takes one input, a ``UINT8`` image tensor of shape ``[N, H, W, 3]`` (RGB; ``[H, W, 3]``
is one image), given as a flat or nested ``data`` list or, with the binary tensor extension
that ``tritonclient`` uses, as raw bytes after the JSON header (``Inference-Header-Content-Length``
says where the header ends, ``parameters.binary_data_size`` how many bytes each input holds).
Request ``parameters`` may carry ``budget_ms`` and ``operating_point``. Pixels must be JSON
integers 0-255 (a float, string or boolean is refused, never rounded), NaN and Infinity are not
JSON, and an image over the service's ``max_pixels`` is refused with 413. It returns ``label``
(INT64), ``score`` (FP32), ``stage`` (INT32, the exit stage) and ``class_name`` (BYTES), each of
shape ``[N]``; an output is sent as binary when its request asks ``binary_data`` (or the request
sets ``binary_data_output``).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from stagewise.checks import MAX_BUDGET_MS

from .errors import PayloadTooLargeError, RequestError

HEADER = "Inference-Header-Content-Length"
OUTPUTS = {"label": "INT64", "score": "FP32", "stage_index": "INT32", "stage": "INT32", "class_name": "BYTES"}
"""The outputs of an infer answer; ``stage`` is ``stage_index`` under its 0.1 name, kept until 0.3.0 (CHANGELOG.md)."""
_NUMPY = {"INT64": np.int64, "FP32": np.float32, "INT32": np.int32}


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: the images, per-request settings and the outputs wanted."""

    id: str | None
    images: np.ndarray
    budget_ms: float | None
    operating_point: str | None
    outputs: dict[str, bool]  # output name -> send as binary


def model_metadata(name: str, version: str) -> dict:
    """The ``GET /v2/models/{name}`` document."""
    return {"name": name, "versions": [version], "platform": "stagewise",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
            "outputs": [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS.items()]}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_infer_request(body: bytes, header_length: str | None, max_pixels: int | None = None) -> InferRequest:
    """Read an infer request body; a malformed one raises :class:`RequestError` saying what is wrong,
    an image over ``max_pixels`` (height x width) :class:`PayloadTooLargeError`."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(f"{HEADER} must be an integer, got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise RequestError(f"{HEADER} is {n} but the body holds {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"the infer request is not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or len(doc["inputs"]) != 1:
        raise RequestError('an infer request needs "inputs": a list with one tensor, the UINT8 image [N, H, W, 3]')
    images = _image_tensor(doc["inputs"][0], binary, max_pixels)
    params = _object(doc.get("parameters"), "parameters")
    budget = params.get("budget_ms")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0 < budget <= MAX_BUDGET_MS):
        raise RequestError(f"parameters.budget_ms must be a number of milliseconds above 0 and at most "
                           f"{MAX_BUDGET_MS:.0f}, got {str(budget)[:40]}")
    point = params.get("operating_point")
    if point is not None and not isinstance(point, str):
        raise RequestError(f"parameters.operating_point must be a string, got {str(point)[:40]!r}")
    return InferRequest(doc.get("id"), images, None if budget is None else float(budget), point,
                        _requested_outputs(doc.get("outputs"), bool(params.get("binary_data_output", False))))


def _image_tensor(spec: Any, binary: memoryview, max_pixels: int | None) -> np.ndarray:
    if not isinstance(spec, dict):
        raise RequestError("an input tensor must be an object with name, shape, datatype and data")
    if spec.get("datatype") != "UINT8":
        raise RequestError(f'input datatype must be "UINT8" (RGB pixels 0-255), got {str(spec.get("datatype"))[:40]!r}')
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) not in (3, 4) or shape[-1] != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise RequestError(f"input shape must be [N, H, W, 3] (or [H, W, 3]) with positive sizes, got {str(shape)[:80]}")
    if max_pixels is not None and shape[-3] * shape[-2] > max_pixels:
        raise PayloadTooLargeError(f"input images are {shape[-3]}x{shape[-2]} = {shape[-3] * shape[-2]} pixels, over "
                                   f"the limit of {max_pixels} pixels per image; send smaller images")
    count = math.prod(shape)  # Python integers: no overflow
    size = _object(spec.get("parameters"), "input parameters").get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise RequestError(f"parameters.binary_data_size must be a whole number of bytes, got {str(size)[:40]}")
        if size != count or len(binary) < size:
            raise RequestError(f"binary input holds {min(size, len(binary))} bytes; shape {shape} needs {count}")
        flat = np.frombuffer(binary[:size], dtype=np.uint8)
    else:
        data = spec.get("data")
        if data is None:
            raise RequestError('the input tensor has neither "data" nor parameters.binary_data_size')
        flat = _pixels(data, count, shape)
    images = flat.reshape(shape)
    return images[None] if images.ndim == 3 else images


def _pixels(data: Any, count: int, shape: list) -> np.ndarray:
    """The JSON ``data`` of a UINT8 tensor as a flat uint8 array: integers 0-255 only, nothing coerced."""
    if not isinstance(data, list):
        raise RequestError("input data must be a (flat or nested) list of integers 0-255")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        values = None
    if values is None or values.dtype.kind not in "iu":  # floats, strings, booleans, ragged lists, huge integers
        raise RequestError("input data must be a (flat or nested) list of integers 0-255 (no floats, strings "
                           "or booleans)")
    values = values.ravel()
    if values.size != count:
        raise RequestError(f"input data holds {values.size} values; shape {shape} needs {count}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise RequestError("input data must be integers 0-255 (UINT8)")
    return values.astype(np.uint8)


def _requested_outputs(outputs: Any, binary_default: bool) -> dict[str, bool]:
    if outputs is None:
        return {name: binary_default for name in OUTPUTS}
    if not isinstance(outputs, list):
        raise RequestError('"outputs" must be a list of {"name": ...} objects')
    wanted = {}
    for out in outputs:
        name = out.get("name") if isinstance(out, dict) else None
        if not isinstance(name, str) or name not in OUTPUTS:
            raise RequestError(f"unknown output {str(name)[:40]!r}; this model returns: {', '.join(OUTPUTS)}")
        wanted[name] = bool(_object(out.get("parameters"), "output parameters").get("binary_data", binary_default))
    return wanted


def infer_response(model: str, version: str, request: InferRequest,
                   values: dict[str, list]) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers for ``values`` (output name -> one value per image)."""
    outputs, chunks = [], []
    for name, binary in request.outputs.items():
        datatype = OUTPUTS[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [len(values[name])]}
        if binary:
            raw = (b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in values[name])
                   if datatype == "BYTES" else np.asarray(values[name], dtype=_NUMPY[datatype]).tobytes())
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = values[name]
        outputs.append(out)
    doc = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc).encode()
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(chunks), {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}
