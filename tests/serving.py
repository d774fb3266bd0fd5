"""Helpers of the service tests: run the real uvicorn server on 127.0.0.1 with a free port, in a thread."""

from __future__ import annotations

import io
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import uvicorn
from PIL import Image

from stagewise.runtimes import load
from stagewise.runtimes.serve import ServeConfig, Service, create_app

TOY_BUNDLE = Path(__file__).parent / "data" / "toy.swb"


def toy_service(config: ServeConfig | None = None, bundle: Path = TOY_BUNDLE) -> Service:
    def loader(path: str):
        return load(path, runtime="onnxruntime", threads=1)
    return Service(loader(str(bundle)), loader, str(bundle), config or ServeConfig())


@contextmanager
def running(service: Service, drain_s: float = 10.0) -> Iterator[tuple[str, uvicorn.Server]]:
    """Serve ``service`` until the block ends; yields the base URL and the server (set ``should_exit`` to stop)."""
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=drain_s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
