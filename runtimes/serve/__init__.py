"""``stagewise serve``: a small HTTP inference service for a bundle (the ``serve`` extra).

Python use::

    from stagewise.runtimes.serve import ServeConfig, serve
    serve("model.swb", port=8080, backend="onnxruntime", threads=2, config=ServeConfig(max_batch=8))

or build the app around a loaded cascade (``Service`` + ``create_app``) and run it with any ASGI
server. The service needs Starlette, uvicorn, prometheus-client and python-multipart
(``pip install "stagewise[serve]"``) and imports no training framework.
"""

from __future__ import annotations

from stagewise.errors import StagewiseError
from stagewise.extras import require

for _module in ("starlette", "uvicorn", "prometheus_client", "python_multipart"):
    require(_module, "serve", "stagewise serve")

from .app import ServeConfig, Service, create_app  # noqa: E402
from .batching import Answer, Job, MicroBatcher  # noqa: E402
from .errors import PayloadTooLargeError, QueueFullError, RequestError, ServeError, ShuttingDownError  # noqa: E402
from .model import ModelSlot  # noqa: E402


def serve(bundle: str, host: str = "127.0.0.1", port: int = 8080, backend: str = "auto", threads: int | None = None,
          device: str = "CPU", config: ServeConfig | None = None, operating_point: str | None = None,
          drain_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Load ``bundle`` and serve it on ``host:port`` until SIGINT/SIGTERM.

    At shutdown the listener closes first, requests in flight get up to ``drain_timeout_s`` to
    finish, then the queued images are answered and the cascade is closed. SIGHUP (and
    ``POST /v1/reload``) loads the bundle path again, verifies it and switches to it;
    ``operating_point`` is the default point of every bundle loaded.
    """
    import uvicorn

    from ..executor import load

    def loader(path: str):
        cascade = load(path, backend=backend, threads=threads, device=device)
        if operating_point:
            try:
                cascade.use(operating_point)
            except StagewiseError:
                cascade.close()
                raise
        return cascade

    config = config or ServeConfig(reload_on_sighup=True)
    service = Service(loader(bundle), loader, bundle, config)
    uvicorn.run(create_app(service), host=host, port=port, timeout_graceful_shutdown=drain_timeout_s,
                log_level=log_level, access_log=False)


__all__ = ["Answer", "Job", "MicroBatcher", "ModelSlot", "PayloadTooLargeError", "QueueFullError", "RequestError",
           "ServeConfig", "ServeError", "Service", "ShuttingDownError", "create_app", "serve"]
