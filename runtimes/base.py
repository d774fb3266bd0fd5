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

from stagewise.errors import BackendUnavailableError, InvalidOptionError, MissingExtraError, unknown_choice
from stagewise.formats import format_named
from stagewise.exits import GRAPH_SCORES
from stagewise.manifest import StageSpec

from .options import LiteRTOptions, OnnxRuntimeOptions, OpenVinoOptions, RuntimeOptions

T = TypeVar("T", bound=RuntimeOptions)


class StageSession:
    """One loaded stage, as a runtime adapter opens it: the base class of every session, whose defaults are what a
    session without the capability does (a test double overrides ``run`` alone).

    * ``run(tensor)``: the stage input batch in, the outputs by tensor name;
    * ``cancellable`` and ``run_within(tensor, timeout_s)``: a run stopped at the timeout, raising
      :class:`~stagewise.errors.DeadlineExceededError` (ONNX Runtime and OpenVINO; LiteRT cannot cancel a run);
    * ``runner()``: a :class:`StageRunner` for one request at a time (default: :class:`SessionRunner`);
    * ``decides``: the session outputs the stage's exit decision (:class:`GraphDecision`) computed in its graph;
    * ``ran_on``: where the runtime really runs the stage (execution provider, device or delegate), or ``None``;
    * ``device_problem(device)``: why the stage does not run on ``device``, or ``None``;
    * ``declared()``: what the model declares (:class:`~stagewise.runtimes.model_io.DeclaredIO`), or ``None``
      when the session cannot tell (then the manifest is not checked against the model);
    * ``close()``: release the runtime's session (idempotent).
    """

    cancellable: bool = False
    decides: bool = False
    ran_on: str | None = None

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} must implement run(tensor)")

    def run_within(self, tensor: np.ndarray, timeout_s: float) -> dict[str, np.ndarray]:
        raise InvalidOptionError(f"{type(self).__name__} cannot cancel a run (cancellable is False); run it without "
                                 "a timeout")

    def runner(self) -> StageRunner:
        return SessionRunner(self)

    def device_problem(self, device: str) -> str | None:
        return f"{type(self).__name__} does not report where it runs"

    def declared(self) -> Any:
        return None

    def close(self) -> None:
        return None


class StageRunner(Protocol):
    """A stage's run for one request at a time, with its own buffers and its own cancellation.

    ``run(tensor, timeout_s)`` returns the outputs by name as arrays that stay valid until this
    runner's next run (they may be the runtime's own output buffers: no copy); an output array of
    one stage passed as the next stage's input is handed over without a copy where the runtime
    allows it. With ``timeout_s`` (on a cancellable runtime) the run is stopped after that many
    seconds, raising :class:`~stagewise.errors.DeadlineExceededError`, and no other run is.
    """

    def run(self, tensor: np.ndarray, timeout_s: float | None = None) -> Mapping[str, np.ndarray]: ...

    def close(self) -> None: ...


class SessionRunner:
    """The runner of a session without one of its own (a test double): its ``run``, or its
    ``run_within`` under a timeout when it is cancellable."""

    def __init__(self, session: StageSession):
        self._run = session.run
        self._within = session.run_within if session.cancellable else None

    def run(self, tensor: np.ndarray, timeout_s: float | None = None) -> Mapping[str, np.ndarray]:
        if timeout_s is None or self._within is None:
            return self._run(tensor)
        return self._within(tensor, timeout_s)

    def close(self) -> None:
        self._run = self._within = None


def runner_for(session: StageSession) -> StageRunner:
    """A new :class:`StageRunner` on ``session``."""
    return session.runner()


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


DECISION_OUTPUTS = ("exit_score", "exit_label")
"""The names of the exit score (N x 1, float32) and answer (N x 1, int64) outputs a graph decision has."""
INVERSE_TEMPERATURE = "exit_inverse_temperature"
"""The graph input an exported decision reads 1 / temperature from (1 float32 value)."""


@dataclass(frozen=True)
class GraphDecision:
    """A stage's exit decision computed in its graph: exit score ``score`` of the stage's own probabilities at
    ``1 / inverse_temperature`` (``output``, N x 1) and their argmax (``label``). ``exported``: the artifact's
    graph has these outputs (its manifest ``decision`` record) and reads the inverse temperature from the input
    ``temperature_input``; otherwise a runtime that can extend a graph at load time (OpenVINO) adds them, with the
    inverse temperature as a constant, and one that cannot leaves the scoring to the executor."""

    score: str
    inverse_temperature: float
    output: str = DECISION_OUTPUTS[0]
    label: str = DECISION_OUTPUTS[1]
    exported: bool = False
    temperature_input: str | None = None


