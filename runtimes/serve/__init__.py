"""``stagewise serve``: a small HTTP inference service for a bundle (the ``serve`` extra).

Python use::

    from stagewise.runtimes.serve import ServeConfig, serve
    serve("model.swb", port=8080, runtime="onnxruntime", threads=2, config=ServeConfig(max_batch=8))

or build the app around a loaded cascade (``Service`` + ``create_app``) and run it with any ASGI
server. The service needs Starlette, uvicorn, prometheus-client and python-multipart
(``pip install "stagewise[serve]"``) and imports no training framework.
"""

from __future__ import annotations

import socket
from typing import Any, Sequence

from stagewise import checks
from stagewise.deprecation import renamed_keywords
from stagewise.errors import InvalidOptionError, StagewiseError
from stagewise.extras import require

for _module in ("starlette", "uvicorn", "prometheus_client", "python_multipart"):
    require(_module, "serve", "stagewise serve")

from .app import ServeConfig, Service, create_app  # noqa: E402
from .batching import Answer, Job, MicroBatcher  # noqa: E402
from .errors import (ForbiddenError, PayloadTooLargeError, QueueFullError, RequestError,  # noqa: E402
                     RequestTimeoutError, ServeError, ShuttingDownError)
from .model import ModelSlot  # noqa: E402


@renamed_keywords(backend="runtime")
def serve(bundle: str, host: str = "127.0.0.1", port: int = 8080, runtime: str = "auto", threads: int | None = None,
          device: str = "CPU", config: ServeConfig | None = None, operating_point: str | None = None,
          drain_timeout_s: float = 30.0, log_level: str = "info", trusted_keys: Sequence[Any] | None = None,
          max_connections: int = 256) -> None:
    """Load ``bundle`` and serve it on ``host:port`` until SIGINT/SIGTERM.

    At shutdown the listener closes first, requests in flight get up to ``drain_timeout_s`` to
    finish, then the queued images are answered and the cascade is closed. SIGHUP (and
    ``POST /v1/reload``) loads the bundle path again, verifies it and switches to it;
    ``operating_point`` is the default point of every bundle loaded. ``trusted_keys``: every
    bundle loaded, at start and on reload, must be signed by one of these Ed25519 public keys.
    At most ``max_connections`` connections are served at once (503 beyond), and a client that
    has not sent its request headers within ``config.client_timeout_s`` is disconnected. A port
    that cannot be listened on raises :class:`~stagewise.errors.InvalidOptionError` before the bundle is loaded.
    ``runtime`` is as :func:`stagewise.load` takes it (``backend=``: its deprecated name).
    """
    import uvicorn

    from ..executor import load

    config = config or ServeConfig(reload_on_sighup=True)
    checks.nonnegative_number("drain_timeout_s", drain_timeout_s, "seconds")
    checks.positive_count("max_connections", max_connections)
    listener = _listen(host, port)

    def loader(path: str):
        cascade = load(path, runtime=runtime, threads=threads, device=device, trusted_keys=trusted_keys)
        if operating_point:
            try:
                cascade.use(operating_point)
            except StagewiseError:
                cascade.close()
                raise
        return cascade

    try:
        service = Service(loader(bundle), loader, bundle, config)
        server = uvicorn.Server(uvicorn.Config(
            create_app(service), timeout_graceful_shutdown=drain_timeout_s, log_level=log_level, access_log=False,
            limit_concurrency=max_connections, timeout_keep_alive=5, http=_with_header_timeout(config.client_timeout_s)))
        server.run(sockets=[listener])
    finally:
        listener.close()


def _listen(host: str, port: object) -> socket.socket:
    """A listening socket on ``host:port``, or :class:`~stagewise.errors.InvalidOptionError` saying why not."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidOptionError(f"port must be a whole number from 0 to 65535, got {port!r}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except (OSError, UnicodeError) as exc:
        raise InvalidOptionError(f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc}); choose "
                                 "another --port or --host, or stop the process that uses it") from None


def _with_header_timeout(timeout_s: float) -> type:
    """uvicorn's HTTP protocol, closing a connection that has not sent a whole request head within ``timeout_s``
    (uvicorn's own keep-alive timer only starts after a first response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self.loop.call_later(timeout_s, self._drop_if_silent)

        def _drop_if_silent(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return Protocol


__all__ = ["Answer", "ForbiddenError", "Job", "MicroBatcher", "ModelSlot", "PayloadTooLargeError", "QueueFullError",
           "RequestError", "RequestTimeoutError", "ServeConfig", "ServeError", "Service", "ShuttingDownError", "create_app", "serve"]
