"""The HTTP service of ``stagewise serve``: a Starlette app over a micro-batching worker.

Endpoints (every error is JSON ``{"error": message}`` with a 4xx/5xx status):

* ``POST /v1/classify``: an image body (JPEG, PNG, anything Pillow reads) or a multipart form
  with one file; query parameters ``budget_ms``, ``operating_point``, ``top_k``, ``trace``.
* ``POST /v1/reload``: load the bundle again (or ``{"bundle": path}``, a path inside the
  configured ``reload_dir``; any other path is refused with 403), verify it, switch to it.
* the Open Inference Protocol (KServe v2): ``/v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{name}``, ``/v2/models/{name}/ready``, ``/v2/models/{name}/infer``
  (see :mod:`stagewise.runtimes.serve.kserve`).
* ``GET /metrics``: Prometheus text format (with the drift monitor's ``stagewise_monitor_*`` lines).
* ``GET /v1/monitor``: the drift monitor's report (:mod:`stagewise.runtimes.monitor`).

Memory is bounded per request and in total: an image over ``max_pixels`` is refused with 413
from its header, before it is decoded; at most ``decode_slots`` images are decoded at once, and
the decoded images waiting for an answer hold at most ``max_pixels_in_flight`` pixels (503 with
``Retry-After`` beyond it, like a full queue).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stagewise import __version__, checks
from stagewise.errors import (ImageInputError, ImageTooLargeError, InvalidOptionError, StagewiseError,
                              UnknownOperatingPointError)
from stagewise.images import load_image

from ..executor import Cascade
from ..monitor import DriftMonitor, MonitorSettings
from .batching import Answer, Job, MicroBatcher
from .errors import (ForbiddenError, PayloadTooLargeError, QueueFullError, RequestError, RequestTimeoutError, ServeError,
                     ShuttingDownError)
from .kserve import HEADER, infer_response, model_metadata, parse_infer_request
from .metrics import Metrics
from .model import ModelSlot
from .monitoring import MonitorCollector

log = logging.getLogger("stagewise.serve")


@dataclass(frozen=True)
class ServeConfig:
    """How the service batches, queues and limits requests.

    ``max_batch`` images at most per micro-batch, collected for up to ``window_ms`` after the
    first one arrives (``max_batch=1`` serves one request at a time); ``queue_size`` images may
    wait before requests are shed with 503; ``workers`` inference threads; ``max_body_bytes``
    per request (413 above); ``max_pixels`` per image (413 above, read from the image header
    before decoding); ``decode_slots`` images decoded at once; ``max_pixels_in_flight`` pixels of
    decoded images waiting for their answers (503 above); ``client_timeout_s`` for a client to
    send its whole request (408, or the connection closed, after it); ``model_name`` the name under
    ``/v2/models`` (default: the bundle's); ``retry_after_s`` the ``Retry-After`` of a 503;
    ``reload_on_sighup`` reloads the bundle on SIGHUP (only when the service runs in the main
    thread); ``reload_dir`` the folder that ``POST /v1/reload`` may load other bundles from
    (``None``: only the served path); ``monitor`` how the drift monitor watches (its agreement
    checks run on a worker when the queue is empty). Every value is checked here
    (:class:`InvalidOptionError`).
    """

    max_batch: int = 8
    window_ms: float = 3.0
    queue_size: int = 64
    workers: int = 1
    max_body_bytes: int = 8 * 2 ** 20
    max_pixels: int = 4096 * 3072
    decode_slots: int = 2
    max_pixels_in_flight: int = 2 * 4096 * 3072
    client_timeout_s: float = 30.0
    model_name: str | None = None
    retry_after_s: int = 1
    reload_on_sighup: bool = False
    reload_dir: str | None = None
    monitor: MonitorSettings = MonitorSettings()

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "workers", "max_body_bytes", "max_pixels", "decode_slots",
                     "max_pixels_in_flight", "retry_after_s"):
            checks.positive_count(name, getattr(self, name))
        checks.nonnegative_number("window_ms", self.window_ms, "milliseconds")
        checks.positive_number("client_timeout_s", self.client_timeout_s)
        if self.max_pixels_in_flight < self.max_pixels:
            raise InvalidOptionError(f"max_pixels_in_flight ({self.max_pixels_in_flight}) must be at least "
                                     f"max_pixels ({self.max_pixels}), or no image of the largest size could be served")


class _Pixels:
    """The pixels of decoded images waiting for answers, bounded; used from the event loop only."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @asynccontextmanager
    async def held(self, pixels: int) -> AsyncIterator[None]:
        if self.used + pixels > self.limit:
            raise QueueFullError(f"the service holds {self.used} decoded pixels, and this request's {pixels} would "
                                 f"pass its limit of {self.limit}; retry shortly")
        self.used += pixels
        try:
            yield
        finally:
            self.used -= pixels


class _Body(io.BytesIO):
    """The request body as a file, named so in decoding errors."""

    def __str__(self) -> str:
        return "sent in the request body"

    __repr__ = __str__


class Service:
    """A served cascade: the model slot, the batcher and the metrics, shared by the endpoints."""

    def __init__(self, cascade: Cascade, loader: Callable[[str], Cascade], source: str, config: ServeConfig):
        self.config = config
        self.slot = ModelSlot(cascade, loader, source)
        self.model_name = config.model_name or cascade.bundle.manifest.name
        self.batcher: MicroBatcher | None = None
        self.decodes = asyncio.Semaphore(config.decode_slots)
        self.pixels = _Pixels(config.max_pixels_in_flight)
        self.metrics = Metrics(lambda: self.batcher.depth if self.batcher else 0)
        self._point_metrics(cascade)
        self.monitor = DriftMonitor.attach(cascade, config.monitor)
        self.metrics.registry.register(MonitorCollector(lambda: self.monitor))

    def _point_metrics(self, cascade: Cascade) -> None:
        self.metrics.use_operating_points(cascade.operating_points, cascade.operating_point)

    @property
    def ready(self) -> bool:
        """Whether the workers run (between the app's startup and shutdown)."""
        return self.batcher is not None

    def start(self) -> None:
        """Start the worker threads."""
        c = self.config
        self.batcher = MicroBatcher(self.slot, c.max_batch, c.window_ms, c.queue_size, c.workers,
                                    on_batch=self.metrics.batch_size.observe, on_idle=self._check_agreement)

    def _check_agreement(self, cascade: Cascade) -> None:
        """The drift monitor's kept requests through every stage, one at a time while nothing waits (on a worker)."""
        monitor, batcher = self.monitor, self.batcher
        while monitor.cascade is cascade and batcher is not None and not batcher.depth and monitor.drain(1):
            pass

    def stop(self) -> None:
        """Finish every queued image, then close the cascade."""
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            batcher.close()
        self.monitor.detach()
        self.slot.close()

    def reload(self, source: str | None = None) -> Cascade:
        """Switch to ``source`` (default: the served path, read again; another path must lie inside
        ``config.reload_dir``, else :class:`ForbiddenError`); see :meth:`ModelSlot.reload`."""
        if source is not None:
            self.check_reload_path(source)
        try:
            cascade = self.slot.reload(source)
        except StagewiseError:
            self.metrics.reloads.labels("error").inc()
            raise
        self.metrics.reloads.labels("ok").inc()
        self._point_metrics(cascade)
        self.monitor.detach()
        self.monitor = DriftMonitor.attach(cascade, self.config.monitor)
        return cascade

    def check_reload_path(self, source: object) -> None:
        """Refuse a reload path that is not a string naming something inside ``config.reload_dir``."""
        if not isinstance(source, str) or not source or "\0" in source:
            raise RequestError(f'"bundle" must be a path (a non-empty string), got {str(source)[:80]!r}')
        allowed = self.config.reload_dir
        if source != self.slot.source and (
                allowed is None or Path(allowed).resolve() not in Path(source).resolve().parents):
            where = f"inside {allowed}" if allowed else "other than the served one (start the service with --reload-dir)"
            raise ForbiddenError(f"reloading {source!r} is not allowed: this service loads only bundles {where}")

    def check_operating_point(self, name: str | None) -> None:
        """Refuse an operating point the served bundle does not define, before anything is queued."""
        points = self.slot.current.operating_points
        if name is not None and name not in points:
            raise UnknownOperatingPointError(f"unknown operating point {name!r}; this bundle defines: "
                                             f"{', '.join(points)}")

    async def classify(self, jobs: list[Job]) -> list[Answer]:
        """Queue ``jobs`` (all or none: :class:`QueueFullError`) and wait for their answers."""
        if self.batcher is None:
            raise ShuttingDownError("the service is not running (starting or shutting down); retry shortly")
        self.batcher.submit(jobs)
        answers = list(await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs)))
        for job, answer in zip(jobs, answers):
            self.monitor.offer(job.image, answer.prediction)
        return answers

    def answered(self, answer: Answer, elapsed_ms: float, budget_ms: float | None) -> None:
        """Count an answer in the metrics."""
        self.metrics.answered(answer.prediction, answer.prediction.stage_name,
                              answer.operating_point, elapsed_ms, budget_ms)


