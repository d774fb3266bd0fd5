"""Opening a bundle on a runtime: :func:`load` returns a ready :class:`~stagewise.runtimes.cascade.Cascade`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from stagewise.bundle import read_bundle
from stagewise.checks import positive_count, positive_number
from stagewise.deprecation import renamed_keywords
from stagewise.errors import DeviceUnavailableError, InvalidOptionError

from .base import LoadOptions, StageSession, resolve_runtime, stage_io
from .cascade import Cascade, sums_probabilities
from .model_io import check_stages
from .options import RuntimeOptions


@renamed_keywords(backend="runtime")
def load(path: str | Path, runtime: str = "auto", device: str = "CPU", threads: int | None = None,
         prefer: Sequence[str] | None = None, warmup: bool = True,
         options: RuntimeOptions | Mapping[str, Any] | None = None, mean_budget_ms: float | None = None,
         profile: str | None = None, latency: dict | None = None,
         trusted_keys: Sequence[Any] | None = None, require_device: bool = False) -> Cascade:
    """Open a bundle (directory or ``.swb``) on a runtime and return a ready :class:`Cascade`.

    ``runtime`` is ``"onnxruntime"``, ``"openvino"``, ``"litert"`` or ``"auto"`` (the first
    of ``prefer`` that is installed and that the bundle carries artifacts for; ``prefer`` defaults to
    ``$STAGEWISE_PREFER`` or onnxruntime, openvino, litert) or a comma-separated preference list such
    as ``"openvino,onnxruntime"``. ``device`` is the runtime's device (OpenVINO: CPU, GPU, NPU, AUTO). ``threads`` sets
    the runtime's intra-op threads; ``options`` are the runtime's own settings, its options dataclass
    (:mod:`stagewise.runtimes.options`) or a dict of them: an unknown key raises
    :class:`~stagewise.errors.UnknownOptionError` listing the valid ones.
    ``mean_budget_ms`` starts the average-budget mode (see :meth:`Cascade.set_mean_budget`);
    ``profile`` names the device profile that seeds the latency model (default: the one for
    this runtime, device and thread count); ``latency`` passes :class:`LatencyModel` options.
    ``trusted_keys``: Ed25519 public keys (PEM files or bytes); the bundle must be signed by one
    of them (see :func:`stagewise.bundle.read_bundle`).
    ``require_device``: raise :class:`~stagewise.errors.DeviceUnavailableError` when a stage does not
    really run on ``device`` (a runtime that fell back to the CPU: an ONNX Runtime session without
    the asked execution provider, an OpenVINO AUTO/HETERO device that compiled for the CPU) instead
    of running there; what each stage ran on is in :attr:`Cascade.ran_on` and every trace.
    ``backend=`` is the deprecated name of ``runtime=``.
    """
    if threads is not None:
        threads = positive_count("threads", threads)
    if mean_budget_ms is not None:
        positive_number("mean_budget_ms", mean_budget_ms)
    bundle = read_bundle(path, trusted_keys=trusted_keys)
    sessions: list[StageSession] = []
    try:
        chosen = resolve_runtime(runtime, bundle.formats(), prefer)
        settings = chosen.options.from_mapping(options)
        load_options = LoadOptions(threads=threads, device=device, runtime_options=settings)
        opener = chosen.opener()
        decide = not sums_probabilities(bundle.manifest)
        for k, spec in enumerate(bundle.manifest.stages):
            key = spec.artifacts[chosen.artifact_format].files[0].sha256  # the bundle verified it: no second hash
            session = opener(bundle.artifact_paths(k, chosen.artifact_format),
                             stage_io(spec, chosen.artifact_format, decide), replace(load_options, content_key=key))
            if not isinstance(session, StageSession):
                raise InvalidOptionError(f"runtime {chosen.name!r} opened stage {spec.name} as a "
                                         f"{type(session).__name__}, not a stagewise.runtimes.StageSession: derive the "
                                         "runtime's session class from StageSession (its defaults cover what it lacks)")
            sessions.append(session)
        check_stages(bundle.manifest, sessions)
        if require_device:
            check_devices(chosen.name, device, bundle.manifest.stage_names, sessions)
        cascade = Cascade(bundle, sessions, chosen.name, threads, device, mean_budget_ms=mean_budget_ms,
                          latency=latency, profile=profile)
    except BaseException:
        for session in sessions:
            session.close()
        bundle.close()
        raise
    if warmup:
        cascade.warm_up()
    return cascade


def check_devices(runtime: str, device: str, names: Sequence[str], sessions: Sequence[StageSession]) -> None:
    """Raise :class:`DeviceUnavailableError` unless every stage's session runs on ``device`` (its
    ``device_problem(device)``; a session that cannot tell where it runs counts as not running there)."""
    problems = []
    for name, session in zip(names, sessions):
        problem = session.device_problem(device)
        if problem:
            problems.append(f"stage {name}: {problem}")
    if problems:
        raise DeviceUnavailableError(
            f"the bundle does not run on device {device!r} as required: {'; '.join(problems)}. Install the "
            f"device's driver or runtime build, pick another device, or load without require_device "
            "(--require-device) to accept the fallback")
