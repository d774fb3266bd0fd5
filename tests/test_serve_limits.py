"""The service's limits: image size from the header, bounded decodes and pixels in flight, slow clients,
malformed requests answered 4xx with a message, reloads only from the allowed folder, checked options."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn

from benchmarks.serve_load import blank_png
from serving import TOY_BUNDLE, png_bytes, running, toy_service
from stagewise.cli import main
from stagewise.errors import InvalidOptionError
from stagewise.runtimes.serve import ServeConfig, app as serve_app
from stagewise.runtimes.serve import create_app

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def url():
    with running(toy_service(ServeConfig(max_pixels=1000 * 1000, max_pixels_in_flight=4 * 1000 * 1000))) as (u, _):
        yield u


def test_an_image_over_the_pixel_budget_is_refused_from_its_header(url):
    bomb = blank_png(9000, 9000, channels=1)
    assert len(bomb) < 200_000
    r = httpx.post(f"{url}/v1/classify", content=bomb, timeout=30)
    assert r.status_code == 413 and "9000x9000 = 81000000 pixels, over the limit of 1000000" in r.json()["error"]
    ok = httpx.post(f"{url}/v1/classify", content=png_bytes(np.full((8, 8, 3), 200, np.uint8)), timeout=30)
    assert ok.status_code == 200


def _infer(url: str, doc, raw: bytes | None = None) -> httpx.Response:
    body = raw if raw is not None else json.dumps(doc).encode()
    return httpx.post(f"{url}/v2/models/toy/infer", content=body, timeout=30)


def _image(**change) -> dict:
    spec = {"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": [7] * 192}
    return {"inputs": [{**spec, **change}]}


@pytest.mark.parametrize("doc, raw, status, message", [
    (_image(shape=[1, 2 ** 40, 2 ** 40, 3]), None, 413, "over the limit"),
    (_image(shape=[2 ** 62, 4, 4, 3]), None, 400, "holds 192 values"),
    (None, b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": [1]}], '
           b'"parameters": {"budget_ms": NaN}}', 400, "not JSON"),
    (None, b'{"parameters": {"budget_ms": Infinity}, "inputs": []}', 400, "not JSON"),
    ({**_image(), "parameters": {"budget_ms": 1e300}}, None, 400, "budget_ms"),
    ({**_image(), "parameters": [1, 2]}, None, 400, "parameters must be a JSON object"),
    (_image(parameters="x"), None, 400, "input parameters must be a JSON object"),
    ({**_image(), "outputs": [{"name": "label", "parameters": 5}]}, None, 400, "output parameters"),
    (None, b"[" * 100_000 + b"]" * 100_000, 400, "not JSON"),
    (_image(data=None, parameters={"binary_data_size": "192"}), None, 400, "binary_data_size must be a whole"),
    (_image(data=[7.5] * 192), None, 400, "no floats"),
    (_image(data=["7"] * 192), None, 400, "no floats"),
    (_image(data=[True] * 192), None, 400, "no floats"),
    (_image(data=[2 ** 70] * 192), None, 400, "integers 0-255"),
])
def test_malformed_infer_requests_are_4xx_with_a_message(url, doc, raw, status, message):
    r = _infer(url, doc, raw)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


@pytest.mark.parametrize("query, message", [({"budget_ms": "nan"}, "budget_ms"), ({"budget_ms": "1e400"}, "budget_ms"),
                                            ({"budget_ms": "1e300"}, "budget_ms"), ({"top_k": "1e3"}, "top_k")])
def test_bad_classify_parameters_are_400(url, query, message):
    r = httpx.post(f"{url}/v1/classify", content=png_bytes(np.zeros((8, 8, 3), np.uint8)), params=query, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"]


@pytest.mark.parametrize("body, status", [({"bundle": 5}, 400), ({"bundle": ["a"]}, 400), ({"bundle": ""}, 400),
                                          ({"bundle": "/etc/passwd"}, 403), ({"bundle": "a\0b"}, 400)])
def test_reload_takes_only_a_path_inside_the_reload_dir(url, body, status):
    r = httpx.post(f"{url}/v1/reload", json=body, timeout=30)
    assert r.status_code == status and "bundle" in r.json()["error"]


def test_reload_from_the_allowed_folder_still_works(tmp_path):
    inside = tmp_path / "bundles" / "next.swb"
    inside.parent.mkdir()
    inside.write_bytes(TOY_BUNDLE.read_bytes())
    with running(toy_service(ServeConfig(reload_dir=str(inside.parent)))) as (u, _):
        assert httpx.post(f"{u}/v1/reload", json={"bundle": str(inside)}, timeout=60).status_code == 200
        link = tmp_path / "bundles" / "escape.swb"
        link.symlink_to(TOY_BUNDLE)  # resolves outside the folder
        assert httpx.post(f"{u}/v1/reload", json={"bundle": str(link)}, timeout=60).status_code == 403


def test_decodes_are_bounded_and_pixels_in_flight_too(monkeypatch):
    active, most = [0], [0]
    lock = threading.Lock()
    real = serve_app.load_image

    def slow_decode(*args):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return real(*args)

    monkeypatch.setattr(serve_app, "load_image", slow_decode)
    with running(toy_service(ServeConfig(decode_slots=2))) as (u, _):
        body = png_bytes(np.zeros((8, 8, 3), np.uint8))
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{u}/v1/classify", content=body, timeout=60).status_code,
                                  range(6)))
    assert codes == [200] * 6 and most[0] <= 2

    async def hold():
        pixels = serve_app._Pixels(100)
        async with pixels.held(60):
            with pytest.raises(serve_app.QueueFullError, match="limit of 100"):
                async with pixels.held(60):
                    pass
            async with pixels.held(40):
                assert pixels.used == 100
        assert pixels.used == 0
    asyncio.run(hold())


def test_slow_clients_are_cut_off():
    from stagewise.runtimes.serve import _with_header_timeout

    service = toy_service(ServeConfig(client_timeout_s=0.5))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning",
                                           http=_with_header_timeout(0.5)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        heads = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        for s in heads:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        body = socket.create_connection(("127.0.0.1", port))
        body.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")  # half a body
        for s in heads + [body]:
            s.settimeout(30)
        assert all(s.recv(100) == b"" for s in heads)  # closed by the server
        assert b"408" in body.recv(1000).split(b"\r\n")[0]
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("field, value", [("window_ms", float("nan")), ("window_ms", -1), ("max_body_bytes", 0),
                                          ("max_pixels", 0), ("decode_slots", 1.5), ("client_timeout_s", float("inf")),
                                          ("queue_size", True), ("max_pixels_in_flight", 10)])
def test_service_options_are_checked(field, value):
    with pytest.raises(InvalidOptionError, match=field):
        ServeConfig(**{field: value})


@pytest.mark.parametrize("option", [["--port", "70000"], ["--max-body-mb", "inf"], ["--batch-window-ms", "nan"],
                                    ["--drain-timeout", "nan"], ["--drain-timeout", "-5"], ["--max-pixels", "0"]])
def test_serve_refuses_bad_options_with_a_usage_error(option, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", str(TOY_BUNDLE), *option])
    assert exit.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_serve_on_a_port_in_use_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as exit:
            main(["serve", str(TOY_BUNDLE), "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "cannot listen on 127.0.0.1" in err and "Traceback" not in err


def test_serve_with_a_trusted_key_refuses_an_unsigned_bundle(tmp_path, capsys):
    pytest.importorskip("cryptography")
    from stagewise.signing import generate_key

    generate_key(tmp_path / "k.pem", tmp_path / "k.pub")
    with pytest.raises(SystemExit) as exit:
        main(["serve", str(TOY_BUNDLE), "--port", "0", "--trusted-key", str(tmp_path / "k.pub")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "is not signed" in err
