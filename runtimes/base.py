"""The backend adapter interface and the registry of runtimes.

A runtime turns one stage's artifact files into a :class:`StageSession` that maps one input
tensor to named output tensors. Adapters import their backend lazily, so importing this
module costs nothing and a missing backend is reported only when it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeVar

import numpy as np

from stagewise.errors import BackendUnavailableError, MissingExtraError, unknown_choice

from .options import LiteRTOptions, OnnxRuntimeOptions, OpenVinoOptions, RuntimeOptions

T = TypeVar("T", bound=RuntimeOptions)


class StageSession(Protocol):
    """One loaded stage: ``run`` takes the stage input batch, returns outputs by tensor name.

    A session that can be stopped mid-run also has ``run_within(tensor, timeout_s)``, which
    raises :class:`~stagewise.errors.DeadlineExceededError` when the run was cancelled at the
    timeout (ONNX Runtime and OpenVINO have it; LiteRT cannot cancel a run).
    """

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class LoadOptions:
    """How to open a stage: intra-op ``threads``, the runtime's ``device``, and ``runtime_options``.

    ``runtime_options`` is the runtime's own options (e.g. :class:`~stagewise.runtimes.options.OpenVinoOptions`)
    or a dict of them, checked by :meth:`options_for`; ``extra`` is accepted as its former name.
    ``content_key`` identifies the stage's model content (the bundle's recorded sha256 of its
    main file): runtimes key their model caches by it instead of hashing the file again.
    """

    threads: int | None = None
    device: str = "CPU"
    runtime_options: RuntimeOptions | Mapping[str, Any] | None = None
    extra: InitVar[Mapping[str, Any] | None] = None
    content_key: str | None = None

    def __post_init__(self, extra: Mapping[str, Any] | None) -> None:
        if extra is not None:
            if self.runtime_options is not None:
                raise TypeError("LoadOptions takes runtime_options or its former name extra, not both")
            object.__setattr__(self, "runtime_options", extra)

    def options_for(self, kind: type[T]) -> T:
        """The runtime options as ``kind`` (a dict is converted; an unknown key raises ``UnknownOptionError``)."""
        return kind.from_mapping(self.runtime_options)


@dataclass(frozen=True)
class StageIO:
    """Tensor names of one stage as recorded in the manifest."""

    input: str
    outputs: tuple[str, ...]


def model_cache(setting: str | Path | bool | None, runtime: str) -> Path | None:
    """The directory where ``runtime`` caches prepared models, created; ``None`` when caching is off.

    ``setting`` is the runtime's ``cache_dir`` option: ``None`` gives ``$STAGEWISE_CACHE_DIR/<runtime>``
    or ``~/.cache/stagewise/<runtime>``, ``False``/``""`` no cache. An unwritable directory turns
    the cache off (it only costs load time; a load never fails over it).
    """
    if setting is None:
        root = os.environ.get("STAGEWISE_CACHE_DIR")
        base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stagewise"
        setting = base / runtime
    if not setting:
        return None
    try:
        Path(setting).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return Path(setting)


Opener = Callable[[Sequence[Path], StageIO, LoadOptions], StageSession]


@dataclass(frozen=True)
class Runtime:
    """A registered runtime: its name, the artifact format it reads, and how to open a stage."""

    name: str
    artifact_format: str
    module: str
    package: str
    install_hint: str
    alternatives: tuple[str, ...] = ()  # other packages that provide the same runtime (e.g. tflite_runtime)
    options: type[RuntimeOptions] = RuntimeOptions  # the runtime's own load options

    def installed(self) -> bool:
        for package in (self.package, *self.alternatives):
            try:
                if importlib.util.find_spec(package) is not None:
                    return True
            except (ImportError, ValueError):
                pass
        return False

    def opener(self) -> Opener:
        if not self.installed():
            raise MissingExtraError(f"runtime {self.name!r} is not installed; install it with: {self.install_hint}")
        return importlib.import_module(self.module).open_stage


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("onnxruntime", "onnx", "stagewise.runtimes.onnxruntime_adapter", "onnxruntime",
                           'pip install "stagewise[onnxruntime]"', options=OnnxRuntimeOptions),
    "openvino": Runtime("openvino", "openvino", "stagewise.runtimes.openvino_adapter", "openvino",
                        'pip install "stagewise[openvino]"', options=OpenVinoOptions),
    "litert": Runtime("litert", "tflite", "stagewise.runtimes.litert_adapter", "ai_edge_litert",
                      'pip install "stagewise[litert]"', alternatives=("tflite_runtime",), options=LiteRTOptions),
}

DEFAULT_PREFERENCE = ("onnxruntime", "openvino", "litert")


def register_runtime(runtime: Runtime) -> None:
    """Add or replace a runtime (tests use this for a mock backend)."""
    RUNTIMES[runtime.name] = runtime


def preference() -> tuple[str, ...]:
    """The order ``"auto"`` tries runtimes in: ``$STAGEWISE_PREFER`` (comma-separated) or the default."""
    env = os.environ.get("STAGEWISE_PREFER", "").strip()
    return tuple(n.strip() for n in env.split(",") if n.strip()) if env else DEFAULT_PREFERENCE


def resolve_runtime(requested: str, formats: Sequence[str], prefer: Sequence[str] | None = None) -> Runtime:
    """The runtime to use for a bundle carrying artifact ``formats``.

    ``requested`` is a runtime name, ``"auto"`` (the first of ``prefer`` that is installed
    and whose artifact format the bundle carries; ``prefer`` defaults to :func:`preference`),
    or a comma-separated preference list such as ``"openvino,onnxruntime"`` (auto in that order).
    """
    if prefer is None:
        prefer = preference()
    if "," in requested:
        prefer, requested = tuple(n.strip() for n in requested.split(",") if n.strip()), "auto"
    for name in prefer:
        if name not in RUNTIMES:
            raise BackendUnavailableError(unknown_choice("preferred runtime", name, RUNTIMES))
    if requested != "auto":
        if requested not in RUNTIMES:
            raise BackendUnavailableError(unknown_choice("runtime", requested, [*RUNTIMES, "auto"]))
        runtime = RUNTIMES[requested]
        if runtime.artifact_format not in formats:
            raise BackendUnavailableError(
                f"this bundle has no {runtime.artifact_format!r} artifacts for runtime {requested!r} "
                f"(it carries: {', '.join(formats) or 'none'}); reconvert with --backend {runtime.artifact_format} "
                "or load it with a runtime it supports")
        return runtime
    candidates = [RUNTIMES[n] for n in prefer if n in RUNTIMES and RUNTIMES[n].artifact_format in formats]
    for runtime in candidates:
        if runtime.installed():
            return runtime
    hints = "; ".join(f"{r.name}: {r.install_hint}" for r in candidates) or "none match its formats"
    raise BackendUnavailableError(
        f"no installed runtime can run this bundle (it carries: {', '.join(formats)}); install one: {hints}")
