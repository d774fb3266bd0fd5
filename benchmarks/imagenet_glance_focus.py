"""Glance and focus (AnchorNet) on the ImageNet sample: CAM patches vs random patches vs a resolution cascade.

Data: the ImageNet sample in ../shared/data (one image per class), split with seed 0 into
halves: calibration images (thresholds, and the choice of the patch size) and test images
(every number reported). Models: the pretrained EfficientNet-Lite zoo, no fine-tuning (the paper
fine-tunes its focus network on patches; here the focus network is the ImageNet Lite0 as it is).

Configurations, each a bundle run by ONNX Runtime (fp32, --threads intra-op threads, batch 1):

* glance and focus: glance Lite0@224 (logits + CAM of its top class, computed in the graph),
  then 1-3 focus steps, each Lite0@224 on one CAM-chosen patch (IoU rule --iou), deciding on
  the mean of the probabilities so far; the patch size is the one of --fractions whose 3-patch
  bundle is most accurate on the calibration half;
* the same bundles with random patches (same size, count and IoU rule, seeded), thresholds
  recalibrated for them;
* the resolution cascade Lite0@224 -> Lite2@260 (mean of probabilities);
* each single model: Lite0@224, Lite1@240, Lite2@260.

Every operating point the calibration engine picks is measured: all configurations run on every
test image in turn (round robin, batch 1), so machine noise hits them alike; the same runs give
top-1 and the exits per step.

    python -m benchmarks.imagenet_glance_focus --data /work/shared/data
    python -m benchmarks.imagenet_glance_focus --render --into docs/benchmarks.md
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import harness

NAME = "imagenet_glance_focus"
ZOO = "zoo:efficientnet_lite{}"
SINGLES = {"lite0@224": (0, 224), "lite1@240": (1, 240), "lite2@260": (2, 260)}
CASCADE = "lite0@224>lite2@260 mean"


def _model(variant: int, size: int):
    from stagewise.converters.factory import build_model

    return build_model(ZOO.format(variant), image_size=size)


def derive(base: Path, out: Path, count: int, fraction: float, mode: str, seed: int, calib, images) -> Path:
    """The first ``count`` focus steps of ``base`` with patches of ``fraction``, chosen by ``mode``,
    recalibrated on ``images`` (the calibration half) with the same engine as the converter."""
    from stagewise.bundle import read_bundle, update_manifest, write_bundle
    from stagewise.runtimes import load
    from stagewise.runtimes.calibrate import calibrate_manifest

    bundle = read_bundle(base)
    doc = bundle.manifest.to_dict()
    stages = doc["stages"][:count + 1]
    for stage in stages[1:]:
        stage["input"].update(count=count, patch_fraction=fraction)
    doc.update(stages=stages, name=out.name, default_operating_point="full",
               operating_points=[{"name": "full", "thresholds": [None] * len(stages), "goal": {"kind": "full"}}])
    doc.pop("calibration", None)
    files = {f["path"]: bundle.root / f["path"] for s in stages for a in s["artifacts"].values() for f in a["files"]}
    write_bundle(out, doc, files, overwrite=True)
    with load(out, runtime="onnxruntime", threads=1) as cascade:
        cascade.choose_patches(mode, seed)
        update_manifest(out, lambda m, root: calibrate_manifest(cascade, m, images, calib.targets, calib.origin,
                                                                default_drop=0.005, model_root=root))
    return out


def paired(cam: list, random: list, targets: np.ndarray) -> dict:
    """Top-1 of CAM and random patches on the same images, the images only one of them gets right, and the
    two-sided exact binomial (McNemar) p-value of that split."""
    from scipy.stats import binomtest

    right_cam = np.array([p.label for p in cam]) == targets
    right_random = np.array([p.label for p in random]) == targets
    only_cam, only_random = int((right_cam & ~right_random).sum()), int((right_random & ~right_cam).sum())
    p_value = binomtest(only_cam, only_cam + only_random).pvalue if only_cam + only_random else 1.0
    return {"cam": float(right_cam.mean()), "random": float(right_random.mean()), "only_cam": only_cam,
            "only_random": only_random, "p_value": float(p_value)}


def distinct_points(manifest) -> list[tuple[str, list[str]]]:
    """The operating points with distinct thresholds (``full`` first), each with the names of the others
    that share its thresholds (the calibration often picks the same thresholds for several goals)."""
    groups: dict[tuple, list[str]] = {}
    for p in sorted(manifest.operating_points, key=lambda p: p.name != "full"):
        groups.setdefault(p.thresholds, []).append(p.name)
    return [(names[0], names[1:]) for names in groups.values()]


def markdown(result: dict) -> str:
    """The docs/benchmarks.md section of a result."""
    d = result["data"]
    lines = [f"n = {d['test']} test images (top-1, exits, latency); {d['calibration']} other images calibrated the "
             f"thresholds and chose the patch size ({result['patch_fraction']:g} of the glance view's shorter side, "
             f"from {', '.join(f'{f:g}' for f in result['fractions'])}; IoU < {result['iou']:g}). ONNX Runtime fp32, "
             f"batch 1, {result['threads']} thread(s), every configuration on every test image round robin; "
             f"{result['machine']['cpu']}, {result['machine']['date'][:10]}. No fine-tuning: the focus network is "
             "the ImageNet Lite0 as it is.", "",
             "| configuration | top-1 % | top-5 % | mean ms | p95 ms | exits per step |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        exits = harness.exit_shares(r["exit_histogram"]) if r["kind"] != "single" else "-"
        name = r["name"] + (f" (= {', '.join(r['same_thresholds_as'])})" if r.get("same_thresholds_as") else "")
        lines.append(f"| {name} | {harness.percent(r['top1'])} | {harness.percent(r['top5'])} | {r['mean_ms']:.2f} "
                     f"| {r['p95_ms']:.2f} | {exits} |")
    lines += ["", "CAM vs random patches, every step run (operating point `full`), test top-1 %:", "",
              "| patches | CAM | random | right only with CAM / only with random | exact McNemar p |",
              "|---|---|---|---|---|"]
    for k, pair in result["cam_vs_random_full"].items():
        lines.append(f"| {k} | {harness.percent(pair['cam'])} | {harness.percent(pair['random'])} | "
                     f"{pair['only_cam']} / {pair['only_random']} | {pair['p_value']:.2f} |")
    lines += ["", "Patch size on the calibration half (3 CAM patches, every step run): " + ", ".join(
        f"{f} → {harness.percent(a)} %" for f, a in result["fraction_choice"].items()) + ".", ""]
    lines += [f"- {line}" for line in result["verdict"]]
    return "\n".join(lines)


def _verdict(rows: list[dict], cam_vs_random: dict) -> list[str]:
    singles = [r for r in rows if r["kind"] == "single"]
    best_single = max(singles, key=lambda r: (r["top1"], -r["mean_ms"]))
    glance = [r for r in rows if r["kind"] == "glance_focus" and "random" not in r["name"]]
    cascade = [r for r in rows if r["kind"] == "cascade"]
    wins = [k for k, p in cam_vs_random.items() if p["cam"] > p["random"]]
    strongest = min(p["p_value"] for p in cam_vs_random.values())
    margins = " / ".join(f"{100 * (p['cam'] - p['random']):+.1f}" for p in cam_vs_random.values())
    out = [f"CAM patches beat random patches at {len(wins)} of {len(cam_vs_random)} patch counts "
           f"({', '.join(wins) or 'none'}) with every step run; on this sample the margins are "
           f"{margins} points and the "
           f"smallest paired p-value is {strongest:.2f}, so the direction is consistent but "
           f"{'significant' if strongest < 0.05 else 'not significant at 5 %'}."]
    beating = [r for r in glance if all(r["top1"] > s["top1"] for s in singles) and r["mean_ms"] < best_single["mean_ms"]]
    if beating:
        best = max(beating, key=lambda r: (r["top1"], -r["mean_ms"]))
        out.append(f"Target met: {best['name']} is more accurate than every single model "
                   f"({harness.percent(best['top1'])} % vs {best_single['name']} {harness.percent(best_single['top1'])} %) "
                   f"at {best['mean_ms']:.1f} ms mean vs {best_single['mean_ms']:.1f} ms.")
    else:
        top = max(glance, key=lambda r: (r["top1"], -r["mean_ms"]))
        out.append(f"Target not met: no glance-and-focus point is more accurate than every single model at a lower mean "
                   f"latency than {best_single['name']} ({harness.percent(best_single['top1'])} %, "
                   f"{best_single['mean_ms']:.1f} ms); the most accurate one, {top['name']}, reaches "
                   f"{harness.percent(top['top1'])} % at {top['mean_ms']:.1f} ms.")
    best_cascade = max(cascade, key=lambda r: (r["top1"], -r["mean_ms"]))
    best_glance = max(glance, key=lambda r: (r["top1"], -r["mean_ms"]))
    cheaper = [r for r in cascade if r["mean_ms"] <= best_glance["mean_ms"]]
    near = max(cheaper, key=lambda r: (r["top1"], -r["mean_ms"])) if cheaper else None
    out.append(f"Against the resolution cascade: the best glance-and-focus point, {best_glance['name']}, reaches "
               f"{harness.percent(best_glance['top1'])} % at {best_glance['mean_ms']:.1f} ms; the best cascade point "
               f"{harness.percent(best_cascade['top1'])} % at {best_cascade['mean_ms']:.1f} ms"
               + (f", and at no more latency the cascade reaches {harness.percent(near['top1'])} % ({near['name']}, "
                  f"{near['mean_ms']:.1f} ms)" if near else "") + ". Patches of one Lite0 that never saw patches add a second look at "
               "the object, while the cascade adds a stronger model (Lite2) at a higher resolution; the paper's gain "
               "comes with a focus network fine-tuned on patches, which this run does not do.")
    return out


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", bundles=NAME, render=True)
    ap.add_argument("--fractions", default="0.5,0.6,0.7,0.8", help="patch sizes to choose from on the calibration half")
    ap.add_argument("--iou", type=float, default=0.3, help="a patch is kept when its IoU with every kept one is below this")
    ap.add_argument("--patches", type=int, default=3, help="the most focus steps")
    ap.add_argument("--patch-seed", type=int, default=0, help="seed of the random patches")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    parts = harness.imagenet_parts(args.data)

    from stagewise.converters.build import build_bundle
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import cascade_plans, glance_focus_plans
    from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS, imagenet_labels
    from stagewise.images import Preprocess
    from stagewise.reports import pareto_plot
    from stagewise.runtimes import load
    from stagewise.runtimes.bench import summarize

    harness.set_threads(torch=args.threads)
    calib, test = parts.calibration, parts.test
    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS))
    labels = imagenet_labels()
    opts = BuildOptions(threads=args.threads, overwrite=True)
    root = args.bundles
    root.mkdir(parents=True, exist_ok=True)
    fractions = [float(f) for f in args.fractions.split(",")]

    bundles: dict[str, tuple[str, Path, str]] = {}  # name -> (kind, path, patch choice)
    for name, (variant, size) in SINGLES.items():
        path = root / f"{name.replace('@', '_')}.swb"
        if not (args.reuse and path.exists()):
            plans = cascade_plans([(name.replace("@", "_"), _model(variant, size), (size, size))])
            build_bundle(path, name, plans, pre, labels, calib, opts, kind="cascade")
        bundles[name] = ("single", path, "cam")
    path = root / "cascade_lite0_224_lite2_260.swb"
    if not (args.reuse and path.exists()):
        plans = cascade_plans([("lite0_224", _model(0, 224), (224, 224)), ("lite2_260", _model(2, 260), (260, 260))],
                              combine="mean_probs")
        build_bundle(path, CASCADE, plans, pre, labels, calib, opts, kind="cascade")
    bundles[CASCADE] = ("cascade", path, "cam")
    base = root / "glance_focus_base"
    if not (args.reuse and base.exists()):
        plans = glance_focus_plans(("glance", _model(0, 224), (224, 224)), (_model(0, 224), (224, 224)),
                                   args.patches, args.iou, fractions[0])
        build_bundle(base, "glance-focus", plans, pre, labels, calib, opts, kind="glance_focus")

    calib_images = harness.decode_all(calib, "decoding calibration images")
    choice = {}
    for f in fractions:
        out = root / f"gf{args.patches}_cam_f{f:g}"
        if not (args.reuse and out.exists()):
            derive(base, out, args.patches, f, "cam", args.patch_seed, calib, calib_images)
        with load(out, runtime="onnxruntime", threads=1) as c:
            choice[f"{f:g}"] = float(c.bundle.manifest.calibration["reference_accuracy"])
    fraction = float(max(choice, key=lambda f: (choice[f], -float(f))))
    print(f"patch size chosen on the calibration half: {fraction:g} ({choice})")
    for k in range(1, args.patches + 1):
        for mode in ("cam", "random"):
            out = root / f"gf{k}_{mode}_f{fraction:g}"
            if not (args.reuse and out.exists()) and not (mode == "cam" and k == args.patches):
                derive(base, out, k, fraction, mode, args.patch_seed, calib, calib_images)
            bundles[f"glance+{k} {mode} patches"] = ("glance_focus", out, mode)

    cascades = {}
    for name, (kind, path, mode) in bundles.items():
        cascades[name] = load(path, runtime="onnxruntime", threads=args.threads)
        cascades[name].choose_patches(mode, args.patch_seed)
    images = harness.decode_all(test, "decoding test images")
    configs, kinds, aliases = {}, {}, {}
    for name, cascade in cascades.items():
        points = [("full", [])] if bundles[name][0] == "single" else distinct_points(cascade.bundle.manifest)
        for point, same in points:
            key = name if bundles[name][0] == "single" else f"{name} @ {point}"
            configs[key] = lambda im, c=cascade, p=point: c.predict(im, operating_point=p)
            kinds[key] = (bundles[name][0], len(cascade.stage_names))
            aliases[key] = same
    runs = harness.round_robin(configs, images, describe=f"timing {len(configs)} configurations").outputs
    rows = [summarize(key, kinds[key][0], runs[key], test.targets, kinds[key][1]) for key in configs]
    for r in rows:
        r["mean_steps_run"] = float(np.mean([len(p.trace) for p in runs[r["name"]]]))
        r["same_thresholds_as"] = aliases[r["name"]]
    full = {str(k): paired(runs[f"glance+{k} cam patches @ full"], runs[f"glance+{k} random patches @ full"],
                           test.targets) for k in range(1, args.patches + 1)}
    verification = cascades[f"glance+{args.patches} cam patches"].bundle.manifest.stages[0].artifacts["onnx"].verification
    result = {
        **harness.metadata(NAME), "runtime": "onnxruntime", "threads": args.threads, "batch": 1,
        "data": {"archive": str(parts.archive), "calibration": len(calib), "test": len(test), "split": parts.split},
        "fractions": fractions, "fraction_choice": choice, "patch_fraction": fraction, "iou": args.iou,
        "patch_seed": args.patch_seed, "fine_tuned": False,
        "glance_cam_vs_torch": {"max_abs_diff": dict(verification["max_abs_diff"]), "n": verification["n"]},
        "rows": rows, "cam_vs_random_full": full, "verdict": _verdict(rows, full),
    }
    harness.save(result, args.out)
    for c in cascades.values():
        c.close()
    plot_rows = [dict(r, series=r["name"].split(" @ ")[0], short=r["name"].split(" @ ")[-1], kind="cascade")
                 if r["kind"] != "single" else dict(r, series="single models", short=r["name"]) for r in rows]
    pareto_plot({"rows": plot_rows, "runtime": "onnxruntime", "n": len(test), "bundle": "ImageNet sample, glance and focus"},
                args.out.with_suffix(".png"))
    for r in rows:
        print(f"{r['name']:44s} top1 {100 * r['top1']:5.1f}  mean {r['mean_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f} ms  "
              f"exits {r['exit_histogram']}")
    for line in result["verdict"]:
        print(line)


if __name__ == "__main__":
    main()
