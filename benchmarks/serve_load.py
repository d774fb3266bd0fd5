"""Load on `stagewise serve`: concurrent HTTP clients against the ImageNet cascade and a CIFAR-10 early exit.

For each bundle, a real server (a subprocess, uvicorn on 127.0.0.1) is driven by an asyncio +
httpx client with 8 and 32 concurrent clients, each sending images in a closed loop; every
configuration is bounded by a request count and a time limit. Configurations:

* ``cascade, micro-batching``: requests arriving within --window-ms go together through
  ``Cascade.predict_batch`` (per-sample routing: easy images leave after stage 1);
* ``cascade, one at a time``: the same service with --max-batch 1;
* ``largest stage alone, one at a time``: a plain single-model server of the cascade's largest
  stage (a one-stage bundle of it, --max-batch 1), and the same with micro-batching.

Reported per configuration: throughput, latency p50/p95/p99 (client side, from send to answer),
errors, top-1 on the labelled images sent, the exit histogram and the server's RSS; a long run
of --rss-requests on the cascade (after a warm-up at full batches) reads the RSS five times to
check that memory stays flat.

The ImageNet cascade is EfficientNet-Lite0@224 -> Lite2@260 (mean probabilities), built like
``stagewise demo`` from the packaged 160 demo images (thresholds on one half, requests from the
other); the CIFAR-10 bundle is the committed examples/cifar10 ResNet with exits after layer1 and
layer2 (heads on --head-images training images), requests from the test split.

    python -m benchmarks.serve_load --data /work/shared/data                  # full size
    python -m benchmarks.serve_load --requests 300 --rss-requests 3000 --head-images 2000   # reduced
    python -m benchmarks.serve_load --render RESULT... --into docs/benchmarks.md           # several runs, one section

``--robustness`` measures the service's limits instead (issue #24), on the ImageNet cascade (or
``--robustness-bundle``, e.g. tests/data/toy.swb), each on a fresh server with the default limits:
the peak RSS (``VmHWM``) while four clients send a 9000x9000 PNG each at once (refused from the
header, 413) and while four send a 4096x3072 PNG (the largest served by default); the server's
threads and RSS before and after 100 ``POST /v1/reload``; and 64 concurrent clients x 50 requests,
every one answered. The unit caps the service at 1 GB (deploy/stagewise.service ``MemoryMax``).

    python -m benchmarks.serve_load --robustness --out benchmarks/results/serve_robustness.json
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import harness

NAME = "serve_load"
HEADER = "## Serving under load (issue #14): `stagewise serve`\n\n"


# ---- bundles -----------------------------------------------------------------------------------

def imagenet_bundles(folder: Path, reuse: bool, threads: int) -> tuple[dict[str, Path], list[bytes], list[int]]:
    """The demo cascade and a one-stage bundle of its largest stage, and the held-out demo images as JPEG."""
    from stagewise.datasets import open_image_set
    from stagewise.demo import STAGES, demo_images

    images = open_image_set(demo_images())
    calibration, test = images.split([0.5, 0.5], seed=0)
    paths = {"cascade": folder / "imagenet_cascade.swb", "largest": folder / "imagenet_lite2_260.swb"}
    if not (reuse and all(p.exists() for p in paths.values())):
        from stagewise.converters.build import build_bundle
        from stagewise.converters.factory import build_model
        from stagewise.converters.options import BuildOptions
        from stagewise.converters.plans import cascade_plans
        from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS, imagenet_labels
        from stagewise.images import Preprocess

        harness.set_threads(torch=2)
        pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
        models = [(name, build_model(spec, image_size=size), (size, size)) for name, spec, size in STAGES]
        options = BuildOptions(threads=threads, overwrite=True)
        build_bundle(paths["cascade"], "imagenet-cascade", cascade_plans(models, combine="mean_probs"), pre,
                     imagenet_labels(), calibration, options, kind="cascade")
        build_bundle(paths["largest"], "imagenet-lite2", cascade_plans(models[-1:]), pre, imagenet_labels(),
                     calibration, options, kind="cascade")
    return paths, [encode(test.image(i), "JPEG") for i in range(len(test))], list(test.targets)


def cifar10_bundles(data: Path, folder: Path, reuse: bool, threads: int, head_images: int,
                    requests: int) -> tuple[dict[str, Path], list[bytes], list[int]]:
    """The CIFAR-10 ResNet with exits after layer1 and layer2, the full ResNet alone, and test images as PNG."""
    parts = harness.cifar10_parts(data)
    paths = {"cascade": folder / "cifar10_early_exit.swb", "largest": folder / "cifar10_resnet.swb"}
    if not (reuse and all(p.exists() for p in paths.values())):
        from stagewise.converters.build import build_bundle
        from stagewise.converters.heads import HeadTraining
        from stagewise.converters.options import BuildOptions
        from stagewise.converters.plans import cascade_plans, early_exit_plans
        from stagewise.images import Preprocess

        harness.set_threads(torch=2)
        example = harness.example_module("cifar10")
        pre = Preprocess(mean=example.MEAN, std=example.STD, resize="stretch", crop_fraction=1.0)
        model = example.resnet_cifar()
        heads_on = harness.subset(parts.train, head_images, seed=0)
        options = BuildOptions(threads=threads, overwrite=True)
        plans = early_exit_plans(model, ["layer1", "layer2"], pre, (32, 32), heads_on, HeadTraining())
        build_bundle(paths["cascade"], "cifar10-early-exit", plans, pre, parts.images.classes, parts.calibration,
                     options)
        build_bundle(paths["largest"], "cifar10-resnet", cascade_plans([("resnet", model, (32, 32))]), pre,
                     parts.images.classes, parts.calibration, options)
    test = harness.subset(parts.test, requests, seed=1)
    return paths, [encode(test.image(i), "PNG") for i in range(len(test))], list(test.targets)


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def blank_png(width: int, height: int, channels: int = 3) -> bytes:
    """A valid black PNG (greyscale or RGB) of ``width`` x ``height``: an image bomb, a few hundred kB at
    most on the wire however many pixels it declares."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width * channels + 1)
    raw = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if channels == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


