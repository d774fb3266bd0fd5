"""What a loaded stage's model declares (tensor names, dtypes, shapes), checked against the manifest.

Each runtime adapter's session has ``declared() -> DeclaredIO``, read from the model the runtime
loaded. :func:`check_stages` compares it with the manifest when a bundle is loaded, so a manifest
that names tensors the model lacks, a wrong image size, layout or class count is a
:class:`~stagewise.errors.ManifestError` naming the field and the model's value, not a runtime
error (or a silently wrong class name) at the first prediction. Unknown (dynamic) dimensions are
not compared. A session without ``declared`` (a test double) is not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from stagewise.errors import ManifestError
from stagewise.manifest import Manifest, StageSpec

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the model declares it: numpy dtype name and shape (``None``: not fixed)."""

    dtype: str
    shape: Shape


@dataclass(frozen=True)
class DeclaredIO:
    """A stage model's inputs and outputs by name.

    ``input_dtypes``: the input dtypes this runtime can feed from the manifest's float32 tensor
    (e.g. LiteRT quantizes to int8); ``any_layout``: the runtime transposes NCHW/NHWC itself.
    """

    inputs: Mapping[str, TensorInfo]
    outputs: Mapping[str, TensorInfo]
    input_dtypes: tuple[str, ...] = ("float32",)
    any_layout: bool = False


def _known(shape: Shape, expected: Sequence[int | None]) -> bool:
    return len(shape) == len(expected) and all(a is None or b is None or a == b for a, b in zip(shape, expected))


def _image_shapes(size: tuple[int, int]) -> dict[str, tuple[int | None, ...]]:
    h, w = size
    return {"NCHW": (None, 3, h, w), "NHWC": (None, h, w, 3)}


def _tensor(table: Mapping[str, TensorInfo], name: str | None, field: str, kind: str) -> TensorInfo:
    if name not in table:
        raise ManifestError(f"manifest field {field}: {name!r} is not an {kind} of the model (its {kind}s: "
                            f"{', '.join(sorted(table)) or 'none'}); the manifest and the model do not match, "
                            "rebuild the bundle")
    return table[name]


def check_stage(k: int, spec: StageSpec, io: DeclaredIO, layout: str, classes: int) -> None:
    """Raise :class:`ManifestError` if stage ``k``'s manifest record disagrees with what its model declares."""
    where = f"stages[{k}]"
    tensor = _tensor(io.inputs, spec.input.tensor, f"{where}.input.tensor", "input")
    if spec.input.pixels:  # the stage's graph takes uint8 NHWC pixels and normalises them itself
        expected, field, dtypes, layout = "uint8", f"{where}.input.dtype", ("uint8",), "NHWC"
    else:
        expected, field, dtypes = "float32", "input.dtype", io.input_dtypes
    if tensor.dtype not in dtypes:
        raise ManifestError(f"manifest field {field}: {expected}, but stage {spec.name}'s model input "
                            f"{spec.input.tensor!r} is {tensor.dtype}; rebuild the bundle")
    if spec.input.source == "image":
        shapes = _image_shapes(spec.input.size)
        fits = [name for name, shape in shapes.items() if _known(tensor.shape, shape)]
        if not fits:
            raise ManifestError(f"manifest field {where}.input.size: {list(spec.input.size)} ({layout}), but the "
                                f"model's input {spec.input.tensor!r} has shape {list(tensor.shape)}; rebuild the bundle")
        if layout not in fits and not io.any_layout:
            raise ManifestError(f"manifest field input.layout: {layout}, but the model's input {spec.input.tensor!r} "
                                f"has shape {list(tensor.shape)} ({fits[0]}); rebuild the bundle")
    elif spec.input.shape is not None and not _known(tensor.shape[1:], spec.input.shape[1:]):
        raise ManifestError(f"manifest field {where}.input.shape: {list(spec.input.shape)}, but the model's input "
                            f"{spec.input.tensor!r} has shape {list(tensor.shape)}; rebuild the bundle")
    logits = _tensor(io.outputs, spec.outputs.logits, f"{where}.outputs.logits", "output")
    if spec.outputs.carry is not None:
        _tensor(io.outputs, spec.outputs.carry, f"{where}.outputs.carry", "output")
    if len(logits.shape) != 2 or logits.shape[1] not in (None, classes):
        raise ManifestError(f"manifest field task.labels: {classes} labels, but stage {spec.name}'s logits output "
                            f"{spec.outputs.logits!r} has shape {list(logits.shape)}; the labels do not match the "
                            "model's classes, rebuild the bundle")


def check_carry(k: int, spec: StageSpec, io: DeclaredIO, source: StageSpec, source_io: DeclaredIO) -> None:
    """Raise :class:`ManifestError` if the carry that stage ``k`` reads (``source``'s carry output) does not
    fit its model input (dtype, or a dimension both models fix)."""
    carry = source_io.outputs[source.outputs.carry]
    tensor = io.inputs[spec.input.tensor]
    fed = carry.dtype == tensor.dtype or (carry.dtype == "float32" and tensor.dtype in io.input_dtypes)
    if not fed or not _known(carry.shape, tensor.shape):
        raise ManifestError(f"manifest field stages[{k}].input.from: stage {spec.name!r} reads the carry of "
                            f"{source.name!r}, a {carry.dtype} tensor of shape {list(carry.shape)}, but its model input "
                            f"{spec.input.tensor!r} is {tensor.dtype} of shape {list(tensor.shape)}; the manifest names "
                            "the wrong stage, rebuild the bundle")


def check_stages(manifest: Manifest, sessions: Sequence[object]) -> None:
    """Check every stage whose session reports what its model declares (see :func:`check_stage`), and
    that each carry fits the stage that reads it (:func:`check_carry`)."""
    seen: dict[str, tuple[StageSpec, DeclaredIO]] = {}
    for k, (spec, session) in enumerate(zip(manifest.stages, sessions)):
        io = session.declared()
        if io is None:
            continue
        check_stage(k, spec, io, manifest.input.layout, len(manifest.classes))
        if spec.input.source == "carry" and spec.input.from_stage in seen:
            check_carry(k, spec, io, *seen[spec.input.from_stage])
        seen[spec.name] = (spec, io)
