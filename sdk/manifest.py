"""The bundle manifest as typed, frozen records, and its validation.

:meth:`Manifest.from_dict` validates a ``manifest.json`` document (:func:`validate_manifest`: the
shipped JSON Schema plus the cross-field rules the schema cannot express) and parses it once;
readers use attributes (``manifest.stages[k].exit.score``), writers build new records with
:func:`dataclasses.replace`. :meth:`Manifest.to_dict` gives back the JSON document, and only
:func:`stagewise.bundle.write_bundle` calls it: ``Manifest.from_dict(d).to_dict() == d`` for every
valid ``d``, so bundles written by older versions keep their bytes' meaning.

Free-form records (producer, calibration, profiles, goal, head, adaptation, quantization and verification
records) are read-only mappings; sequences are tuples. :func:`thaw` gives one back as plain JSON to extend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator

import jsonschema
import numpy as np

from .deprecation import renamed_attribute
from .errors import ManifestError
from .formats import FORMATS
from .images import Preprocess

FORMAT = "stagewise-bundle"
FORMAT_VERSION = 1
"""Exit scores that lie in [0, 1] (``max_logit`` is a raw logit, bounded only by the schema)."""
_SLACK = 1e-9
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def freeze(value: Any) -> Any:
    """A read-only deep copy of a JSON value: dicts become mappings, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain JSON value (dicts and lists) of a frozen one."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def _optional(d: Mapping[str, Any], **values: Any) -> dict[str, Any]:
    """``d`` plus every value that is not ``None`` (absent optional fields stay absent)."""
    out = dict(d)
    out.update({k: thaw(v) for k, v in values.items() if v is not None})
    return out


