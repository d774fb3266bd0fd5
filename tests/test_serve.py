"""`stagewise serve` on the real server (uvicorn on 127.0.0.1, a free port), called with httpx and tritonclient."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from serving import TOY_BUNDLE, png_bytes, running, toy_service
from stagewise.runtimes import load
from stagewise.runtimes.serve import Job, MicroBatcher, ModelSlot, ServeConfig, Service
from stagewise.testing import scripted_cascade, scripted_image

tritonclient_http = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def reference():
    with load(TOY_BUNDLE, runtime="onnxruntime", threads=1) as cascade:
        yield cascade


@pytest.fixture(scope="module")
def image_files(image_folder):
    return sorted(image_folder.glob("class*/00[0-3].png"))


def same(answer: dict, p) -> None:
    assert (answer["label"], answer["stage_index"], answer["stage_name"], answer["class_name"]) == \
        (p.label, p.stage_index, p.stage_name, p.name)
    assert answer["score"] == pytest.approx(p.score, abs=1e-5)


def test_classify_answers_equal_predict_alone_and_in_micro_batches(reference, image_files):
    service = toy_service(ServeConfig(max_batch=8, window_ms=20))
    with running(service) as (url, _):
        with httpx.Client(base_url=url) as client:
            for point in (None, "full"):
                params = {"operating_point": point} if point else {}
                for path in image_files:
                    answer = client.post("/v1/classify", content=path.read_bytes(), params=params).json()
                    same(answer, reference.predict(path, operating_point=point))
                    assert answer["operating_point"] == (point or reference.operating_point)
            answer = client.post("/v1/classify", files={"image": image_files[0].read_bytes()},
                                 params={"top_k": 2, "trace": "true", "budget_ms": 1000}).json()
            same(answer, reference.predict(image_files[0]))
            assert [t["label"] for t in answer["top_k"]] == [i for i, _ in reference.predict(image_files[0]).top_k(2)]
            assert answer["trace"][0]["stage_name"] == "exit0" and answer["budget_limited"] is False
            # the prediction's JSON is the one the CLI and stream write, plus the request's own keys
            expected = reference.predict(image_files[0]).to_dict(top_k=2, classes=reference.classes)
            assert set(expected) | {"request_ms", "queue_ms", "batch_size", "deadline_missed"} <= set(answer)
            # the keys of 0.1 stay readable, with their old meaning, until 0.3.0 (CHANGELOG.md)
            assert answer["stage"] == answer["stage_index"] and answer["elapsed_ms"] == answer["request_ms"]
            assert answer["compute_ms"] <= answer["request_ms"]

        def one(path):
            with httpx.Client(base_url=url) as c:
                return c.post("/v1/classify", content=path.read_bytes(), params={"operating_point": "full"}).json()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, image_files * 2))
    for path, answer in zip(image_files * 2, answers):
        same(answer, reference.predict(path, operating_point="full"))
    assert max(a["batch_size"] for a in answers) > 1  # concurrent requests went through predict_batch together


def test_kserve_v2_with_tritonclient(reference, image_files):
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in image_files])
    expected = [reference.predict(im) for im in images]
    with running(toy_service()) as (url, _):
        client = tritonclient_http.InferenceServerClient(url=url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("toy")
        meta = client.get_model_metadata("toy")
        assert meta["inputs"][0]["datatype"] == "UINT8" and {o["name"] for o in meta["outputs"]} >= {"label", "score"}
        for binary in (True, False):
            tensor = tritonclient_http.InferInput("image", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images, binary_data=binary)
            outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary)
                       for n in ("label", "score", "stage_index", "stage", "class_name")]
            result = client.infer("toy", [tensor], outputs=outputs)
            assert result.as_numpy("label").tolist() == [p.label for p in expected]
            assert result.as_numpy("stage_index").tolist() == [p.stage_index for p in expected]
            assert result.as_numpy("stage").tolist() == [p.stage_index for p in expected]  # its 0.1 name, until 0.3.0
            np.testing.assert_allclose(result.as_numpy("score"), [p.score for p in expected], atol=1e-5)
            assert [n.decode() if isinstance(n, bytes) else n for n in result.as_numpy("class_name")] == \
                [p.name for p in expected]
        one = tritonclient_http.InferInput("image", [1, *images.shape[1:]], "UINT8")
        one.set_data_from_numpy(images[:1])
        result = client.infer("toy", [one], parameters={"operating_point": "full"})
        assert result.as_numpy("label").tolist() == [reference.predict(images[0], operating_point="full").label]
        client.close()


def test_malformed_requests_get_a_4xx_with_a_message(image_files):
    with running(toy_service(ServeConfig(max_body_bytes=4000))) as (url, _):
        with httpx.Client(base_url=url) as c:
            png = image_files[0].read_bytes()
            cases = [
                (c.post("/v1/classify", content=b"not an image"), 400, "cannot decode image sent in the request body"),
                (c.post("/v1/classify", content=png[:60]), 400, "cannot decode"),
                (c.post("/v1/classify"), 400, "no body"),
                (c.post("/v1/classify", content=png, params={"budget_ms": "-1"}), 400, "budget_ms must be"),
                (c.post("/v1/classify", content=png, params={"budget_ms": "soon"}), 400, "budget_ms must be a number"),
                (c.post("/v1/classify", content=png, params={"top_k": 9}), 400, "top_k must be between 1 and 3"),
                (c.post("/v1/classify", content=png, params={"trace": "maybe"}), 400, "trace must be true or false"),
                (c.post("/v1/classify", content=png, params={"operating_point": "x"}), 400, "this bundle defines: full"),
                (c.post("/v1/classify", files={"note": (None, "hi")}), 400, "multipart form has no file"),
                (c.post("/v1/classify", content=b"\0" * 5000), 413, "over the limit of 4000"),
                (c.post("/v2/models/toy/infer", content=b"{"), 400, "not JSON"),
                (c.post("/v2/models/toy/infer", json={"inputs": []}), 400, "one tensor"),
                (c.post("/v2/models/toy/infer", json={"inputs": [{"name": "image", "datatype": "FP32",
                                                                   "shape": [1, 2, 2, 3], "data": [0] * 12}]}),
                 400, 'datatype must be "UINT8"'),
                (c.post("/v2/models/toy/infer", json={"inputs": [{"name": "image", "datatype": "UINT8",
                                                                   "shape": [1, 2, 2, 3], "data": [0] * 11}]}),
                 400, "holds 11 values"),
                (c.post("/v2/models/toy/infer", json={"inputs": [{"name": "image", "datatype": "UINT8",
                                                                   "shape": [1, 2, 2, 3], "data": [300] * 12}]}),
                 400, "0-255"),
                (c.post("/v2/models/toy/infer", json={"inputs": [{"name": "image", "datatype": "UINT8",
                                                                   "shape": [2, 2, 3], "data": [0] * 12}],
                                                      "outputs": [{"name": "logits"}]}), 400, "unknown output"),
                (c.post("/v2/models/other/infer", json={}), 404, "serves 'toy'"),
            ]
            for response, status, message in cases:
                assert response.status_code == status, response.text
                assert message in response.json()["error"]


def slow_service(tmp_path, config: ServeConfig, delay_s: float) -> tuple[Service, list]:
    """A service on the scripted three-stage cascade whose every stage call sleeps ``delay_s``."""
    cascade, sessions, _ = scripted_cascade(tmp_path / "bundle")
    for s in sessions:
        s.run = lambda x, run=s.run: (time.sleep(delay_s), run(x))[1]
    closed = []
    cascade.close = lambda: closed.append(True)
    return Service(cascade, lambda path: cascade, str(tmp_path), config), closed


SURE = png_bytes(scripted_image([250, 250, 250], label=2))


def test_a_full_queue_sheds_requests_with_503_and_retry_after(tmp_path):
    service, _ = slow_service(tmp_path, ServeConfig(max_batch=1, window_ms=0, queue_size=2), delay_s=0.15)
    with running(service) as (url, _):
        def one(_):
            with httpx.Client(base_url=url, timeout=30) as c:
                return c.post("/v1/classify", content=SURE)
        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(one, range(10)))
        codes = [r.status_code for r in responses]
        assert 200 in codes and 503 in codes and set(codes) == {200, 503}
        shed = [r for r in responses if r.status_code == 503]
        assert all(r.headers["Retry-After"] == "1" and "queue is full" in r.json()["error"] for r in shed)
        assert all(r.json()["class_name"] == "c" for r in responses if r.status_code == 200)
        metrics = httpx.get(f"{url}/metrics").text
    assert f"stagewise_shed_total {float(len(shed))}" in metrics
    assert 'stagewise_requests_total{endpoint="classify",status="503"}' in metrics


def test_shutdown_finishes_requests_in_flight(tmp_path):
    service, closed = slow_service(tmp_path, ServeConfig(max_batch=1, window_ms=0), delay_s=0.1)
    results = []
    with running(service) as (url, server):
        def one():
            with httpx.Client(base_url=url, timeout=30) as c:
                results.append(c.post("/v1/classify", content=SURE).status_code)
        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10  # all four inside: one running, three queued (a slow machine may take long)
        while service.batcher.depth < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.should_exit = True  # what SIGTERM does
        for t in threads:
            t.join(30)
    assert results == [200] * 4 and closed == [True]
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{url}/v1/classify", content=SURE)


def test_reload_switches_bundles_without_dropping_requests(tmp_path, image_files):
    copy = tmp_path / "new.swb"
    copy.write_bytes(TOY_BUNDLE.read_bytes())
    broken = tmp_path / "broken.swb"
    broken.write_bytes(b"not a bundle")
    service = toy_service(ServeConfig(reload_dir=str(tmp_path)))
    with running(service) as (url, _):
        stop, codes = threading.Event(), []

        def keep_asking():
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    codes.append(c.post("/v1/classify", content=image_files[0].read_bytes()).status_code)
        asker = threading.Thread(target=keep_asking)
        asker.start()
        with httpx.Client(base_url=url, timeout=60) as c:
            swapped = c.post("/v1/reload", json={"bundle": str(copy)})
            failed = c.post("/v1/reload", json={"bundle": str(broken)})
            again = c.post("/v1/reload")
            metrics = c.get("/metrics").text
        stop.set()
        asker.join()
    assert swapped.status_code == 200 and swapped.json()["generation"] == 2
    assert failed.status_code == 400 and f"still serving {copy}" in failed.json()["error"]
    assert again.json() == {"bundle": str(copy), "generation": 3, "stages": ["exit0", "final"],
                            "operating_point": "drop-1pt"}
    assert codes and set(codes) == {200}
    assert 'stagewise_reloads_total{result="ok"} 2.0' in metrics
    assert 'stagewise_reloads_total{result="error"} 1.0' in metrics


def test_metrics_count_requests_exits_and_operating_point(image_files):
    with running(toy_service()) as (url, _):
        with httpx.Client(base_url=url) as c:
            for path in image_files[:3]:
                c.post("/v1/classify", content=path.read_bytes(), params={"budget_ms": 1e-3})
            text = c.get("/metrics").text
    assert 'stagewise_requests_total{endpoint="classify",status="200"} 3.0' in text
    assert 'stagewise_exits_total{operating_point="drop-1pt",stage="exit0"}' in text
    assert "stagewise_deadline_misses_total 3.0" in text  # 1 microsecond is always missed
    assert 'stagewise_operating_point{name="drop-1pt"} 1.0' in text and "stagewise_queue_depth 0.0" in text
    assert 'stagewise_request_latency_seconds_count{endpoint="classify"} 3.0' in text


def test_micro_batches_route_per_sample_and_budgeted_jobs_run_alone(tmp_path):
    cascade, sessions, _ = scripted_cascade(tmp_path / "bundle")
    batcher = MicroBatcher(ModelSlot(cascade, lambda path: cascade, "x"), max_batch=8, window_ms=200)
    sure, unsure = scripted_image([250, 250, 250], 1), scripted_image([10, 10, 10], 2)
    jobs = [Job(sure), Job(unsure), Job(sure), Job(unsure, budget_ms=1e3), Job(sure, operating_point="default")]
    batcher.submit(jobs)
    answers = [job.future.result(10) for job in jobs]
    batcher.close()
    assert [a.prediction.stage_index for a in answers] == [0, 2, 0, 2, 0]
    assert {a.batch_size for a in answers} == {5}
    # ran alone, with its own deadline counted from its arrival (the 200 ms window has passed)
    assert 600 < answers[3].prediction.budget_ms <= 800  # 1000 less the 200 ms window, once (slow machines: less)
    # the budgeted job alone, a batch of 3 and one of 1 (another operating point); only the unsure ones went on
    assert sorted(sessions[0].calls) == [1, 1, 3] and sessions[2].calls == [1, 1]


def test_serve_command_takes_its_settings_from_the_environment(monkeypatch):
    from click.testing import CliRunner

    import stagewise.runtimes.serve as serve_module
    from stagewise.cli import cli

    calls = []
    monkeypatch.setattr(serve_module, "serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    env = {"STAGEWISE_BUNDLE": str(TOY_BUNDLE), "STAGEWISE_RUNTIME": "litert", "STAGEWISE_THREADS": "3",
           "STAGEWISE_PORT": "9123", "STAGEWISE_MAX_BATCH": "4", "STAGEWISE_QUEUE_SIZE": "10",
           "STAGEWISE_MAX_BODY_MB": "1", "STAGEWISE_OPERATING_POINT": "full"}
    result = CliRunner().invoke(cli, ["serve", "--queue-size", "12"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (args, kwargs), = calls
    assert args == (str(TOY_BUNDLE), "127.0.0.1", 9123)
    assert (kwargs["runtime"], kwargs["threads"], kwargs["operating_point"]) == ("litert", 3, "full")
    config = kwargs["config"]
    assert (config.max_batch, config.queue_size, config.max_body_bytes, config.reload_on_sighup) == \
        (4, 12, 2 ** 20, True)  # the command line wins over the environment
    bad = CliRunner().invoke(cli, ["serve"], env={**env, "STAGEWISE_MAX_BATCH": "0"})
    assert bad.exit_code != 0 and "max-batch" in bad.output
