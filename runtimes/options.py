"""Typed per-runtime options: what ``stagewise.load(..., options=...)`` may set for each runtime.

Each runtime has one frozen dataclass of its own settings. ``options`` may be that dataclass or
a plain dict, converted by :meth:`RuntimeOptions.from_mapping`; a key the runtime does not know
raises :class:`~stagewise.errors.UnknownOptionError` listing the valid ones. The adapters
document what every option does; nothing here imports a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, TypeVar

from stagewise.errors import InvalidOptionError, UnknownOptionError

T = TypeVar("T", bound="RuntimeOptions")


def _frozen_mapping(name: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidOptionError(f"option {name} must be a dict, got {type(value).__name__}")
    return MappingProxyType(dict(value))


def _check(options: "RuntimeOptions", name: str, kinds: tuple[type, ...], what: str) -> None:
    """Raise :class:`InvalidOptionError` unless option ``name`` is an instance of ``kinds`` (``what`` in words)."""
    value = getattr(options, name)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InvalidOptionError(f"{options.runtime} option {name} must be {what}, got {value!r:.60}")


_CACHE_DIR = ((str, Path, bool, type(None)), "a folder path, None (the default folder) or False (no cache)")


@dataclass(frozen=True)
class RuntimeOptions:
    """Options of a runtime that has none of its own (the base of every runtime's options)."""

    runtime: ClassVar[str] = "this runtime"

    @classmethod
    def names(cls) -> list[str]:
        """The option names this runtime accepts."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls: type[T], options: "RuntimeOptions | Mapping[str, Any] | None") -> T:
        """``options`` as this runtime's options: ``None`` gives the defaults, a dict is checked key by key."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, (RuntimeOptions, Mapping)):
            raise InvalidOptionError(f"options must be {cls.__name__}(...) or a dict of: {', '.join(cls.names())}; "
                                     f"got {type(options).__name__}")
        if isinstance(options, RuntimeOptions):
            raise UnknownOptionError(
                f"{type(options).__name__} holds options of {options.runtime}, but the bundle is loaded on "
                f"{cls.runtime}; pass {cls.__name__}(...) or a dict of: {', '.join(cls.names()) or 'no options'}")
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise UnknownOptionError(
                f"unknown {cls.runtime} option(s) {', '.join(map(repr, unknown))}; valid options: "
                f"{', '.join(cls.names()) or 'none'}")
        return cls(**options)


@dataclass(frozen=True)
class OnnxRuntimeOptions(RuntimeOptions):
    """ONNX Runtime: execution ``providers`` in order, ``session_config`` entries
    (``SessionOptions.add_session_config_entry``) and ``cache_dir``, where optimized models are
    kept so a later load skips graph optimization (``None``: the default cache directory,
    ``False`` or ``""``: no cache)."""

    runtime: ClassVar[str] = "onnxruntime"
    providers: tuple[Any, ...] = ("CPUExecutionProvider",)
    session_config: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: str | Path | bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.providers, str):
            object.__setattr__(self, "providers", (self.providers,))
        _check(self, "providers", (tuple, list), "a list of execution provider names")
        object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "session_config", _frozen_mapping("session_config", self.session_config))
        _check(self, "cache_dir", *_CACHE_DIR)


@dataclass(frozen=True)
class OpenVinoOptions(RuntimeOptions):
    """OpenVINO: see :mod:`stagewise.runtimes.openvino_adapter` for what each option does.

    ``cache_dir`` ``None`` uses the default cache directory, ``False`` or ``""`` turns caching
    off; ``static_shapes`` ``None`` decides by device (static only for NPU); ``config`` holds
    extra ``compile_model`` properties, which win over the defaults.
    """

    runtime: ClassVar[str] = "openvino"
    inference_precision: str = "f32"
    cpu_pinning: bool = False
    cache_dir: str | Path | bool | None = None
    static_shapes: bool | None = None
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self, "inference_precision", (str,), "a precision name such as 'f32'")
        _check(self, "cpu_pinning", (bool,), "True or False")
        _check(self, "cache_dir", *_CACHE_DIR)
        _check(self, "static_shapes", (bool, type(None)), "True, False or None (decided by device)")
        object.__setattr__(self, "config", _frozen_mapping("config", self.config))


@dataclass(frozen=True)
class LiteRTOptions(RuntimeOptions):
    """LiteRT: see :mod:`stagewise.runtimes.litert_adapter` for what each option does.

    ``delegates`` ``None`` uses ``$STAGEWISE_LITERT_DELEGATES``; one library path (or one
    ``{"library": ..., "options": ...}`` record) may be given without a list.
    """

    runtime: ClassVar[str] = "litert"
    xnnpack: bool = True
    delegates: tuple[Any, ...] | None = None
    batch: str = "auto"

    def __post_init__(self) -> None:
        _check(self, "xnnpack", (bool,), "True or False")
        _check(self, "batch", (str,), "a batch mode name such as 'auto'")
        if isinstance(self.delegates, (str, Path, Mapping)):
            object.__setattr__(self, "delegates", (self.delegates,))
        elif self.delegates is not None:
            _check(self, "delegates", (tuple, list), "a delegate library path, record, or a list of them")
            object.__setattr__(self, "delegates", tuple(self.delegates))