def _others(d: Mapping[str, Any], known: tuple[str, ...]) -> Mapping[str, Any]:
    return freeze({k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True)
class Task:
    """What the bundle predicts: ``classes`` are the class names, in target order (the document's
    ``task.labels``; ``labels`` is the attribute's deprecated name)."""

    classes: tuple[str, ...]
    top_k: int | None = None

    labels = renamed_attribute("labels", "classes")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Task":
        return cls(classes=tuple(d["labels"]), top_k=d.get("top_k"))

    def to_dict(self) -> dict[str, Any]:
        return _optional({"type": "classification", "labels": list(self.classes)}, top_k=self.top_k)


@dataclass(frozen=True)
class StageInput:
    """Where a stage's input comes from.

    ``source`` is ``"image"`` (the decoded image resized to ``size`` = (height, width)),
    ``"carry"`` (the carry output of the earlier stage named ``from_stage``) or ``"patch"`` (a
    square patch of the original image resized to ``size``, chosen from the class-activation map
    of the earlier stage ``from_stage``: its cells from the highest down, a patch kept when its
    IoU with every kept one is below ``iou``, up to ``count``; the patch's side is
    ``patch_fraction`` of the shorter side of the region that stage saw, and this stage reads
    the ``index``-th chosen patch, 0-based). ``tensor`` is the model's input name (``None`` in a
    converter's plan, before the model is exported); ``shape`` is the carry's recorded shape,
    when known.

    ``dtype``/``layout`` of an image input: ``"uint8"``/``"NHWC"`` when the model takes the
    resized pixels as they are (normalisation and layout are inside its graph); absent in
    bundles written before that (the model takes the float tensor the bundle's ``input``
    describes). See :attr:`pixels`.
    """

    source: str
    tensor: str | None = None
    size: tuple[int, int] | None = None
    from_stage: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    layout: str | None = None
    count: int | None = None
    iou: float | None = None
    patch_fraction: float | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        if self.source in ("image", "patch") and self.size is None:
            raise ValueError(f"an {self.source} stage input needs its size (height, width)")
        if self.source in ("carry", "patch") and self.from_stage is None:
            raise ValueError(f"a {self.source} stage input needs the name of the stage it comes from")
        if self.source == "patch":
            if None in (self.count, self.iou, self.patch_fraction, self.index):
                raise ValueError("a patch stage input needs count, iou, patch_fraction and index")
            if not 0 <= self.index < self.count:
                raise ValueError(f"a patch stage reads patch index {self.index} of {self.count}: it must be 0 to count - 1")
            if not (0 < self.iou <= 1 and 0 < self.patch_fraction <= 1):
                raise ValueError("a patch stage's iou and patch_fraction lie in (0, 1]")
        if self.dtype not in (None, "float32", "uint8") or (self.dtype == "uint8" and self.layout != "NHWC"):
            raise ValueError("an image stage input is float32 (normalised as the bundle's input says) or uint8 NHWC")

    @property
    def pixels(self) -> bool:
        """True when the stage takes uint8 NHWC pixels (its graph normalises them itself)."""
        return self.dtype == "uint8"

    @property
    def reads_pixels(self) -> bool:
        """True when the stage reads the decoded image (all of it, or a patch) rather than a carry."""
        return self.source in ("image", "patch")

    @classmethod
    def image(cls, size: tuple[int, int], tensor: str | None = None) -> "StageInput":
        return cls("image", tensor, size=(int(size[0]), int(size[1])))

    @classmethod
    def carry(cls, from_stage: str, tensor: str | None = None) -> "StageInput":
        return cls("carry", tensor, from_stage=from_stage)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageInput":
        """From a manifest stage ``input`` or a converter plan's ``{"source": ..., "size"/"from": ...}``."""
        size = d.get("size")
        shape = d.get("shape")
        return cls(d["source"], d.get("tensor"), size=tuple(size) if size is not None else None,
                   from_stage=d.get("from"), shape=tuple(shape) if shape is not None else None,
                   dtype=d.get("dtype"), layout=d.get("layout"), count=d.get("count"), iou=d.get("iou"),
                   patch_fraction=d.get("patch_fraction"), index=d.get("index"))

    def to_dict(self) -> dict[str, Any]:
        return _optional({"source": self.source}, size=self.size, **{"from": self.from_stage}, tensor=self.tensor,
                         shape=self.shape, dtype=self.dtype, layout=self.layout, count=self.count, iou=self.iou,
                         patch_fraction=self.patch_fraction, index=self.index)


@dataclass(frozen=True)
class ArtifactFile:
    """One file of a bundle: its path inside the bundle, sha256 and size (``None`` in a manifest not yet
    written: :func:`~stagewise.bundle.write_bundle` fills them in from the file's content)."""

    path: str
    sha256: str | None = None
    bytes: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ArtifactFile":
        return cls(d["path"], d.get("sha256"), d.get("bytes"))

    def to_dict(self) -> dict[str, Any]:
        return _optional({"path": self.path}, sha256=self.sha256, bytes=self.bytes)


@dataclass(frozen=True)
class Artifact:
    """One stage in one format: its files (main model file first), precision and records."""

    files: tuple[ArtifactFile, ...]
    precision: str
    quantization: Mapping[str, Any] | None = None
    verification: Mapping[str, Any] | None = None
    target: Mapping[str, Any] | None = None
    decision: Mapping[str, Any] | None = None  # the exit decision outputs the graph has (schema: artifact.decision)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Artifact":
        return cls(tuple(ArtifactFile.from_dict(f) for f in d["files"]), d["precision"],
                   *(freeze(d[k]) if k in d else None for k in ("quantization", "verification", "target", "decision")))

    def to_dict(self) -> dict[str, Any]:
        return _optional({"files": [f.to_dict() for f in self.files], "precision": self.precision},
                         quantization=self.quantization, verification=self.verification, target=self.target,
                         decision=self.decision)


@dataclass(frozen=True)
class ExitRule:
    """How a stage decides to answer: ``score`` of its probabilities at ``temperature``.

    ``combine`` is ``"own"`` (this stage's probabilities) or ``"mean_probs"`` (the mean over
    the stages run so far); ``model`` is the learned exit score's file (score ``"learned"``).
    ``combine_recorded`` says whether the document wrote ``combine`` (old ones did not), so
    :meth:`to_dict` writes back what was read.
    """

    score: str
    temperature: float
    combine: str = "own"
    model: ArtifactFile | None = None
    combine_recorded: bool = field(default=True, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExitRule":
        model = d.get("model")
        return cls(d["score"], d["temperature"], d.get("combine", "own"),
                   ArtifactFile.from_dict(model) if model is not None else None, "combine" in d)

    def to_dict(self) -> dict[str, Any]:
        out = _optional({"score": self.score, "temperature": self.temperature},
                        model=self.model.to_dict() if self.model else None)
        if self.combine_recorded or self.combine != "own":
            out["combine"] = self.combine
        return out


@dataclass(frozen=True)
class LatencyStats:
    """A stage's step time (ms) on one device profile; ``other`` holds further quantiles (p90, mean ...)."""

    p50: float
    p95: float | None = None
    n: int | None = None
    other: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyStats":
        return cls(d["p50"], d.get("p95"), d.get("n"), _others(d, ("p50", "p95", "n")))

    def to_dict(self) -> dict[str, Any]:
        return _optional({"p50": self.p50, **thaw(self.other)}, p95=self.p95, n=self.n)


@dataclass(frozen=True)
class StageCost:
    """What a stage costs: multiply-accumulates, parameters, and measured latency per device profile."""

    macs: int | None = None
    params: int | None = None
    latency_ms: Mapping[str, LatencyStats] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageCost":
        latency = d.get("latency_ms")
        return cls(d.get("macs"), d.get("params"), MappingProxyType(
            {k: LatencyStats.from_dict(v) for k, v in latency.items()}) if latency is not None else None)

    def latency(self, profile: str) -> LatencyStats | None:
        """The latency recorded for ``profile``, if any."""
        return (self.latency_ms or {}).get(profile)

    def to_dict(self) -> dict[str, Any]:
        latency = {k: v.to_dict() for k, v in self.latency_ms.items()} if self.latency_ms is not None else None
        return _optional({}, macs=self.macs, params=self.params, latency_ms=latency)


@dataclass(frozen=True)
class StageOutputs:
    """Output tensor names: the logits, the carry handed to a later stage and the class-activation
    map of the top class (N x grid height x grid width) that patch stages read (if any)."""

    logits: str
    carry: str | None = None
    cam: str | None = None

    def names(self) -> tuple[str, ...]:
        return (self.logits,) + tuple(n for n in (self.carry, self.cam) if n)

    def to_dict(self) -> dict[str, Any]:
        return _optional({"logits": self.logits}, carry=self.carry, cam=self.cam)


@dataclass(frozen=True)
class CamGrid:
    """How the cells of a stage's class-activation map sit on that stage's input image.

    Cell ``(i, j)`` of the ``grid`` (rows, columns) is centred at ``offset + stride * (i, j)``
    input pixels (y, x; continuous coordinates, the input's top-left corner at 0). ``mapping`` is
    ``"exact"`` when that centre is the cell's receptive-field centre (a network without padding;
    ``receptive_field`` then holds its size) or ``"proportional"`` when the grid is spread
    evenly over the input (``stride`` = input size / grid, ``offset`` = stride / 2).
    """

    grid: tuple[int, int]
    mapping: str
    stride: tuple[float, float]
    offset: tuple[float, float]
    receptive_field: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mapping not in ("exact", "proportional"):
            raise ValueError(f"a CAM mapping is 'exact' or 'proportional', not {self.mapping!r}")

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """The cell centres' y and x in input pixels, each grid-shaped."""
        ys = self.offset[0] + self.stride[0] * np.arange(self.grid[0], dtype=np.float64)
        xs = self.offset[1] + self.stride[1] * np.arange(self.grid[1], dtype=np.float64)
        return np.meshgrid(ys, xs, indexing="ij")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CamGrid":
        field_ = d.get("receptive_field")
        return cls(tuple(d["grid"]), d["mapping"], tuple(d["stride"]), tuple(d["offset"]),
                   tuple(field_) if field_ is not None else None)

    def to_dict(self) -> dict[str, Any]:
        return _optional({"grid": list(self.grid), "mapping": self.mapping, "stride": list(self.stride),
                          "offset": list(self.offset)}, receptive_field=self.receptive_field)


@dataclass(frozen=True)
class StageSpec:
    """One stage: its input, per-format artifacts, outputs, exit rule and cost (``head``: its exit head's
    training record; ``adaptation``: how its model was adapted to its input size, see
    :mod:`stagewise.converters.adapt`; ``cam``: where the cells of its class-activation map output lie
    on its input, for stages with a ``cam`` output)."""

    name: str
    input: StageInput
    artifacts: Mapping[str, Artifact]
    outputs: StageOutputs
    exit: ExitRule
    cost: StageCost
    head: Mapping[str, Any] | None = None
    cam: CamGrid | None = None
    adaptation: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageSpec":
        out = d["outputs"]
        return cls(d["name"], StageInput.from_dict(d["input"]),
                   MappingProxyType({k: Artifact.from_dict(a) for k, a in d["artifacts"].items()}),
                   StageOutputs(out["logits"], out.get("carry"), out.get("cam")), ExitRule.from_dict(d["exit"]),
                   StageCost.from_dict(d["cost"]), freeze(d["head"]) if "head" in d else None,
                   CamGrid.from_dict(d["cam"]) if "cam" in d else None,
                   freeze(d["adaptation"]) if "adaptation" in d else None)

    def to_dict(self) -> dict[str, Any]:
        return _optional({"name": self.name, "input": self.input.to_dict(),
                          "artifacts": {k: a.to_dict() for k, a in self.artifacts.items()},
                          "outputs": self.outputs.to_dict(), "exit": self.exit.to_dict(),
                          "cost": self.cost.to_dict()}, head=self.head,
                         cam=self.cam.to_dict() if self.cam else None, adaptation=self.adaptation)


@dataclass(frozen=True)
class Expected:
    """An operating point's figures measured at calibration (``other``: further records)."""

    accuracy: float | None = None
    agreement: float | None = None
    mean_cost: float | None = None
    cost_unit: str | None = None
    exit_rates: tuple[float, ...] | None = None
    n: int | None = None
    other: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    _KEYS = ("accuracy", "agreement", "mean_cost", "cost_unit", "exit_rates", "n")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Expected":
        rates = d.get("exit_rates")
        return cls(d.get("accuracy"), d.get("agreement"), d.get("mean_cost"), d.get("cost_unit"),
                   tuple(rates) if rates is not None else None, d.get("n"), _others(d, cls._KEYS))

    def to_dict(self) -> dict[str, Any]:
        return _optional(thaw(self.other), **{k: getattr(self, k) for k in self._KEYS})


@dataclass(frozen=True)
class Guarantee:
    """A risk guarantee: P(risk > ``epsilon``) <= ``delta`` over ``n`` calibration images."""

    epsilon: float
    delta: float
    n: int
    method: str
    risk: str
    n_tune: int | None = None
    empirical_risk: float | None = None
    upper_bound: float | None = None
    other: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    _KEYS = ("epsilon", "delta", "n", "method", "risk", "n_tune", "empirical_risk", "upper_bound")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Guarantee":
        return cls(*(d.get(k) for k in cls._KEYS), other=_others(d, cls._KEYS))

    def to_dict(self) -> dict[str, Any]:
        return _optional(thaw(self.other), **{k: getattr(self, k) for k in self._KEYS})


@dataclass(frozen=True)
class OperatingPoint:
    """Named thresholds, one per stage (``None``: that stage never exits early; the last always answers)."""

    name: str
    thresholds: tuple[float | None, ...]
    goal: Mapping[str, Any] | None = None
    expected: Expected | None = None
    guarantee: Guarantee | None = None

    @property
    def threshold_array(self) -> np.ndarray:
        """The thresholds as floats, ``inf`` for stages that never exit."""
        return np.array([np.inf if t is None else t for t in self.thresholds], dtype=np.float64)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OperatingPoint":
        return cls(d["name"], tuple(d["thresholds"]), freeze(d["goal"]) if "goal" in d else None,
                   Expected.from_dict(d["expected"]) if "expected" in d else None,
                   Guarantee.from_dict(d["guarantee"]) if "guarantee" in d else None)

    def to_dict(self) -> dict[str, Any]:
        return _optional({"name": self.name, "thresholds": list(self.thresholds)}, goal=self.goal,
                         expected=self.expected.to_dict() if self.expected else None,
                         guarantee=self.guarantee.to_dict() if self.guarantee else None)


_INPUT_DEFAULTS = ("crop_fraction", "interpolation", "resizer")


@dataclass(frozen=True)
class Manifest:
    """A bundle manifest.

    Read it through attributes; change it with :func:`dataclasses.replace` (or :meth:`with_stages`)
    and write it with :func:`~stagewise.bundle.write_bundle`. One read from a document
    (:meth:`from_dict`) is validated; one built in code is validated when it is written.
    ``input_keys`` are the optional ``input`` keys the document wrote (``crop_fraction``,
    ``interpolation``, ``resizer``), so :meth:`to_dict` writes back what was read.
    """

    name: str
    producer: Mapping[str, Any]
    task: Task
    input: Preprocess
    stages: tuple[StageSpec, ...]
    operating_points: tuple[OperatingPoint, ...]
    default_operating_point: str
    calibration: Mapping[str, Any] | None = None
    profiles: Mapping[str, Any] | None = None
    input_keys: frozenset[str] = field(default=frozenset(_INPUT_DEFAULTS), repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        """Validate ``d`` (raises :class:`~stagewise.errors.ManifestError` naming the field) and parse it."""
        validate_manifest(d)
        return cls(d["name"], freeze(d["producer"]), Task.from_dict(d["task"]), Preprocess.from_manifest(d["input"]),
                   tuple(StageSpec.from_dict(s) for s in d["stages"]),
                   tuple(OperatingPoint.from_dict(p) for p in d["operating_points"]), d["default_operating_point"],
                   freeze(d["calibration"]) if "calibration" in d else None,
                   freeze(d["profiles"]) if "profiles" in d else None,
                   frozenset(k for k in _INPUT_DEFAULTS if k in d["input"]))

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (a new dict each call)."""
        spec = self.input.to_manifest()
        for key in _INPUT_DEFAULTS:
            if key not in self.input_keys:
                spec.pop(key, None)
        return _optional({"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
                          "producer": thaw(self.producer), "task": self.task.to_dict(), "input": spec,
                          "stages": [s.to_dict() for s in self.stages],
                          "operating_points": [p.to_dict() for p in self.operating_points],
                          "default_operating_point": self.default_operating_point},
                         calibration=self.calibration, profiles=self.profiles)

    @property
    def classes(self) -> list[str]:
        """The class names, in target order (the document's ``task.labels``)."""
        return list(self.task.classes)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def point(self, name: str) -> OperatingPoint:
        """The operating point called ``name`` (``KeyError`` if there is none)."""
        for p in self.operating_points:
            if p.name == name:
                return p
        raise KeyError(name)

    def files(self) -> Iterator[ArtifactFile]:
        """Every file the manifest names, in stage order (model files, then exit-score models)."""
        for stage in self.stages:
            for artifact in stage.artifacts.values():
                yield from artifact.files
            if stage.exit.model is not None:
                yield stage.exit.model

    def with_stages(self, change: Callable[[int, StageSpec], StageSpec]) -> "Manifest":
        """A copy whose stage ``k`` is ``change(k, stage)`` (a new :class:`StageSpec`)."""
        return replace(self, stages=tuple(change(k, stage) for k, stage in enumerate(self.stages)))

    def with_points(self, points: Iterable[OperatingPoint | Mapping[str, Any]], default: str | None = None) -> "Manifest":
        """A copy with operating points ``points`` (records or their documents), ``default`` the default when given."""
        parsed = tuple(p if isinstance(p, OperatingPoint) else OperatingPoint.from_dict(p) for p in points)
        return replace(self, operating_points=parsed, default_operating_point=default or self.default_operating_point)


def manifest_schema() -> dict:
    """The JSON Schema of manifest format version 1: the shipped document, with the names of the registered
    artifact formats (:data:`stagewise.formats.FORMATS`) and exit scores (:data:`stagewise.exits.SCORES`)."""
    from .exits import COMBINES, SCORES  # exits reads manifest records: imported here, not at the top

    needs_model = tuple(name for name, score in SCORES.items() if score.model is not None)
    return _schema(tuple(FORMATS), tuple(SCORES), tuple(COMBINES), needs_model)


@lru_cache(maxsize=4)
def _schema(formats: tuple[str, ...], scores: tuple[str, ...], combines: tuple[str, ...],
            needs_model: tuple[str, ...]) -> dict:
    schema = json.loads(resources.files("stagewise").joinpath("schema/manifest.schema.json").read_text())
    stage = schema["$defs"]["stage"]["properties"]
    stage["artifacts"]["propertyNames"] = {"enum": list(formats)}
    rule = stage["exit"]
    rule["properties"]["score"]["enum"] = list(scores)
    rule["properties"]["combine"]["enum"] = list(combines)
    rule["if"] = {"properties": {"score": {"enum": list(needs_model)}}}
    return schema


def _field_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate_manifest(manifest: Any) -> None:
    """Raise :class:`ManifestError` naming the offending field if ``manifest`` is not valid."""
    validator = jsonschema.Draft202012Validator(manifest_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        raise ManifestError(f"manifest field {_field_path(error.absolute_path)}: {error.message}")
    _check_references(manifest)


def _check_references(m: dict) -> None:
    from .exits import SCORES

    names = [s["name"] for s in m["stages"]]
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest field stages: stage names must be unique, got {names}")
    for i, stage in enumerate(m["stages"]):
        source = stage["input"]
        if source.get("dtype") == "uint8" and source.get("layout") != "NHWC":
            raise ManifestError(f"manifest field stages[{i}].input.layout: a uint8 input is the resized pixels in NHWC "
                                f"layout, got {source.get('layout')!r}; rebuild the bundle")
        if source["source"] == "carry":
            earlier = {s["name"]: s for s in m["stages"][:i]}
            if source["from"] not in earlier or "carry" not in earlier[source["from"]]["outputs"]:
                raise ManifestError(
                    f"manifest field stages[{i}].input.from: {source['from']!r} must name an earlier stage "
                    "that has a carry output")
        elif source["source"] == "patch":
            _check_patch_source(m["stages"], i)
        if ("cam" in stage["outputs"]) != ("cam" in stage):
            raise ManifestError(f"manifest field stages[{i}]: stage {stage['name']!r} needs both outputs.cam (the CAM "
                                "tensor) and cam (where its cells sit on the input), or neither")
    paths = [f["path"] for s in m["stages"] for a in s["artifacts"].values() for f in a["files"]]
    for entry in document_files(m):
        if any(ord(c) < 32 for c in entry["path"]):
            raise ManifestError(f"manifest field stages[].artifacts: the file path {entry['path']!r} holds a control "
                                "character (e.g. a NUL byte); the bundle is corrupt, rebuild it")
    if len(set(paths)) != len(paths):
        raise ManifestError("manifest field stages[].artifacts: each file may be named only once")
    points = [p["name"] for p in m["operating_points"]]
    if len(set(points)) != len(points):
        raise ManifestError(f"manifest field operating_points: names must be unique, got {points}")
    for j, point in enumerate(m["operating_points"]):
        if len(point["thresholds"]) != len(m["stages"]):
            raise ManifestError(
                f"manifest field operating_points[{j}].thresholds: needs one entry per stage "
                f"({len(m['stages'])}), got {len(point['thresholds'])}")
        for k, (t, stage) in enumerate(zip(point["thresholds"], m["stages"])):
            score = stage["exit"]["score"]
            if t is not None and SCORES[score].probability and not -_SLACK <= t <= 1 + _SLACK:
                raise ManifestError(
                    f"manifest field operating_points[{j}].thresholds[{k}]: {t} is outside [0, 1], the range of the "
                    f"stage's {score} score (null: never exit); recalibrate the bundle")
    if m["default_operating_point"] not in points:
        raise ManifestError(
            f"manifest field default_operating_point: {m['default_operating_point']!r} is not one of {points}")


def _check_patch_source(stages: list[dict], i: int) -> None:
    stage, source = stages[i], stages[i]["input"]
    earlier = {s["name"]: s for s in stages[:i]}
    glance = earlier.get(source["from"])
    if glance is None:
        raise ManifestError(f"manifest field stages[{i}].input.from: stage {stage['name']!r} reads patches of "
                            f"{source['from']!r}, which is not an earlier stage; name an earlier stage with a CAM output")
    if "cam" not in glance["outputs"]:
        raise ManifestError(
            f"manifest field stages[{i}].input.from: stage {stage['name']!r} reads patches chosen from the CAM of "
            f"{source['from']!r}, but that stage has no CAM output; convert its model as a glance stage "
            "(`stagewise convert --stage MODEL@SIZE --focus MODEL@SIZE`, its last block must be global pooling + "
            "linear) or let this stage read the image")
    if source["index"] >= source["count"]:
        raise ManifestError(f"manifest field stages[{i}].input.index: stage {stage['name']!r} reads patch "
                            f"{source['index']} of {source['count']}; the index must be below count")


def document_files(manifest: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every file entry of a manifest document, for the checks that run before it is parsed."""
    for stage in manifest["stages"]:
        for artifact in stage["artifacts"].values():
            yield from artifact["files"]
        if "model" in stage.get("exit", {}):
            yield stage["exit"]["model"]