def classify_answer(prediction: dict[str, Any], request_ms: float, queue_ms: float, batch_size: int,
                    budget_ms: float | None, operating_point: str) -> dict[str, Any]:
    """The ``/v1/classify`` answer: the prediction's JSON (:meth:`~stagewise.runtimes.Prediction.to_dict`) plus
    ``request_ms`` (from the request's arrival to its answer), ``queue_ms``, ``batch_size`` and ``deadline_missed``
    (``request_ms`` over the request's ``budget_ms``).

    Until 0.3.0 the answer keeps the keys of 0.1 with their old meaning (CHANGELOG.md): ``stage`` (the
    ``stage_index``), ``compute_ms`` (the prediction's ``elapsed_ms``) and ``elapsed_ms`` as the time in
    the server (``request_ms``); from 0.3.0 ``elapsed_ms`` is the prediction's, as everywhere else.
    """
    doc = dict(prediction, request_ms=request_ms, queue_ms=queue_ms, batch_size=batch_size, budget_ms=budget_ms,
               deadline_missed=budget_ms is not None and request_ms > budget_ms, operating_point=operating_point)
    doc.update(stage=prediction["stage_index"], compute_ms=prediction["elapsed_ms"], elapsed_ms=request_ms)
    return doc


def _error(exc: Exception, service: Service) -> Response:
    headers = {}
    if isinstance(exc, ServeError):
        status = exc.status
    elif isinstance(exc, ImageTooLargeError):
        status = 413
    elif isinstance(exc, (ImageInputError, UnknownOperatingPointError, InvalidOptionError)):
        status = 400
    else:
        status = 500
    if isinstance(exc, QueueFullError):
        service.metrics.shed.inc()
        headers["Retry-After"] = str(service.config.retry_after_s)
    elif status == 503:
        headers["Retry-After"] = str(service.config.retry_after_s)
    return JSONResponse({"error": str(exc)}, status, headers=headers)


