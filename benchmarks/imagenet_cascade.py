"""ImageNet resolution cascades of pretrained EfficientNet-Lite models on ONNX Runtime.

Data: the 1,000-image ImageNet sample in ../shared/data (one image per class), split with
seed 0 into 500 calibration images (thresholds) and 500 test images (every number reported).

Measured in one run: each single model at its resolution (fp32 and INT8, each a one-stage
bundle) and each cascade at each operating point (fp32, and INT8 for the first cascade). INT8
bundles are built with the converter's default ``--int8`` (the accuracy gate on the 244 held-back
calibration images: top-1 at most 0.5 pt below float); each bundle's build time and each stage's
gate decision, interval and search time are recorded. The INT8 headline compares the INT8 cascade
with the INT8 single models only: at the accuracy of the most accurate INT8 single model, its
speed-up over the fastest INT8 single model that reaches that accuracy, and whether one operating
point is >= 1 pt above every INT8 single model while faster than the most accurate one, with
Wilson intervals of each top-1 and Agresti-Min intervals of the paired differences.
Top-1/top-5 and exit rates count every test image (the runtime's batch routing, which makes
the same decisions as batch-1 prediction); latency is timed at batch 1, fixed threads, round
robin image by image over a seeded subset of the test images (--timing-images), so machine
noise hits every configuration alike. The oracle bound (each image leaves at the first stage
that is right) is reported for every cascade. Before timing, every single
model's fp32 bundle is checked against PyTorch on all 1,000 images (top-1 agreement).

    python -m benchmarks.imagenet_cascade      # writes benchmarks/results/imagenet_cascade.json and .png
    python -m benchmarks.imagenet_cascade --render   # prints its docs/benchmarks.md tables
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "imagenet_cascade"

ZOO = "stagewise.converters.zoo:efficientnet_lite{}"
SINGLES = {"lite0@224": (0, 224), "lite1@240": (1, 240), "lite2@260": (2, 260), "lite2@240": (2, 240)}
CASCADES = {
    "lite0@224>lite2@260 mean": ([(0, 224), (2, 260)], "mean_probs"),
    "lite0@224>lite2@260 own": ([(0, 224), (2, 260)], "own"),
    "lite0@224>lite2@240 mean": ([(0, 224), (2, 240)], "mean_probs"),
}


def _model(variant: int, size: int):
    from stagewise.converters.factory import build_model

    return build_model(ZOO.format(variant), image_size=size)


def torch_top1(model, pre, images: list[np.ndarray], size: int) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), 50):
            out.append(model(torch.from_numpy(pre.tensor(images[i:i + 50], (size, size)))).argmax(1).numpy())
    return np.concatenate(out)


def wilson(successes: int, n: int) -> list[float]:
    """The 95 % Wilson interval of a proportion."""
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def paired(better: np.ndarray, worse: np.ndarray) -> dict:
    """The top-1 difference of two configurations on the same images (``better`` minus ``worse``, correctness
    vectors) with its Agresti-Min 95 % interval."""
    from stagewise.converters.int8_gate import paired_proportions_interval

    lost, gained = int((better < worse).sum()), int((better > worse).sum())
    return {"difference": float((better - worse).mean()),
            "interval": list(paired_proportions_interval(lost, gained, len(better)))}


def int8_headline(rows: list[dict], correct: dict[str, np.ndarray]) -> dict:
    """The INT8 targets: the INT8 cascade against the INT8 single models (see the module docstring)."""
    singles = [r for r in rows if r["kind"] == "single" and r["name"].endswith("int8")]
    points = [r for r in rows if r["kind"] == "cascade" and " int8 @ " in r["name"]]
    if not singles or not points:
        return {}
    top = max(singles, key=lambda r: (r["top1"], -r["mean_ms"]))
    fastest_reaching = min((r for r in singles if r["top1"] >= top["top1"]), key=lambda r: r["mean_ms"])
    out: dict = {"most_accurate_single": top["name"], "most_accurate_single_top1": top["top1"],
                 "fastest_single_reaching_it": fastest_reaching["name"]}
    reaching = [r for r in points if r["top1"] >= top["top1"]]
    if reaching:
        best = min(reaching, key=lambda r: r["mean_ms"])
        out["at_equal_accuracy"] = {"point": best["name"], "top1": best["top1"], "mean_ms": best["mean_ms"],
                                    "speedup": fastest_reaching["mean_ms"] / best["mean_ms"],
                                    "vs_single": paired(correct[best["name"]], correct[fastest_reaching["name"]]),
                                    "target": 1.5, "moonshot": 2.0}
    above = [r for r in points if r["top1"] >= max(s["top1"] for s in singles) + 0.01 and r["mean_ms"] < top["mean_ms"]]
    if above:
        best = min(above, key=lambda r: r["mean_ms"])
        out["one_point_above"] = {"point": best["name"], "top1": best["top1"], "mean_ms": best["mean_ms"],
                                  "speedup_vs_most_accurate": top["mean_ms"] / best["mean_ms"],
                                  "vs_single": paired(correct[best["name"]], correct[top["name"]])}
    else:
        most = max(points, key=lambda r: r["top1"])
        out["one_point_above"] = None
        out["most_accurate_point"] = {"point": most["name"], "top1": most["top1"], "mean_ms": most["mean_ms"],
                                      "vs_single": paired(correct[most["name"]], correct[top["name"]])}
    return out


def _headline_text(h: dict) -> list[str]:
    if not h:
        return []
    pct = harness.percent
    lines = [f"**INT8, default gate** — most accurate INT8 single model: {h['most_accurate_single']} "
             f"({pct(h['most_accurate_single_top1'])} %)."]
    e = h.get("at_equal_accuracy")
    if e:
        d = e["vs_single"]
        lines.append(f"- At its accuracy: `{e['point']}` {pct(e['top1'])} % at {e['mean_ms']:.2f} ms = "
                     f"**{e['speedup']:.2f}x** faster than {h['fastest_single_reaching_it']} (target 1.5x, moonshot 2x); "
                     f"paired top-1 difference {100 * d['difference']:+.2f} pt [{100 * d['interval'][0]:+.2f}, "
                     f"{100 * d['interval'][1]:+.2f}].")
    else:
        lines.append("- No INT8 cascade point reaches the most accurate INT8 single model.")
    a = h.get("one_point_above")
    if a:
        d = a["vs_single"]
        lines.append(f"- ≥ 1 pt above every INT8 single model and faster than the most accurate: `{a['point']}` "
                     f"{pct(a['top1'])} % at {a['mean_ms']:.2f} ms ({a['speedup_vs_most_accurate']:.2f}x); paired "
                     f"difference {100 * d['difference']:+.2f} pt [{100 * d['interval'][0]:+.2f}, {100 * d['interval'][1]:+.2f}].")
    elif "most_accurate_point" in h:
        m = h["most_accurate_point"]
        d = m["vs_single"]
        lines.append(f"- No point is ≥ 1 pt above every INT8 single model while faster than the most accurate; the "
                     f"most accurate point `{m['point']}` {pct(m['top1'])} % at {m['mean_ms']:.2f} ms, paired difference "
                     f"{100 * d['difference']:+.2f} pt [{100 * d['interval'][0]:+.2f}, {100 * d['interval'][1]:+.2f}].")
    return lines


def _gate_lines(result: dict) -> list[str]:
    lines = ["", "| INT8 bundle / stage | shipped | gate: top-1 float → INT8 (difference, 95 % interval) | agreement | "
                 "decided by | search s | build s |", "|---|---|---|---|---|---|---|"]
    for name, stages in result["int8"].items():
        for stage in stages:
            q = stage["quantization"] or {}
            if "accuracy_difference" not in q:
                continue
            low, high = q["difference_interval"]
            lines.append(f"| {name} / {stage['name']} | {stage['precision']} | {100 * q['float_accuracy']:.1f} → "
                         f"{100 * q['int8_accuracy']:.1f} % ({100 * q['accuracy_difference']:+.2f} pt, "
                         f"[{100 * low:+.2f}, {100 * high:+.2f}], n={q['images']}) | {100 * q['agreement_with_fp32']:.1f} % | "
                         f"{q['decided_by']} | {q.get('search_seconds', '-')} | {result['build_seconds'].get(name, '-')} |")
    return lines


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table of a result."""
    d = result["data"]
    cpu = result["machine"].get("summary", result["machine"]["cpu"])
    lines = [f"n = {d['test']} test images for top-1 and exits ({d['calibration']} other images calibrated the "
             f"thresholds); latency: batch 1, {result['threads']} thread(s), {d['timed_test_images']} test images timed "
             f"round robin (order rotated); {cpu}, {result['machine']['date'][:10]}. Command: `{result['command']}`.", "",
             *_headline_text(result.get("int8_headline", {})), "",
             "| configuration | top-1 % | top-5 % | mean ms | p95 ms | exits per stage | against single models |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        note = ""
        if "speedup_vs_equal_accuracy_single" in r:
            note = f"{r['speedup_vs_equal_accuracy_single']:.2f}x faster than {r['equal_accuracy_single']} (≥ its top-1)"
        elif r.get("more_accurate_than_every_single"):
            note = (f"more accurate than every single; {r['speedup_vs_most_accurate_single']:.2f}x the speed of "
                    f"{r['most_accurate_single']}")
        interval = r.get("top1_interval")
        top1 = harness.percent(r["top1"]) + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")
        lines.append(f"| {r['name']} | {top1} | {harness.percent(r['top5'])} | {r['mean_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{harness.exit_shares(r['exit_histogram']) if r['kind'] == 'cascade' else '-'} | {note} |")
    if result.get("int8"):
        lines += _gate_lines(result)
    lines.append("")
    for name, o in result["oracle_on_test"].items():
        lines.append(f"Oracle bound, {name}: top-1 {harness.percent(o['top1'])} % at {o['mean_ms_from_stage_p50']:.2f} ms mean "
                     f"(stage p50s), exits {' / '.join(f'{100 * r:.0f}%' for r in o['exit_rates'])}.")
    lines.append("")
    for name, a in result["torch_agreement"].items():
        lines.append(f"- {name} fp32 bundle vs PyTorch: top-1 agreement {100 * a['top1_agreement_with_torch']:.1f} % on "
                     f"{a['n']} images (PyTorch top-1 {100 * a['torch_top1']:.1f} %).")
    return "\n".join(lines)


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", bundles="imagenet", render=True, timing_images=200)
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--cascades", default="lite0@224>lite2@260 mean,lite0@224>lite2@260 own", help="comma-separated names from: " + ", ".join(CASCADES))
    ap.add_argument("--singles", default="lite0@224,lite1@240,lite2@260", help="from: " + ", ".join(SINGLES))
    ap.add_argument("--int8-cascades", default="lite0@224>lite2@260 mean,lite0@224>lite2@260 own",
                    help="cascades also built in INT8")
    ap.add_argument("--int8-singles", default="lite0@224,lite1@240,lite2@260", help="single models also built in INT8")
    ap.add_argument("--build-only", action="store_true", help="build the bundles and stop (on a busy machine); "
                                                               "then measure them with --reuse on a quiet one")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    parts = harness.imagenet_parts(args.data)

    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import cascade_plans
    from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS, imagenet_labels
    from stagewise.images import Preprocess
    from stagewise.reports import pareto_plot
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import summarize
    from stagewise.runtimes.calibrate import exit_table

    harness.set_threads(torch=2)
    data, calib, test = parts.images, parts.calibration, parts.test
    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
    labels = imagenet_labels()
    precisions = ["fp32"] if args.no_int8 else ["fp32", "int8"]
    args.bundles.mkdir(parents=True, exist_ok=True)

    bundles: dict[str, Path] = {}
    kinds: dict[str, str] = {}
    build_seconds: dict[str, float] = {}

    def build(path: Path, key: str, plans, name: str, opts) -> None:
        """Build one bundle (or reuse it) and keep its build time beside it (a reused bundle keeps its own)."""
        times = path.with_suffix(".build.json")
        if not (args.reuse and path.exists()):
            started = time.monotonic()
            build_bundle(path, name, plans(), pre, labels, calib, opts, kind="cascade")
            times.write_text(json.dumps({"seconds": round(time.monotonic() - started, 1)}))
        if times.exists():
            build_seconds[key] = json.loads(times.read_text())["seconds"]
    for tag in precisions:
        opts = BuildOptions(int8=tag == "int8", threads=args.threads, overwrite=True)
        for name in args.singles.split(","):
            if tag == "int8" and name not in args.int8_singles.split(","):
                continue
            variant, size = SINGLES[name]
            path = args.bundles / f"{name}_{tag}.swb"
            build(path, f"{name} {tag}", lambda: cascade_plans([(name.replace("@", "_"), _model(variant, size),
                                                                 (size, size))]), f"{name}-{tag}", opts)
            bundles[f"{name} {tag}"] = path
            kinds[f"{name} {tag}"] = "single"
        for name in args.cascades.split(","):
            if tag == "int8" and name not in args.int8_cascades.split(","):
                continue
            stages, combine = CASCADES[name]
            path = args.bundles / f"{name.replace('>', '_').replace(' ', '_').replace('@', '')}_{tag}.swb"
            build(path, f"{name} {tag}", lambda: cascade_plans([(f"lite{v}_{s}", _model(v, s), (s, s))
                                                                for v, s in stages], combine=combine),
                  f"{name}-{tag}", opts)
            bundles[f"{name} {tag}"] = path
            kinds[f"{name} {tag}"] = "cascade"
    if args.build_only:
        return

    cascades = {name: load(path, runtime="onnxruntime", threads=args.threads) for name, path in bundles.items()}
    all_images = harness.decode_all(data, "decoding all sample images")
    agreement = {}
    for name in args.singles.split(","):
        variant, size = SINGLES[name]
        reference = torch_top1(_model(variant, size), pre, all_images, size)
        got = np.concatenate([cascades[f"{name} fp32"].stage_logits(all_images[i:i + 100])[0].argmax(1)
                              for i in range(0, len(all_images), 100)])
        agreement[name] = {"top1_agreement_with_torch": float((reference == got).mean()), "n": len(all_images),
                           "torch_top1": float((reference == data.targets).mean())}
        print(f"{name}: bundle vs torch top-1 agreement {100 * agreement[name]['top1_agreement_with_torch']:.2f}% "
              f"(n={len(all_images)}), torch top-1 {100 * agreement[name]['torch_top1']:.1f}%")

    images = harness.decode_all(test, "decoding test images")
    configs, meta, decisions = {}, {}, {}
    for name, cascade in cascades.items():
        points = ["full"] if kinds[name] == "single" else [p for p in cascade.operating_points if p != "full"]
        for point in points:
            key = name if kinds[name] == "single" else f"{name} @ {point}"
            configs[key] = lambda im, c=cascade, p=point: c.predict(im, operating_point=p)
            meta[key] = (kinds[name], len(cascade.stage_names))
            decisions[key] = cascade.predict_batch(images, operating_point=point)
    timed = np.random.default_rng(1).choice(len(images), size=min(args.timing_images, len(images)), replace=False)
    runs = harness.round_robin(configs, [images[i] for i in timed], rotate=True).outputs
    rows = [summarize(name, meta[name][0], decisions[name], test.targets, meta[name][1], timed=runs[name])
            for name in configs]
    correct = {name: np.array([p.label == t for p, t in zip(decisions[name], test.targets)], dtype=float)
               for name in configs}
    for r in rows:
        r["top1_interval"] = wilson(int(correct[r["name"]].sum()), len(test))
    for tag in precisions:
        singles = [r for r in rows if r["kind"] == "single" and r["name"].endswith(tag)]
        for r in rows:
            if r["kind"] != "cascade" or f" {tag} @ " not in r["name"]:
                continue
            reaching = [s for s in singles if s["top1"] >= r["top1"]]
            if reaching:
                best = min(reaching, key=lambda s: s["mean_ms"])
                r["equal_accuracy_single"] = best["name"]
                r["speedup_vs_equal_accuracy_single"] = best["mean_ms"] / r["mean_ms"]
            else:
                best = max(singles, key=lambda s: s["top1"])
                r["more_accurate_than_every_single"] = True
                r["most_accurate_single"] = best["name"]
                r["speedup_vs_most_accurate_single"] = best["mean_ms"] / r["mean_ms"]
    oracles = {}
    for name, cascade in cascades.items():
        if kinds[name] == "cascade":
            profile = f"onnxruntime-cpu-{args.threads}t"
            costs = np.array([s["cost"]["latency_ms"][profile]["p50"] for s in cascade.bundle.manifest.to_dict()["stages"]])
            o = exit_table(cascade, images, test.targets, costs).oracle()
            oracles[name] = {"top1": o.accuracy, "mean_ms_from_stage_p50": o.mean_cost, "exit_rates": list(o.exit_rates)}
    result = {
        **harness.metadata(NAME), "runtime": "onnxruntime", "threads": args.threads,
        "batch": 1, "data": {"archive": str(parts.archive), "calibration": len(calib), "test": len(test),
                             "timed_test_images": len(timed), "split": parts.split},
        "torch_agreement": agreement, "rows": rows, "oracle_on_test": oracles, "build_seconds": build_seconds,
        "int8": {name: [{"name": s["name"], "precision": s["artifacts"]["onnx"]["precision"],
                         "quantization": s["artifacts"]["onnx"].get("quantization")}
                        for s in c.bundle.manifest.to_dict()["stages"]]
                 for name, c in cascades.items() if name.endswith("int8")},
        "int8_headline": int8_headline(rows, correct),
    }
    harness.save(result, args.out)
    plot_rows = [dict(r, series=r["name"].split(" @ ")[0] if r["kind"] == "cascade" else "single models fp32",
                      short=r["name"].split(" @ ")[-1] if r["kind"] == "cascade" else r["name"])
                 for r in rows if r["name"].split(" @ ")[0].endswith("fp32")]
    pareto_plot({"rows": plot_rows, "runtime": "onnxruntime", "n": len(test), "bundle": "ImageNet sample, fp32"},
                args.out.with_suffix(".png"))
    for r in rows:
        extra = ""
        if "speedup_vs_equal_accuracy_single" in r:
            extra = f"{r['speedup_vs_equal_accuracy_single']:.2f}x vs {r['equal_accuracy_single']}"
        elif r.get("more_accurate_than_every_single"):
            extra = f"beats every single; {r['speedup_vs_most_accurate_single']:.2f}x vs {r['most_accurate_single']}"
        print(f"{r['name']:52s} top1 {100 * r['top1']:5.1f}  mean {r['mean_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f} ms  "
              f"exits {r['exit_histogram']}  {extra}")
    print("\n".join(_headline_text(result["int8_headline"])))


if __name__ == "__main__":
    main()