# ---- the server and the client -------------------------------------------------------------------

class Server:
    """``stagewise serve`` in a subprocess on a free loopback port."""

    def __init__(self, bundle: Path, threads: int, max_batch: int, window_ms: float, queue_size: int,
                 operating_point: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from stagewise.cli import main; main()", "serve", str(bundle),
             "--port", str(self.port), "--backend", "onnxruntime", "--threads", str(threads),
             "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms), "--queue-size", str(queue_size),
             "--log-level", "warning", *(["--operating-point", operating_point] if operating_point else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    async def ready(self, client) -> None:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if (await client.get(f"{self.url}/v2/health/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("the server did not become ready in 180 s")

    def status(self, field: str) -> int:
        """A number from the server's ``/proc/PID/status`` (``VmRSS``, ``VmHWM`` in kB, ``Threads``)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def rss_mb(self) -> float:
        return self.status("VmRSS") / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


async def drive(url: str, bodies: list[bytes], clients: int, requests: int, time_limit_s: float) -> dict:
    """``clients`` closed-loop clients sending ``bodies`` in turn until ``requests`` or ``time_limit_s``."""
    import httpx

    latencies, answers, errors = [], [], []
    sent = 0
    deadline = time.perf_counter() + time_limit_s

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            i = sent
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/classify", content=bodies[i % len(bodies)])
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            latencies.append((time.perf_counter() - t0) * 1e3)
            if r.status_code == 200:
                answers.append((i % len(bodies), r.json()))
            else:
                errors.append(str(r.status_code))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"sent": sent, "latencies": latencies, "answers": answers, "errors": errors, "wall_s": wall}


def summary(run: dict, labels: list[int], stages: int) -> dict:
    lat = np.array(run["latencies"]) if run["latencies"] else np.zeros(1)
    histogram = [0] * stages
    for _, a in run["answers"]:
        histogram[a["stage_index"]] += 1
    correct = sum(a["label"] == labels[i] for i, a in run["answers"])
    batch = [a["batch_size"] for _, a in run["answers"]]
    return {"requests": run["sent"],
            "ok": len(run["answers"]), "errors": len(run["errors"]), "error_kinds": sorted(set(run["errors"])),
            "wall_s": run["wall_s"], "throughput_rps": len(run["answers"]) / run["wall_s"],
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "top1": correct / max(len(run["answers"]), 1),
            "exit_histogram": histogram, "mean_batch": float(np.mean(batch)) if batch else 0.0}


RSS_SAMPLES = 5
"""How many times the memory run reads the server's RSS (after each equal share of its requests)."""

CONFIGS = (("cascade, micro-batching", "cascade", True), ("cascade, one at a time", "cascade", False),
           ("largest stage alone, one at a time", "largest", False),
           ("largest stage alone, micro-batching", "largest", True))


async def measure(name: str, paths: dict[str, Path], bodies: list[bytes], labels: list[int], args) -> dict:
    import httpx

    from stagewise.bundle import read_bundle

    stages = {kind: len(read_bundle(p).manifest.stages) for kind, p in paths.items()}
    rows = []
    for config, kind, batched in CONFIGS:
        server = Server(paths[kind], args.threads, args.max_batch if batched else 1, args.window_ms, args.queue_size,
                        args.operating_point if kind == "cascade" else None)
        try:
            async with httpx.AsyncClient() as probe:
                await server.ready(probe)
            await drive(server.url, bodies, 4, 2 * len(bodies[:16]), 30)  # warm up
            rss_before = server.rss_mb()
            for clients in args.clients:
                run = await drive(server.url, bodies, clients, args.requests, args.time_limit)
                row = {"dataset": name, "config": config, "clients": clients, **summary(run, labels, stages[kind])}
                row["rss_mb"] = server.rss_mb()
                rows.append(row)
                print(f"{name:8s} {config:36s} {clients:2d} clients: {row['throughput_rps']:7.1f} req/s, "
                      f"p50 {row['p50_ms']:7.1f} p95 {row['p95_ms']:7.1f} p99 {row['p99_ms']:7.1f} ms, "
                      f"errors {row['errors']}, top-1 {row['top1']:.3f}, mean batch {row['mean_batch']:.1f}",
                      flush=True)
            rows[-1]["rss_before_mb"] = rss_before
        finally:
            server.stop()
    server = Server(paths["cascade"], args.threads, args.max_batch, args.window_ms, args.queue_size,
                    args.operating_point)
    try:
        async with httpx.AsyncClient() as probe:
            await server.ready(probe)
        clients = max(args.clients)
        await drive(server.url, bodies, clients, 8 * clients, 60)  # full batches once: the runtime's arenas grow
        samples = [server.rss_mb()]
        sent, errors, wall = 0, 0, 0.0
        chunk = max(args.rss_requests // RSS_SAMPLES, 1)
        for _ in range(RSS_SAMPLES):
            run = await drive(server.url, bodies, clients, chunk, args.rss_time_limit / RSS_SAMPLES)
            sent, errors, wall = sent + run["sent"], errors + len(run["errors"]), wall + run["wall_s"]
            samples.append(server.rss_mb())
    finally:
        server.stop()
    rss = {"dataset": name, "requests": sent, "errors": errors, "rss_before_mb": samples[0],
           "rss_after_mb": samples[-1], "rss_samples_mb": samples, "clients": clients, "wall_s": wall}
    print(f"{name}: RSS after warm-up {samples[0]:.1f} MB, then {', '.join(f'{x:.1f}' for x in samples[1:])} MB "
          f"over {sent} requests ({errors} errors)")
    return {"rows": rows, "rss": rss}


async def robustness(bundle: Path, bodies: list[bytes], args) -> dict:
    """The service's limits under attack and load (see the module docstring), each on a fresh server."""
    import httpx

    async def fresh(check):
        server = Server(bundle, args.threads, args.max_batch, args.window_ms, 64)
        try:
            async with httpx.AsyncClient(timeout=120) as client:
                await server.ready(client)
                return await check(server, client)
        finally:
            server.stop()

    def parallel_images(body: bytes):
        async def check(server: Server, client) -> dict:
            before = server.status("VmHWM") / 1024
            answers = await asyncio.gather(*(client.post(f"{server.url}/v1/classify", content=body) for _ in range(4)))
            return {"body_bytes": len(body), "statuses": sorted(r.status_code for r in answers),
                    "peak_rss_before_mb": before, "peak_rss_mb": server.status("VmHWM") / 1024}
        return check

    async def reloads(server: Server, client) -> dict:
        before = (server.status("Threads"), server.rss_mb())
        codes = [(await client.post(f"{server.url}/v1/reload")).status_code for _ in range(100)]
        return {"reloads": len(codes), "ok": codes.count(200), "threads_before": before[0],
                "threads_after": server.status("Threads"), "rss_before_mb": before[1], "rss_after_mb": server.rss_mb()}

    async def load(server: Server, client) -> dict:
        run = await drive(server.url, bodies, 64, 64 * 50, args.time_limit)
        return {"clients": 64, "requests": run["sent"], "answered_200": len(run["answers"]),
                "errors": sorted(run["errors"]), "wall_s": run["wall_s"]}

    out = {"bundle": str(bundle), "bombs_9000x9000": await fresh(parallel_images(blank_png(9000, 9000))),
           "largest_4096x3072": await fresh(parallel_images(blank_png(4096, 3072))),
           "reloads": await fresh(reloads), "load": await fresh(load)}
    for name, part in out.items():
        print(f"{name}: {part}", flush=True)
    return out


def robustness_markdown(result: dict) -> str:
    r = result["robustness"]
    bombs, largest, reloads, load = r["bombs_9000x9000"], r["largest_4096x3072"], r["reloads"], r["load"]
    return "\n".join([
        f"### The service's limits (issue #24): {Path(r['bundle']).name}", "",
        f"Measured on {result['machine']['cpu']} ({result['machine']['cores']} cores), {result['machine']['date']}; "
        f"`{result['command']}`. Each check on a fresh `stagewise serve` with the default limits (at most "
        "4096x3072 pixels per image, 2 decodes at once); the unit caps the service at 1 GB.", "",
        "| check | answers | server peak RSS (VmHWM) |", "|---|---|---|",
        f"| 4 clients at once, a 9000x9000 PNG each ({bombs['body_bytes'] / 1024:.0f} kB) | {bombs['statuses']} | "
        f"{bombs['peak_rss_before_mb']:.0f} -> {bombs['peak_rss_mb']:.0f} MB |",
        f"| 4 clients at once, a 4096x3072 PNG each ({largest['body_bytes'] / 1024:.0f} kB) | {largest['statuses']} | "
        f"{largest['peak_rss_before_mb']:.0f} -> {largest['peak_rss_mb']:.0f} MB |", "",
        f"100 reloads: {reloads['ok']} answered 200; threads {reloads['threads_before']} -> {reloads['threads_after']}, "
        f"RSS {reloads['rss_before_mb']:.0f} -> {reloads['rss_after_mb']:.0f} MB. "
        f"{load['clients']} concurrent clients x 50 requests: {load['answered_200']} of {load['requests']} answered 200 "
        f"in {load['wall_s']:.1f} s (errors: {load['errors'] or 'none'}).", ""])


# ---- report ------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    if "robustness" in result:
        return robustness_markdown(result)
    out = [f"Measured on {result['machine']['cpu']} ({result['machine']['cores']} cores), "
           f"{result['machine']['date']}; `{result['command']}`. Server and client share the machine; the "
           f"server runs ONNX Runtime with {result['threads']} thread(s), micro-batches of at most "
           f"{result['max_batch']} within {result['window_ms']} ms, cascades at operating point "
           f"{result.get('operating_point') or 'of the bundle (default)'}. {result['size_note']}", ""]
    for name, part in result["datasets"].items():
        out += [f"### {name}", "", "| configuration | clients | req/s | p50 ms | p95 ms | p99 ms | errors | top-1 "
                "| exits | mean batch |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in part["rows"]:
            out.append(f"| {r['config']} | {r['clients']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                       f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {harness.percent(r['top1'])} | "
                       f"{harness.exit_shares(r['exit_histogram'])} | {r['mean_batch']:.1f} |")
        gains = part["gains"]
        rss = part["rss"]
        out += ["", "Throughput of the cascade with micro-batching over: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in gains.items()) + ".",
            f"Server RSS after a warm-up at full batches {rss['rss_before_mb']:.1f} MB, then "
            + ", ".join(f"{x:.1f}" for x in rss["rss_samples_mb"][1:])
            + f" MB after each fifth of {rss['requests']} requests ({rss['errors']} errors, "
            f"{rss['clients']} clients).", ""]
    return "\n".join(out)


def gains(rows: list[dict]) -> dict[str, float]:
    """Throughput of micro-batched cascade over each other configuration, at the highest client count."""
    top = max(r["clients"] for r in rows)
    at = {r["config"]: r["throughput_rps"] for r in rows if r["clients"] == top}
    ref = at["cascade, micro-batching"]
    return {f"{config} ({top} clients)": ref / v for config, v in at.items()
            if config != "cascade, micro-batching" and v > 0}


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", bundles="serve", render=True, head_images=20000)
    ap.add_argument("--datasets", default="imagenet,cifar10", help="comma-separated: imagenet, cifar10")
    ap.add_argument("--clients", default="8,32", type=lambda s: [int(x) for x in s.split(",")],
                    help="concurrent client counts (default 8,32)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per configuration and client count")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per configuration and client count")
    ap.add_argument("--rss-requests", type=int, default=20000, help="requests of the memory run")
    ap.add_argument("--rss-time-limit", type=float, default=600.0, help="seconds of the memory run")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--window-ms", type=float, default=3.0)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--operating-point", help="the cascades' operating point (default: each bundle's default)")
    ap.add_argument("--robustness", action="store_true", help="measure the service's limits instead (issue #24)")
    ap.add_argument("--robustness-bundle", type=Path, help="bundle of --robustness (default: the ImageNet cascade)")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown, header=HEADER):
        return
    args.bundles.mkdir(parents=True, exist_ok=True)
    if args.robustness:
        if args.robustness_bundle:
            from stagewise.datasets import open_image_set
            from stagewise.demo import demo_images

            images = open_image_set(demo_images())
            bundle, bodies = args.robustness_bundle, [encode(images.image(i), "JPEG") for i in range(len(images))]
        else:
            paths, bodies, _ = imagenet_bundles(args.bundles, args.reuse, args.threads)
            bundle = paths["cascade"]
        result = {**harness.metadata(NAME), "robustness": asyncio.run(robustness(bundle, bodies, args))}
        harness.save(result, args.out)
        harness.publish(args, NAME, HEADER + markdown(result))
        return
    datasets = {}
    for name in args.datasets.split(","):
        if name == "imagenet":
            paths, bodies, labels = imagenet_bundles(args.bundles, args.reuse, args.threads)
            title = "ImageNet: EfficientNet-Lite0@224 -> Lite2@260 (80 held-out demo images, cycled)"
        else:
            paths, bodies, labels = cifar10_bundles(args.data, args.bundles, args.reuse, args.threads,
                                                    args.head_images, 1000)
            title = "CIFAR-10: ResNet early exit after layer1, layer2 (1,000 test images, cycled)"
        part = asyncio.run(measure(name, paths, bodies, labels, args))
        part["gains"] = gains(part["rows"])
        datasets[title] = part
    full = args.requests >= 2000 and args.rss_requests >= 20000
    result = {**harness.metadata(NAME), "threads": args.threads, "max_batch": args.max_batch,
              "window_ms": args.window_ms, "operating_point": args.operating_point, "os_cpus": os.cpu_count(), "datasets": datasets,
              "size_note": "Full size." if full else
              f"Reduced size: at most {args.requests} requests per row (time limit {args.time_limit:g} s) and "
              f"{args.rss_requests} requests for the memory check (the full run: 2,000 and 20,000)."}
    harness.save(result, args.out)
    harness.publish(args, NAME, HEADER + markdown(result))


if __name__ == "__main__":
    main()