def _endpoint(name: str, service: Service,
              handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` with its errors answered as JSON and its status and latency counted."""

    async def endpoint(request: Request) -> Response:
        start = time.perf_counter()
        request.state.start = start
        try:
            response = await handler(request)
        except StagewiseError as exc:
            response = _error(exc, service)
        except Exception as exc:  # noqa: BLE001 - an unexpected error is a 500 with its message, and logged
            log.exception("%s failed", name)
            response = JSONResponse({"error": f"internal error: {exc}"}, 500)
        service.metrics.requests.labels(name, str(response.status_code)).inc()
        service.metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    return endpoint


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    try:
        return await asyncio.wait_for(_read_limited(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {timeout_s:g} s; send it at once") from None


async def _read_limited(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLargeError(f"the request body is {length} bytes, over the limit of {limit} "
                                   "(send a smaller image, or start the service with a larger --max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request body is over the limit of {limit} bytes "
                                       "(send a smaller image, or start the service with a larger --max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, limit: int, timeout_s: float) -> bytes:
    body = await _read_body(request, limit, timeout_s)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        if not body:
            raise RequestError("the request has no body; send the image as the body or as a multipart file")
        return body

    async def once() -> AsyncIterator[bytes]:
        yield body
    try:
        form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=16).parse()
    except MultiPartException as exc:
        raise RequestError(f"cannot read the multipart form: {exc.message}") from None
    files = [v for v in form.values() if isinstance(v, UploadFile)]
    if not files:
        raise RequestError("the multipart form has no file; send the image as a file field (e.g. curl -F image=@cat.jpg)")
    return await files[0].read()


def _number(params: Any, name: str, kind: type, low: float, high: float | None = None) -> Any:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise RequestError(f"{name} must be a {'number' if kind is float else 'whole number'}, got {raw!r}") from None
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bounds = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise RequestError(f"{name} must be {bounds}, got {raw!r}")
    return value


def _flag(params: Any, name: str) -> bool:
    raw = params.get(name, "false").lower()
    if raw not in ("1", "true", "yes", "0", "false", "no", ""):
        raise RequestError(f"{name} must be true or false, got {raw!r}")
    return raw in ("1", "true", "yes", "")


def create_app(service: Service) -> Starlette:
    """The Starlette app serving ``service``; its lifespan starts the workers and drains them at shutdown."""
    config = service.config

    async def classify(request: Request) -> Response:
        q = request.query_params
        cascade = service.slot.current
        budget = _number(q, "budget_ms", float, 1e-3, checks.MAX_BUDGET_MS)
        top_k = _number(q, "top_k", int, 1, len(cascade.classes))
        trace = _flag(q, "trace")
        point = q.get("operating_point")
        service.check_operating_point(point)
        data = await _image_bytes(request, config.max_body_bytes, config.client_timeout_s)
        async with service.decodes:
            image = await run_in_threadpool(load_image, _Body(data), config.max_pixels)
        del data
        async with service.pixels.held(image.shape[0] * image.shape[1]):
            (answer,) = await service.classify([Job(image, budget, point, arrived=request.state.start)])
        elapsed = (time.perf_counter() - request.state.start) * 1e3
        service.answered(answer, elapsed, budget)
        p = answer.prediction
        doc = classify_answer(p.to_dict(trace=trace, top_k=top_k or 0, classes=cascade.classes), elapsed,
                              answer.waited_ms, answer.batch_size, budget, answer.operating_point)
        return JSONResponse(doc)

    async def reload(request: Request) -> Response:
        body = await _read_body(request, 64 * 1024, config.client_timeout_s)
        try:
            source = json.loads(body).get("bundle") if body.strip() else None
        except (ValueError, AttributeError, RecursionError):
            raise RequestError('the reload body must be empty or JSON {"bundle": "path/to/bundle"}') from None
        try:
            cascade = await run_in_threadpool(service.reload, source)
        except ServeError:
            raise
        except StagewiseError as exc:
            return JSONResponse({"error": f"reload failed, still serving {service.slot.source}: {exc}"}, 400)
        return JSONResponse({"bundle": service.slot.source, "generation": service.slot.generation,
                             "stages": cascade.stage_names, "operating_point": cascade.operating_point})

    async def monitor(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(service.monitor.report))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": service.ready}, 200 if service.ready else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "stagewise", "version": __version__, "extensions": ["binary_tensor_data"]})

    def model_or_404(request: Request) -> Response | None:
        name = request.path_params["name"]
        if name != service.model_name:
            return JSONResponse({"error": f"unknown model {name!r}; this server serves {service.model_name!r}"}, 404)
        return None

    async def model(request: Request) -> Response:
        return model_or_404(request) or JSONResponse(model_metadata(service.model_name, str(service.slot.generation)))

    async def model_ready(request: Request) -> Response:
        return model_or_404(request) or await ready(request)

    async def infer(request: Request) -> Response:
        missing = model_or_404(request)
        if missing:
            return missing
        body = await _read_body(request, config.max_body_bytes, config.client_timeout_s)
        async with service.decodes:
            req = await run_in_threadpool(parse_infer_request, body, request.headers.get(HEADER), config.max_pixels)
        del body
        service.check_operating_point(req.operating_point)
        start = request.state.start
        async with service.pixels.held(int(np.prod(req.images.shape[:3]))):
            answers = await service.classify([Job(image, req.budget_ms, req.operating_point, arrived=start)
                                              for image in req.images])
        elapsed = (time.perf_counter() - start) * 1e3
        for answer in answers:
            service.answered(answer, elapsed, req.budget_ms)
        ps = [a.prediction for a in answers]
        stages = [p.stage_index for p in ps]
        values = {"label": [p.label for p in ps], "score": [p.score for p in ps], "stage_index": stages,
                  "stage": stages, "class_name": [p.name for p in ps]}
        content, headers = infer_response(service.model_name, str(service.slot.generation), req, values)
        return Response(content, headers=headers)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        loop = asyncio.get_running_loop()
        sighup = config.reload_on_sighup and threading.current_thread() is threading.main_thread()
        if sighup:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_on_signal(service)))
        try:
            yield
        finally:
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await run_in_threadpool(service.stop)

    routes = [("/v1/classify", "classify", classify, ["POST"]), ("/v1/reload", "reload", reload, ["POST"]),
              ("/metrics", "metrics", metrics, ["GET"]), ("/v1/monitor", "monitor", monitor, ["GET"]), ("/v2", "metadata", server_metadata, ["GET"]),
              ("/v2/health/live", "health", live, ["GET"]), ("/v2/health/ready", "health", ready, ["GET"]),
              ("/v2/models/{name}", "metadata", model, ["GET"]),
              ("/v2/models/{name}/ready", "health", model_ready, ["GET"]),
              ("/v2/models/{name}/infer", "infer", infer, ["POST"])]
    return Starlette(routes=[Route(path, _endpoint(name, service, fn), methods=methods)
                             for path, name, fn, methods in routes], lifespan=lifespan)


async def _reload_on_signal(service: Service) -> None:
    try:
        cascade = await run_in_threadpool(service.reload)
    except StagewiseError as exc:
        log.error("SIGHUP reload failed, still serving %s: %s", service.slot.source, exc)
        return
    log.info("SIGHUP: now serving %s (stages %s)", service.slot.source, ", ".join(cascade.stage_names))