@dataclass(frozen=True)
class StageIO:
    """Tensor names of one stage as recorded in the manifest: its input, its outputs (the decision outputs not
    included), the exit decision the executor asks its graph for (``None``: none) and the graph's other inputs
    with the values to feed them (``feeds``: the inverse temperature an exported decision reads)."""

    input: str
    outputs: tuple[str, ...]
    decision: GraphDecision | None = None
    feeds: tuple[tuple[str, np.ndarray], ...] = ()


def stage_io(spec: StageSpec, artifact_format: str | None = None, decide: bool = True) -> StageIO:
    """The tensor names of a manifest stage, as its ``artifact_format`` artifact has them. With ``decide`` (the
    executor reads each stage's exit decision alone: no stage of the bundle combines probabilities or has a
    learned score) and an exit score the graph can compute, the stage asks for its :class:`GraphDecision`."""
    artifact = spec.artifacts.get(artifact_format) if artifact_format else None
    record = artifact.decision if artifact is not None else None
    inverse = 1.0 / spec.exit.temperature
    feeds = ()
    if record is not None and record.get("inverse_temperature"):  # the graph reads it whether the executor uses it or not
        feeds = ((record["inverse_temperature"], np.array([inverse], np.float32)),)
    decision = None
    if decide and spec.exit.score in GRAPH_SCORES and spec.exit.combine == "own":
        if record is not None and record["score"] == spec.exit.score:
            decision = GraphDecision(spec.exit.score, inverse, record["output"], record["label"], True,
                                     record.get("inverse_temperature"))
        else:
            decision = GraphDecision(spec.exit.score, inverse)
    return StageIO(spec.input.tensor, spec.outputs.names(), decision, feeds)


Opener = Callable[[Sequence[Path], StageIO, LoadOptions], StageSession]


@dataclass(frozen=True)
class Runtime:
    """A registered runtime: its ``name``, the artifact format it reads (a registered
    :class:`~stagewise.formats.Format`'s name), and how to open a stage: ``module``'s
    ``open_stage`` (an :data:`Opener`), imported on first use, once ``package`` (or one of
    ``alternatives``) is installed (``install_hint`` says how)."""

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


RUNTIMES: dict[str, Runtime] = {}
"""The registered runtimes by name (:func:`register_runtime` adds one)."""


def register_runtime(runtime: Runtime) -> Runtime:
    """Add ``runtime`` (or replace the runtime of the same name); returns it. Its format must be registered
    (:func:`stagewise.formats.register_format`)."""
    format_named(runtime.artifact_format)
    RUNTIMES[runtime.name] = runtime
    return runtime


register_runtime(Runtime("onnxruntime", "onnx", "stagewise.runtimes.onnxruntime_adapter", "onnxruntime",
                         'pip install "stagewise[onnxruntime]"', options=OnnxRuntimeOptions))
register_runtime(Runtime("openvino", "openvino", "stagewise.runtimes.openvino_adapter", "openvino",
                         'pip install "stagewise[openvino]"', options=OpenVinoOptions))
register_runtime(Runtime("litert", "tflite", "stagewise.runtimes.litert_adapter", "ai_edge_litert",
                         'pip install "stagewise[litert]"', alternatives=("tflite_runtime",), options=LiteRTOptions))

DEFAULT_PREFERENCE = ("onnxruntime", "openvino", "litert")


def runtimes_for(artifact_format: str) -> list[Runtime]:
    """The registered runtimes that run ``artifact_format``, in registration order."""
    return [r for r in RUNTIMES.values() if r.artifact_format == artifact_format]


def preference() -> tuple[str, ...]:
    """The order ``"auto"`` tries runtimes in: ``$STAGEWISE_PREFER`` (comma-separated), else the default
    followed by every other registered runtime in registration order."""
    env = os.environ.get("STAGEWISE_PREFER", "").strip()
    if env:
        return tuple(n.strip() for n in env.split(",") if n.strip())
    return (*DEFAULT_PREFERENCE, *(n for n in RUNTIMES if n not in DEFAULT_PREFERENCE))


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
                f"(it carries: {', '.join(formats) or 'none'}); reconvert with --format {runtime.artifact_format} "
                f"or load it with a runtime that runs what it carries: "
                f"{', '.join(r.name for f in formats for r in runtimes_for(f)) or 'none is registered'}")
        return runtime
    candidates = [RUNTIMES[n] for n in prefer if n in RUNTIMES and RUNTIMES[n].artifact_format in formats]
    for runtime in candidates:
        if runtime.installed():
            return runtime
    hints = "; ".join(f"{r.name}: {r.install_hint}" for r in candidates) or "none match its formats"
    raise BackendUnavailableError(
        f"no installed runtime can run this bundle (it carries: {', '.join(formats)}); install one: {hints}")
