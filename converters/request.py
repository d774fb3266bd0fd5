"""One conversion request: what ``stagewise convert`` (flags or a TOML config) and
:func:`stagewise.converters.convert` ask for, as one typed, frozen :class:`ConversionRequest`.

All three entry points speak one vocabulary of *options*, the keywords of ``convert()`` (the flag
``--int8-max-drop`` is the option ``int8_max_drop``), and parse through one function,
:meth:`ConversionRequest.from_options`. Every default is stated once, on the dataclass fields
(:func:`option_default` reads it back in the options' units, for the CLI help); the conversion
kind follows from which source is given (:attr:`ConversionRequest.kind`); and the whole request is
checked against the names there are (formats and the runtimes that read them, exit scores,
combine modes, resizers, devices, head kinds, adaptations, model specs) when it is made, before
any model, image or training library is opened.

A TOML config (:func:`request_from_toml`) names the same options in tables::

    name = "effnet-cascade"
    out = "effnet.swb"
    data = "path/to/images"          # labelled images (class folders, archive or labels.tsv)

    [[stages]]                       # cascade: one table per stage
    model = "stagewise.converters.zoo:efficientnet_lite0"
    size = 224

    [[stages]]
    model = "stagewise.converters.zoo:efficientnet_lite2"
    size = 260

    [exit]
    score = "max_softmax"
    combine = "mean_probs"

    [build]
    format = "onnx"                  # or several: "onnx,openvino" (old name: backend)
    int8 = true
    target_drop = 0.5                # points of top-1

For an early exit give ``model = "file.py:factory"`` and ``exits = ["layer1", ...]`` at the top
level instead of ``[[stages]]``; ``new_classes = true`` classifies the data's own classes on every
stage (:mod:`~stagewise.converters.new_classes`), ``cache = "features/"`` keeps extracted features
for re-runs and ``device = "cuda"`` (auto, cpu, cuda, mps) says where torch work runs; and
optionally how the exits are trained::

    [training]
    mode = "joint"                   # frozen | joint | given (default: given if the model carries heads)
    epochs = 4
    lr = 0.02                        # backbone; head_lr = 0.1 for the heads
    freeze = ["stem"]
    exit_weights = [0.5, 0.75]
    augment = "flip_crop"

A stage may say ``adapt = "bn"`` (or ``"head"``): its model is adapted to its input size first
(:mod:`~stagewise.converters.adapt`). A cascade search (:mod:`~stagewise.converters.candidates`)
replaces ``[[stages]]`` by::

    [search]
    models = ["zoo:efficientnet_lite0", "zoo:efficientnet_lite1", "zoo:efficientnet_lite2"]
    sizes = [128, 160, 192, 224]     # each model at each size (default: the size it declares)
    adapt = "bn"                     # also a BatchNorm-adapted candidate where the size is not the model's own
    max_stages = 3
    combine = ["own", "mean_probs"]

For glance and focus (AnchorNet) give one ``[[stages]]`` table (the glance model) and a ``[focus]``
table: ``model``, ``size``, ``patches``, ``iou`` and ``patch_fraction``. An ``[input]`` table sets
``mean``, ``std`` (0-255 units), ``resize``, ``crop_fraction``, ``interpolation`` and ``resizer``.
A top-level ``kind`` (early_exit, cascade, search, glance_focus) is optional and must agree with
the tables. Paths are relative to the config's folder; flags given on the command line win over the
file; a key the file should not have is refused, naming the one it was meant to be.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from stagewise.errors import ConversionError, unknown_choice
from stagewise.exits import COMBINES, SCORES
from stagewise.images import RESIZERS, Preprocess

from .adapt import ADAPTATIONS, Adaptation
from .devices import check_device_name
from .export import EXPORTERS
from .factory import factory_parts
from .heads import FineTuning, HeadTraining
from .options import BuildOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: The kinds of conversion (:attr:`ConversionRequest.kind`).
KINDS = ("early_exit", "cascade", "search", "glance_focus")


@dataclass(frozen=True)
class StageSource:
    """One source model: a factory spec (``file.py:factory``, ``module:factory``) or the model
    object itself, and, for cascades, its input size and how it is adapted to it (one of
    :data:`~stagewise.converters.adapt.ADAPTATIONS`)."""

    model: Any
    size: int | None = None
    name: str | None = None
    adapt: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            factory_parts(self.model)
        if self.adapt not in ADAPTATIONS:
            raise ConversionError(unknown_choice("adaptation", self.adapt, ADAPTATIONS))
        if self.size is not None and not (isinstance(self.size, int) and self.size >= 1):
            raise ConversionError(f"the input size of {self.model!r} must be a positive integer, got {self.size!r}")


def stage_source(stage: Any, adapt: str | None = None) -> StageSource:
    """A stage as ``--stage``/``--focus`` write it, ``MODEL@SIZE`` or ``MODEL@SIZE+ADAPT`` (``ADAPT``: bn,
    head or none; without it, ``adapt`` or none), a ``(model, size)`` pair or a :class:`StageSource`, as a
    :class:`StageSource`."""
    if isinstance(stage, StageSource):
        return stage
    if not isinstance(stage, str):
        return StageSource(stage[0], int(stage[1]), adapt=adapt or "none")
    spec, _, kind = stage.partition("+")
    factory, _, size = spec.rpartition("@")
    kind = kind or adapt or "none"
    if not factory or not size.isdigit() or kind not in ADAPTATIONS:
        raise ConversionError(f"stage {stage!r}: write MODEL@SIZE or MODEL@SIZE+ADAPT with ADAPT one of "
                              f"{', '.join(ADAPTATIONS)}, e.g. models.py:small@128+bn")
    return StageSource(factory, int(size), adapt=kind)


@dataclass(frozen=True)
class CascadeSearch:
    """What the cascade search tries: each of ``models`` (factory specs) at each of ``sizes`` (none:
    the size each declares), with ``adapt`` (bn, head) also an adapted candidate wherever the size is
    not the model's own; cascades of up to ``max_stages`` in the ``combines`` modes. Latency is the
    median over ``timing_images`` calibration images."""

    models: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    adapt: str = "none"
    max_stages: int = 3
    combines: tuple[str, ...] = COMBINES
    timing_images: int = 50

    def __post_init__(self) -> None:
        if not self.models:
            raise ConversionError("the cascade search needs models: --search a.py:f,b.py:g (factory specs)")
        for spec in self.models:
            factory_parts(spec)
        if self.adapt not in ADAPTATIONS:
            raise ConversionError(unknown_choice("adaptation", self.adapt, ADAPTATIONS))
        for combine in self.combines:
            if combine not in COMBINES:
                raise ConversionError(unknown_choice("combine mode", combine, COMBINES))
        if not 1 <= self.max_stages <= 4:
            raise ConversionError(f"--max-stages must be 1 to 4, got {self.max_stages}")
        if any(size < 1 for size in self.sizes) or self.timing_images < 1:
            raise ConversionError("search sizes and timing images must be positive")


@dataclass(frozen=True)
class InputSpec:
    """How images reach the model, where the request says; a field left ``None`` takes what the
    model declares in ``stagewise_input``, else :class:`~stagewise.images.Preprocess`'s default.
    ``size``: the square input size (else the model's, else the images' common size); ``mean`` and
    ``std`` in 0-255 units."""

    size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: str | None = None
    crop_fraction: float | None = None
    interpolation: str | None = None
    resizer: str | None = None

    def __post_init__(self) -> None:
        if self.resizer is not None and self.resizer not in RESIZERS:
            raise ConversionError(unknown_choice("resizer", self.resizer, RESIZERS))
        if self.size is not None and not 1 <= self.size <= 4096:
            raise ConversionError(f"the input size must be 1 to 4096 pixels, got {self.size}")
        if self.crop_fraction is not None and not 0.1 <= self.crop_fraction <= 1:
            raise ConversionError(f"the crop fraction must lie in [0.1, 1], got {self.crop_fraction}")

    def preprocess(self, declared: Mapping[str, Any], layout: str) -> Preprocess:
        """The preprocessing of a model that declares ``declared`` (its ``stagewise_input``) and reads ``layout``."""
        keys = [f.name for f in fields(Preprocess) if f.name != "layout"]
        spec = {k: declared[k] for k in keys if k in declared}
        spec.update({k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        missing = [k for k in ("mean", "std") if k not in spec]
        if missing:
            raise ConversionError(
                f"the model does not declare its input normalisation; pass --mean and --std (0-255 units), "
                f"missing: {', '.join(missing)}")
        preprocess = Preprocess(**dict(spec, mean=tuple(spec["mean"]), std=tuple(spec["std"])), layout=layout)
        preprocess.check_resizer()
        return preprocess


@dataclass(frozen=True)
class FocusSteps:
    """Glance and focus: ``patches`` focus steps, each on a patch of side ``patch_fraction`` of the
    glance view's shorter side chosen from the glance model's CAM, kept when its IoU with every kept
    one is below ``iou``."""

    patches: int = 3
    iou: float = 0.3
    patch_fraction: float = 0.7

    def __post_init__(self) -> None:
        if not 1 <= self.patches <= 64:
            raise ConversionError(f"glance and focus takes 1 to 64 patches, got {self.patches}")
        if not (0 < self.iou <= 1 and 0 < self.patch_fraction <= 1):
            raise ConversionError(f"iou and patch_fraction must lie in (0, 1], got {self.iou}, {self.patch_fraction}")


@dataclass(frozen=True)
class ConversionRequest:
    """Everything a conversion needs, checked when it is made (see the module docstring).

    What is converted, exactly one of: ``model`` with ``exits`` (an early exit; ``exits`` may be
    ``auto:N``, or empty with ``new_classes``), ``stages`` (a cascade, cheapest first; with
    ``focus``, glance and focus) or ``search``. ``data``: labelled images; heads train on
    ``1 - calibration_fraction`` of them and thresholds are picked on the rest unless
    ``calibration_data`` is given (cascades calibrate on all of it); ``max_head_images`` and
    ``max_calibration_images`` cap either. ``score`` and ``combine``: the exit rule; ``head``:
    exit-head training; ``steps``: glance and focus; ``input``: preprocessing; ``build``: formats,
    INT8 and the calibration goal (:class:`~stagewise.converters.options.BuildOptions`);
    ``adaptation``: how stages are adapted to their size. ``name`` defaults to ``out``'s stem;
    ``cache`` keeps extracted features; ``device`` is where torch work runs.
    """

    out: Path
    data: Path
    model: StageSource | None = None
    stages: tuple[StageSource, ...] = ()
    focus: StageSource | None = None
    search: CascadeSearch | None = None
    exits: tuple[str, ...] = ()
    new_classes: bool = False
    calibration_data: Path | None = None
    calibration_fraction: float = 0.2
    max_head_images: int | None = None
    max_calibration_images: int | None = None
    name: str | None = None
    score: str = "max_softmax"
    combine: str = "own"
    head: HeadTraining = HeadTraining()
    steps: FocusSteps = FocusSteps()
    input: InputSpec = InputSpec()
    build: BuildOptions = BuildOptions()
    adaptation: Adaptation = Adaptation()
    cache: Path | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        """Check the request against the names there are, before any model or image is opened."""
        given = [what for what, there in (("a model", self.model is not None), ("stages", bool(self.stages)),
                                          ("a search", self.search is not None)) if there]
        if len(given) != 1:
            raise ConversionError("give one of: a MODEL with --exits (early exit), --stage twice or more (cascade; "
                                  "with --focus, glance and focus), --search MODEL,MODEL,... or a .toml config"
                                  + (f"; got {' and '.join(given)}" if given else ""))
        kind = self.kind
        if kind == "early_exit" and not (self.exits or self.new_classes):
            raise ConversionError("an early-exit conversion needs --exits (cut points, comma-separated; "
                                  "`stagewise cuts MODEL` lists them)")
        if self.focus is not None and len(self.stages) != 1:
            raise ConversionError("a glance-and-focus conversion needs one glance model (--stage MODEL@SIZE) and one "
                                  "focus model (--focus MODEL@SIZE)")
        if self.new_classes and kind != "early_exit":
            raise ConversionError("--new-classes builds an early-exit bundle from one model (MODEL, with or without "
                                  "--exits); cascades, searches and glance-and-focus keep their models' classes")
        if self.exits and kind != "early_exit":
            raise ConversionError("--exits belong to an early exit (one MODEL); cascade stages exit after each stage")
        check_device_name(self.device)
        for what, value, names in (("exit score", self.score, SCORES), ("combine mode", self.combine, COMBINES),
                                   *(("artifact format", f, EXPORTERS) for f in self.build.formats)):
            if value not in names:
                raise ConversionError(unknown_choice(what, value, names))
        from .build import primary_runtime

        primary_runtime(self.build.formats)
        if not 0 < self.calibration_fraction < 1:
            raise ConversionError(f"the calibration fraction must lie in (0, 1), got {self.calibration_fraction}")
        for what, cap in (("--max-head-images", self.max_head_images),
                          ("--max-calibration-images", self.max_calibration_images)):
            if cap is not None and cap < 1:
                raise ConversionError(f"{what} must be at least 1, got {cap}")

    @property
    def kind(self) -> str:
        """What is converted, one of :data:`KINDS`: decided here only, from which source is given."""
        if self.search is not None:
            return "search"
        if self.stages:
            return "glance_focus" if self.focus is not None else "cascade"
        return "early_exit"

    @property
    def sources(self) -> tuple[StageSource, ...]:
        """The source models: the early exit's one model, the cascade's stages or the search's candidates."""
        if self.search is not None:
            return tuple(StageSource(m) for m in self.search.models)
        return self.stages or (self.model,)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "ConversionRequest":
        """The request for ``options``, named and in the units of :func:`stagewise.converters.convert`'s keywords
        (``None``: the default). Lists may be given as comma-separated strings, as the flags write them."""
        options = {k: v for k, v in options.items() if v is not None}
        for key in options:
            if key not in OPTIONS and key not in SOURCE_OPTIONS:
                raise ConversionError(unknown_choice("conversion option", key, [*SOURCE_OPTIONS, *OPTIONS]))
        if "out" not in options:
            raise ConversionError("say where to write the bundle with --out (a directory, or a file ending in .swb)")
        if "data" not in options:
            raise ConversionError("conversion needs labelled images: pass --data (class folders, archive or labels.tsv)")
        groups: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for key, value in options.items():
            if key in OPTIONS:
                option = OPTIONS[key]
                try:
                    groups[option.group][option.field] = option.parse(value)
                except (TypeError, ValueError) as exc:
                    raise ConversionError(f"option {key}: cannot read {value!r} ({exc})") from None
        head = options.get("head")
        if isinstance(head, HeadTraining):
            del groups["head"]["kind"]
        else:
            head = HeadTraining()
        values = groups.pop("request")
        tuning = replace(head.tuning, **groups.pop("tuning"))
        values["head"] = replace(head, **groups.pop("head"), tuning=tuning)
        values.update({group: GROUPS[group](**items) for group, items in groups.items()})
        values.update(_sources(options))
        return cls(**values)


