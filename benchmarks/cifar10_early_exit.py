"""CIFAR-10 early exit on ONNX Runtime: jointly trained exits against every single network a user could run.

Data: the CIFAR-10 training archive in ../shared/data, split stratified with seed 0 into 40,000
train (backbones, heads, joint fine-tuning) / 5,000 calibration (thresholds, exit placement) /
5,000 test (every number reported; nothing was fitted or chosen on them).

Networks (examples/cifar10; weights committed, each trained on the train part only):

* (a) ``original``: ``resnet_cifar`` (train.py, 15 epochs);
* (b) ``fine-tuned``: the final exit of ``resnet_cifar_exits`` alone (train_exits.py: the
  original fine-tuned 5 more epochs together with conv exit heads after layer1.0, layer1,
  layer2.0 and layer2);
* (c) each truncated network: the hand-picked bundle's stage k with its head, alone;
* (d) ``small``: ``resnet_cifar_small`` (widths 16/32/64, a quarter of the MACs, train.py's
  recipe and epochs) — the obvious static alternative.

Bundles, fp32 and INT8 (each backend's own quantizer, ``--int8``): the joint-trained network
with exits at ``layer1,layer2`` (hand-picked) and at ``--exits auto:2`` (chosen by the converter
on the calibration images among the four trained heads), and, for reference, the original
network with frozen-backbone GAP+linear heads at ``layer1,layer2`` (the previous recipe).

Top-1 and exit shares count all 5,000 test images (batch routing, which makes the same decisions
as batch 1); latency is batch 1, ``--threads`` intra-op threads, timed round robin image by image
over a seeded subset of the test images (``--timing-images``) so machine noise hits every
configuration alike. Standard errors of top-1 differences are paired (same images).

    python -m benchmarks.cifar10_early_exit            # writes benchmarks/results/cifar10_early_exit.json
    python -m benchmarks.cifar10_early_exit --only a,joint   # build some bundles first; then --reuse
    python -m benchmarks.cifar10_early_exit --render --into docs/benchmarks.md
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness

NAME = "cifar10_early_exit"
HAND_PICKED = ["layer1", "layer2"]
DROP_POINTS = ("drop-0pt", "drop-0.5pt", "drop-1pt", "drop-2pt")


def markdown(result: dict) -> str:
    """The docs/benchmarks.md tables of a result."""
    d = result["data"]
    lines = [f"n = {d['test']} test images for top-1 and exits (standard error of one top-1 near 85 %: "
             f"{100 * result['top1_se']:.2f} points; differences below carry their paired SE); latency: batch 1, {result['threads']} thread(s), {d['timed_test_images']} "
             f"test images timed round robin; {result['machine']['cpu']}, {result['machine']['date'][:10]}. "
             f"Command: `{result['command']}`.", ""]
    for precision, verdict in result["targets"].items():
        lines.append(f"**{precision}**: {verdict['text']}")
    cpu = result["machine"].get("summary")
    if cpu:
        lines.append(f"CPU: {cpu}.")
    lines += ["", "| configuration | precision | top-1 % | Δ vs best of (a),(b) ± SE | mean ms | p95 ms | speed-up vs (a) "
                  "| exits per stage | beaten by a faster single network |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        beaten = ", ".join(r.get("dominated_by", [])) or "-"
        exits = harness.exit_shares(r["exit_histogram"]) if r["kind"] == "operating_point" else "-"
        lines.append(f"| {r['name']} | {r['precision']} | {harness.percent(r['top1'])} | "
                     f"{100 * r['top1_minus_reference']:+.2f} ± {100 * r['se_vs_reference']:.2f} | {r['mean_ms']:.3f} | "
                     f"{r['p95_ms']:.3f} | {r['speedup_vs_original']:.2f}x | {exits} | {beaten} |")
    lines.append("")
    for name, p in result["placements"].items():
        lines.append(f"Exit placement of `{name}`: chose {', '.join(p['best'][0]['cuts'])} "
                     f"(simulated {p['best'][0]['mean_ms']:.3f} ms vs {p['full_ms']:.3f} ms); candidates "
                     + ", ".join(f"{c['cut']} {c['ms']:.2f} ms / {100 * c['accuracy']:.1f} %" for c in p["candidates"]) + ".")
    t = result["training"]
    lines.append(f"Joint training: {t['epochs']} epochs on {t['images']} images in {t['seconds'] / 60:.0f} min; held-out "
                 f"(calibration part) top-1 per exit " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in
                                                                  t["held_out"]["accuracy"].items())
                 + f"; the original network {100 * t['held_out']['original_final_accuracy']:.1f} %.")
    return "\n".join(lines)


def targets(rows: list[dict], precision: str) -> dict:
    """The issue's target for one precision: the fastest operating point within 0.5 points of the better of
    (a) and (b), its speed-up over (a), and whether every point beats each as-fast single network."""
    same = [r for r in rows if r["precision"] == precision]
    original = next(r for r in same if r["name"] == "(a) original")
    reference = max((r for r in same if r["name"] in ("(a) original", "(b) fine-tuned")), key=lambda r: r["top1"])
    points = [r for r in same if r["kind"] == "operating_point" and r["name"].startswith("joint")]
    within = [r for r in points if r["top1"] >= reference["top1"] - 0.005]
    best = min(within, key=lambda r: r["mean_ms"]) if within else None
    speedup = original["mean_ms"] / best["mean_ms"] if best else None
    undominated = all(not r.get("dominated_by") for r in points)
    text = (f"fastest joint-trained point within 0.5 pt of {reference['name']} ({100 * reference['top1']:.2f} %): "
            + (f"`{best['name']}` {100 * best['top1']:.2f} % at {best['mean_ms']:.3f} ms = **{speedup:.2f}x** vs (a) "
               f"(target 1.8x, moonshot 2.2x)" if best else "none")
            + f"; every joint operating point at or above every as-fast single network: {'yes' if undominated else 'no'}.")
    return {"reference": reference["name"], "best_point": best["name"] if best else None, "speedup": speedup,
            "undominated": undominated, "text": text}


def int8_against_plain(rows: list[dict]) -> dict:
    """The runtime issue's target: the fastest INT8 joint-trained point at most 0.5 pt below the plain network's
    fp32 top-1, against the plain network in INT8 (and fp32), and against the small network in INT8 when that
    reaches the same accuracy (the fastest single network a user could have at that accuracy)."""
    plain32 = next(r for r in rows if r["name"] == "(a) original" and r["precision"] == "fp32")
    int8 = [r for r in rows if r["precision"] == "int8"]
    plain8 = next(r for r in int8 if r["name"] == "(a) original")
    floor = plain32["top1"] - 0.005
    within = [r for r in int8 if r["kind"] == "operating_point" and r["name"].startswith("joint") and r["top1"] >= floor]
    singles = [r for r in int8 if r["kind"] == "single" and r["top1"] >= floor]
    if not within:
        return {"text": f"no INT8 joint-trained point within 0.5 pt of (a) fp32 ({100 * plain32['top1']:.2f} %)"}
    best = min(within, key=lambda r: r["mean_ms"])
    fastest = min(singles, key=lambda r: r["mean_ms"]) if singles else None
    out = {"point": best["name"], "top1": best["top1"], "mean_ms": best["mean_ms"],
           "speedup_vs_plain_int8": plain8["mean_ms"] / best["mean_ms"],
           "speedup_vs_plain_fp32": plain32["mean_ms"] / best["mean_ms"],
           "fastest_int8_single_at_that_accuracy": fastest["name"] if fastest else None,
           "speedup_vs_fastest_int8_single": fastest["mean_ms"] / best["mean_ms"] if fastest else None}
    out["text"] = (f"fastest INT8 joint-trained point within 0.5 pt of (a) fp32 ({100 * plain32['top1']:.2f} %): "
                   f"`{best['name']}` {100 * best['top1']:.2f} % at {best['mean_ms']:.3f} ms = "
                   f"**{out['speedup_vs_plain_int8']:.2f}x** the plain network in INT8 ({plain8['mean_ms']:.3f} ms, "
                   f"{100 * plain8['top1']:.2f} %; target 1.3x, moonshot 1.6x) and {out['speedup_vs_plain_fp32']:.2f}x "
                   f"in fp32 (target 1.5x)" + (f"; {out['speedup_vs_fastest_int8_single']:.2f}x the fastest INT8 single "
                                               f"network at that accuracy, {fastest['name']}" if fastest else ""))
    return out


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", bundles="cifar10", render=True, head_images=20000, timing_images=1000)
    ap.add_argument("--only", help="build only these bundles and stop (comma-separated keys: a, b, d, joint, auto, "
                                   "frozen); then measure everything with --reuse")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    parts = harness.cifar10_parts(args.data)
    example = harness.example_module("cifar10")

    from stagewise.converters.build import build_bundle
    from stagewise.converters.exit_placement import choose_exits
    from stagewise.converters.heads import HeadTraining
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import cascade_plans, early_exit_plans
    from stagewise.converters.torch_source import TorchSource
    from stagewise.images import Preprocess
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import summarize

    harness.set_threads(torch=1)
    train, calib, test = parts.train, parts.calibration, parts.test
    pre = Preprocess(mean=example.MEAN, std=example.STD, resize="shorter_crop", crop_fraction=1.0)
    original, joint = example.resnet_cifar(), example.resnet_cifar_exits()
    args.bundles.mkdir(parents=True, exist_ok=True)
    placements: dict[str, dict] = {}

    def joint_plans(cuts):
        return early_exit_plans(joint, cuts, pre, (32, 32), calib, HeadTraining(mode="given"))

    def auto_plans():
        cuts, record = choose_exits(TorchSource(), joint, pre, (32, 32), 2, calib, calib,
                                    BuildOptions(threads=args.threads), dict(joint.stagewise_exits))
        chosen = joint_plans(cuts)
        chosen[0].head = dict(chosen[0].head, placement=record)
        return chosen

    plans = {
        "(a) original": lambda: cascade_plans([("original", original, (32, 32))]),
        "(b) fine-tuned": lambda: cascade_plans([("fine_tuned", joint, (32, 32))]),
        "joint layer1,layer2": lambda: joint_plans(HAND_PICKED),
        "joint auto:2": auto_plans,
        "frozen layer1,layer2": lambda: early_exit_plans(original, HAND_PICKED, pre, (32, 32),
                                                         harness.subset(train, args.head_images, seed=0)),
    }
    if example.SMALL_WEIGHTS.is_file():
        plans["(d) small"] = lambda: cascade_plans([("small", example.resnet_cifar_small(), (32, 32))])
    else:
        print(f"(d) skipped: {example.SMALL_WEIGHTS.name} is missing (examples/cifar10/train.py --widths 16,32,64 writes it)")
    short = dict(zip(plans, ("a", "b", "joint", "auto", "frozen", "d")))
    only = set(args.only.split(",")) if args.only else None
    cascades = {}
    for name, make in plans.items():
        if only is not None and short[name] not in only:
            continue
        built = None
        for precision in ("fp32", "int8"):
            stem = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_") + f"_{precision}"
            path = args.bundles / f"{stem}.swb"
            if not (args.reuse and path.exists()):
                built = built or make()  # the same plans (and exit placement) for both precisions
                build_bundle(path, f"cifar10-{stem}", built, pre, parts.images.classes, calib,
                             BuildOptions(int8=precision == "int8", threads=args.threads, overwrite=True))
            cascades[(name, precision)] = load(path, runtime="onnxruntime", threads=args.threads)
    if only is not None:
        print(f"built {', '.join(sorted(only))}; run again with --reuse to measure")
        return
    auto_stages = cascades[("joint auto:2", "fp32")].bundle.manifest.to_dict()["stages"]
    auto_cuts = [stage["head"]["after"] for stage in auto_stages[:-1]]
    placements["joint auto:2"] = auto_stages[0]["head"]["placement"]
    images = harness.decode_all(test, "decoding test images")
    targets_np = np.asarray(test.targets)
    configs, decisions, meta = {}, {}, {}
    for (name, precision), cascade in cascades.items():
        stages = len(cascade.stage_names)
        if stages == 1:
            points = ["full"]
        elif name == "joint layer1,layer2":
            points = list(cascade.operating_points)
        else:
            points = [p for p in cascade.operating_points if p in DROP_POINTS]
        for point in points:
            key = (name if stages == 1 else f"{name} @ {point}", precision)
            configs[key] = lambda im, c=cascade, p=point: c.predict(im, operating_point=p)
            decisions[key] = cascade.predict_batch(images, operating_point=point)
            meta[key] = ("single" if stages == 1 else "operating_point", stages)
        if name == "joint layer1,layer2":
            for k, stage in enumerate(cascade.stage_names[:-1]):
                key = (f"(c) truncated after {HAND_PICKED[k]}", precision)
                configs[key] = lambda im, c=cascade, k=k: c.predict_stage(im, k)
                decisions[key] = [cascade.predict_stage(im, k) for im in images]
                meta[key] = ("single", stages)
    timed = np.random.default_rng(1).choice(len(images), size=min(args.timing_images, len(images)), replace=False)
    runs = harness.round_robin(configs, [images[i] for i in timed], rotate=True).outputs
    rows, correct = [], {}
    for key in configs:
        row = summarize(key[0], meta[key][0], decisions[key], targets_np, meta[key][1], timed=runs[key])
        row["precision"] = key[1]
        correct[key] = np.array([p.label == t for p, t in zip(decisions[key], targets_np)], dtype=float)
        rows.append(row)
    for precision in ("fp32", "int8"):
        same = [r for r in rows if r["precision"] == precision]
        original_row = next(r for r in same if r["name"] == "(a) original")
        reference = max((r for r in same if r["name"] in ("(a) original", "(b) fine-tuned")), key=lambda r: r["top1"])
        singles = [r for r in same if r["kind"] == "single"]
        for r in same:
            diff = correct[(r["name"], precision)] - correct[(reference["name"], precision)]
            r.update(top1_minus_reference=float(diff.mean()), se_vs_reference=float(diff.std(ddof=1) / np.sqrt(len(diff))),
                     speedup_vs_original=original_row["mean_ms"] / r["mean_ms"],
                     dominated_by=[s["name"] for s in singles if s is not r and s["mean_ms"] <= r["mean_ms"]
                                   and s["top1"] > r["top1"]])
    joint_record = dict(joint.stagewise_training)
    result = {
        **harness.metadata(NAME), "threads": args.threads, "runtime": "onnxruntime", "batch": 1,
        "data": {"archive": str(parts.archive), "split": parts.split, "train": len(train), "calibration": len(calib),
                 "test": len(test), "timed_test_images": len(timed)},
        "top1_se": float(np.sqrt(0.85 * 0.15 / len(test))), "auto_cuts": auto_cuts, "placements": placements,
        "training": joint_record, "rows": rows,
        "targets": {**{precision: targets(rows, precision) for precision in ("fp32", "int8")},
                    "int8 vs the plain network": int8_against_plain(rows)},
        "small_network": "(d) small" in plans,
    }
    harness.save(result, args.out)
    harness.publish(args, NAME, markdown(result))


if __name__ == "__main__":
    main()