def _sources(options: Mapping[str, Any]) -> dict[str, Any]:
    """The request's source fields for the source options (:data:`SOURCE_OPTIONS`)."""
    adapt = options.get("adapt")
    search = options.get("search")
    if isinstance(search, (str, list, tuple)):
        given = {k: v for k, v in (("sizes", _numbers("--sizes", kind=int)(options.get("sizes", ()))),
                                   ("max_stages", options.get("max_stages")), ("adapt", adapt),
                                   ("combines", (options["combine"],) if "combine" in options else None))
                 if v is not None}
        search = CascadeSearch(models=_strings(search), **given)
    elif "sizes" in options or "max_stages" in options:
        raise ConversionError("--sizes and --max-stages belong to a cascade search (--search MODEL,MODEL,...)")
    stages = tuple(stage_source(s, adapt) for s in options.get("stages", ()))
    if adapt is not None and not stages and search is None:
        raise ConversionError("--adapt adapts cascade stages (--stage) or search candidates (--search)")
    model = options.get("model")
    return {"model": None if model is None else model if isinstance(model, StageSource) else StageSource(model),
            "stages": stages, "search": search,
            "focus": None if options.get("focus") is None else stage_source(options["focus"])}


def _strings(value: str | Sequence[Any]) -> tuple[str, ...]:
    """A comma-separated string or a sequence, as a tuple of non-empty stripped strings."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(v).strip() for v in items if str(v).strip())


def _numbers(what: str, count: int | None = None, kind: type = float) -> Callable[[Any], tuple[Any, ...]]:
    """A reader of comma-separated numbers (a string or a sequence) of type ``kind``, ``count`` of them if given."""
    def parse(value: str | Sequence[Any]) -> tuple[Any, ...]:
        try:
            numbers = tuple(kind(v) for v in _strings(value))
        except ValueError:
            raise ConversionError(f"{what}: give comma-separated numbers, got {value!r}") from None
        if count is not None and len(numbers) != count:
            raise ConversionError(f"{what}: give {count} comma-separated numbers (R,G,B), got {value!r}")
        return numbers
    return parse


def _points(value: float) -> float:
    return float(value) / 100


@dataclass(frozen=True)
class Option:
    """One option of a conversion request: where its value goes (``group``'s ``field``), how it is read
    (``parse``) and, for the help, what it means when not given (``shown``: the field default in the
    option's units, read from ``default_of``'s field of that name)."""

    group: str
    field: str
    parse: Callable[[Any], Any] = lambda value: value
    scale: float = 1.0
    default_of: type | None = None


#: The request's groups: the dataclass each option group builds (``request``: the request's own fields).
GROUPS: dict[str, Callable[[], Any]] = {"request": dict, "build": BuildOptions, "head": HeadTraining,
                                        "tuning": FineTuning, "steps": FocusSteps, "input": InputSpec}
#: Options that say what is converted (read by :func:`_sources`; ``adapt``, ``sizes`` and ``max_stages``
#: go with stages or a search).
SOURCE_OPTIONS = ("model", "stages", "focus", "search", "adapt", "sizes", "max_stages")
OPTIONS: dict[str, Option] = {
    "out": Option("request", "out", Path), "data": Option("request", "data", Path),
    "calibration_data": Option("request", "calibration_data", Path), "cache": Option("request", "cache", Path),
    "name": Option("request", "name"), "device": Option("request", "device"),
    "exits": Option("request", "exits", _strings), "new_classes": Option("request", "new_classes", bool),
    "max_head_images": Option("request", "max_head_images", int),
    "max_calibration_images": Option("request", "max_calibration_images", int),
    "score": Option("request", "score"), "combine": Option("request", "combine"),
    "formats": Option("build", "formats", _strings), "int8": Option("build", "int8", bool),
    "int8_max_drop": Option("build", "int8_max_drop", _points, 100.0),
    "int8_tolerance": Option("build", "int8_tolerance", float),
    "int8_search_seconds": Option("build", "int8_search_seconds", float),
    "int8_mixed": Option("build", "int8_mixed", bool), "int8_min_speedup": Option("build", "int8_min_speedup", float),
    "agreement_images": Option("build", "agreement_images", int),
    "target_drop": Option("build", "default_drop", _points, 100.0),
    "threads": Option("build", "threads", int), "force": Option("build", "overwrite", bool),
    "fp16": Option("build", "fp16", bool), "npu": Option("build", "npu", bool), "int8_io": Option("build", "int8_io", bool),
    "head": Option("head", "kind"), "train_exits": Option("head", "mode"), "head_width": Option("head", "width", int),
    "epochs": Option("tuning", "epochs", int), "lr": Option("tuning", "lr", float),
    "head_lr": Option("tuning", "head_lr", float), "freeze": Option("tuning", "freeze", lambda v: ",".join(_strings(v))),
    "exit_weights": Option("tuning", "exit_weights", _numbers("--exit-weights")),
    "augment": Option("tuning", "augment"),
    "patches": Option("steps", "patches", int), "iou": Option("steps", "iou", float),
    "patch_fraction": Option("steps", "patch_fraction", float),
    "input_size": Option("input", "size", int), "mean": Option("input", "mean", _numbers("--mean", 3)),
    "std": Option("input", "std", _numbers("--std", 3)), "resize": Option("input", "resize", default_of=Preprocess),
    "crop_fraction": Option("input", "crop_fraction", float, default_of=Preprocess),
    "resizer": Option("input", "resizer", default_of=Preprocess),
    "interpolation": Option("input", "interpolation", default_of=Preprocess),
}
"""Every option besides :data:`SOURCE_OPTIONS`, by name."""


def option_default(name: str) -> Any:
    """What option ``name`` means when it is not given, in the option's units (e.g. points of top-1):
    the default of the dataclass field it sets (for the input options, :class:`~stagewise.images.Preprocess`'s,
    where the model declares nothing). The CLI help shows it."""
    if name in ("sizes", "max_stages"):
        owner, attr, scale = CascadeSearch, name, 1.0
    elif name == "adapt":
        owner, attr, scale = StageSource, "adapt", 1.0
    elif name in SOURCE_OPTIONS:
        return None
    else:
        option = OPTIONS[name]
        owner = option.default_of or {"request": ConversionRequest}.get(option.group) or GROUPS[option.group]
        attr, scale = option.field, option.scale
    spec = next(f for f in fields(owner) if f.name == attr)
    if spec.default is MISSING:  # a required field (out, data): no default
        return None
    value = spec.default
    return round(value * scale, 12) if isinstance(value, float) else value


#: TOML tables and the option each of their keys sets (``""``: the top level).
TOML_KEYS: dict[str, dict[str, str]] = {
    "": {k: k for k in ("name", "out", "data", "calibration_data", "cache", "device", "exits", "new_classes",
                        "max_head_images", "max_calibration_images", "input_size")},
    "exit": {"score": "score", "combine": "combine", "head": "head"},
    "build": {"format": "formats", "backend": "formats", **{k: k for k in (
        "int8", "target_drop", "threads", "fp16", "npu", "int8_io", "int8_max_drop", "int8_tolerance", "int8_mixed",
        "int8_search_seconds", "int8_min_speedup", "agreement_images", "force")}},
    "training": {"mode": "train_exits", **{k: k for k in ("head_width", "epochs", "lr", "head_lr", "freeze",
                                                          "exit_weights", "augment")}},
    "input": {k: k for k in ("mean", "std", "resize", "crop_fraction", "interpolation", "resizer")},
    "focus": {k: k for k in ("patches", "iou", "patch_fraction")},
}
_TOML_PATHS = ("out", "data", "calibration_data", "cache")
_TOML_TABLES = ("kind", "model", "size", "stages", "search", "focus", "input", "exit", "build", "training")


def options_from_toml(path: Path) -> dict[str, Any]:
    """The options a TOML conversion config names (see the module docstring), paths resolved against its folder."""
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConversionError(f"cannot read config {path}: {exc}") from exc
    options: dict[str, Any] = {}

    def read(table: str, values: Mapping[str, Any], skip: Sequence[str] = ()) -> None:
        keys = TOML_KEYS[table]
        for key, value in values.items():
            if key in skip:
                continue
            if key not in keys:
                where = f"[{table}]" if table else "the top level"
                raise ConversionError(f"{path}: " + unknown_choice(f"key at {where}", key, [*keys, *skip]))
            options[keys[key]] = path.parent / value if keys[key] in _TOML_PATHS else value

    read("", cfg, _TOML_TABLES)
    for table in ("exit", "build", "training", "input"):
        read(table, cfg.get(table, {}))
    read("focus", cfg.get("focus", {}), ("model", "size"))
    if "model" in cfg:
        options["model"] = StageSource(cfg["model"], cfg.get("size"))
    if "model" in cfg.get("focus", {}):
        options["focus"] = StageSource(cfg["focus"]["model"], cfg["focus"].get("size"))
    if "stages" in cfg:
        try:
            options["stages"] = [StageSource(s["model"], s.get("size"), s.get("name"), s.get("adapt", "none"))
                                 for s in cfg["stages"]]
        except (KeyError, TypeError) as exc:
            raise ConversionError(f"{path}: every [[stages]] table takes model and optionally size, name and adapt "
                                  f"({exc!r})") from exc
    if "search" in cfg:
        table = dict(cfg["search"])
        if "combine" in table:
            table["combines"] = table.pop("combine")
        try:
            options["search"] = CascadeSearch(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
        except TypeError as exc:
            raise ConversionError(f"{path}: [search] takes models, sizes, adapt, max_stages, combine and "
                                  f"timing_images ({exc})") from exc
    if "kind" in cfg:
        options["kind"] = cfg["kind"]
    return options


def request_from_toml(path: Path, overrides: Mapping[str, Any] | None = None) -> ConversionRequest:
    """The request a TOML conversion config describes; ``overrides`` (options, e.g. flags; ``None``
    and empty values ignored) win over the file."""
    options = options_from_toml(path)
    kind = options.pop("kind", None)
    options.update({k: v for k, v in (overrides or {}).items() if v is not None and v != () and v != []})
    request = ConversionRequest.from_options(options)
    if kind is not None and kind != request.kind:
        if kind not in KINDS:
            raise ConversionError(f"{path}: " + unknown_choice("conversion kind", kind, KINDS))
        raise ConversionError(f"{path}: kind = {kind!r}, but the tables describe a {request.kind} conversion "
                              "(model: early_exit; [[stages]]: cascade, with [focus]: glance_focus; [search]: search)")
    return request
