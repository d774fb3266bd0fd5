"""Runtime overhead (issues #12, #27): what the executor costs outside the backend calls, and cold start.

Two bundles with pixel input (uint8 NHWC, normalisation inside the stage models), on ONNX
Runtime, one thread:

* the ImageNet cascade of ``stagewise demo`` (EfficientNet-Lite0@224 -> Lite2@260, mean
  probabilities), built from the zoo on the packaged demo images, fed the demo images resized
  to 500x375 (the size the targets are stated for) -- twice: resized by Pillow (the default,
  antialiased) and by OpenCV (``--resizer opencv``), each bundle calibrated with its own resizer;
* a CIFAR-10 early-exit ResNet (cuts layer1, layer2) built on a share of the CIFAR-10 archive,
  fed 32x32 test images (already at the stage size: no resize, no copy), in fp32 and in INT8.

Measured round robin, image by image, at the ``full`` operating point (every stage runs):

* ``cascade``: ``Cascade.predict`` on the decoded image;
* ``raw``: the same backend sessions called directly on ready stage tensors (``session.run``);
* ``bound``: the same stages through the executor's ONNX Runtime runners alone (IO binding, carries
  kept in ONNX Runtime's buffers), on the same ready tensors;
* ``prep``: the stages' input preparation alone (crop-box resize; pixels as they are);
* ``null``: ``Cascade.predict`` with do-nothing sessions that return recorded outputs, so
  what it takes is the executor's own work plus input preparation, without backend noise.

Per stage, paired image by image (the four runs of one image follow each other): executor
overhead = median of (``null`` - ``prep``) / stages; on the real backend, median of
(``cascade`` - ``raw`` - ``prep``) / stages (noisier: a difference of large numbers).
Cold start: ``import stagewise`` + ``load`` of the ``.swb`` + first prediction, in fresh
processes, with an empty and with a warm model cache (medians of ``--repeats``), for both
resizers (OpenCV's import is part of the OpenCV bundle's load). With the ImageNet sample, the two
resizers are also compared on its 500 test images: each stage's top-1 and how often the two
resizers' answers agree.

    python -m benchmarks.runtime_overhead --data /work/shared/data
    python -m benchmarks.runtime_overhead --render --into docs/benchmarks.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import harness
from stagewise.runtimes.base import StageSession

NAME = "runtime_overhead"
SIZE = (375, 500)  # height, width of the ImageNet inputs (500x375)
COLD = """
import time, sys
t0 = time.perf_counter()
import stagewise
t1 = time.perf_counter()
cascade = stagewise.load(sys.argv[1], runtime="onnxruntime", threads=1)
t2 = time.perf_counter()
import numpy as np
cascade.predict(np.load(sys.argv[2]))
t3 = time.perf_counter()
print((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, all(s.session.loaded_from_cache for s in cascade._stages))
"""


def imagenet_bundle(out: Path, threads: int, resizer: str) -> Path:
    """The demo cascade (as ``stagewise demo`` builds it) resizing with ``resizer``, calibrated on half
    of the demo images."""
    if out.exists():
        return out
    from stagewise.converters.build import build_bundle
    from stagewise.converters.factory import build_model
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import cascade_plans
    from stagewise.converters.zoo import EFFICIENTNET_LITE_PREPROCESS, imagenet_labels
    from stagewise.datasets import open_image_set
    from stagewise.demo import STAGES, demo_images
    from stagewise.images import Preprocess

    calibration, _ = open_image_set(demo_images()).split([0.5, 0.5], seed=0)
    plans = cascade_plans([(name, build_model(spec, image_size=size), (size, size)) for name, spec, size in STAGES],
                          combine="mean_probs")
    pre = Preprocess.from_manifest(dict(EFFICIENTNET_LITE_PREPROCESS, resizer=resizer))
    return build_bundle(out, "effnet-lite-cascade", plans, pre,
                        imagenet_labels(), calibration, BuildOptions(threads=threads), kind="cascade")


def cifar_bundle(out: Path, parts: harness.Parts, threads: int, int8: bool = False) -> Path:
    """A CIFAR-10 early-exit ResNet (heads on 2,000 train images, calibrated on 500), in INT8 with ``int8``; a
    bundle left by an earlier run is reused when its stages decide in their graphs (else it is built again)."""
    if out.exists() and decides(out):
        return out
    from stagewise.converters.build import build_bundle
    from stagewise.converters.heads import HeadTraining
    from stagewise.converters.options import BuildOptions
    from stagewise.converters.plans import early_exit_plans
    from stagewise.images import Preprocess

    example = harness.example_module("cifar10")
    pre = Preprocess(mean=example.MEAN, std=example.STD, resize="stretch", crop_fraction=1.0)
    plans = early_exit_plans(example.resnet_cifar(), ["layer1", "layer2"], pre, (32, 32),
                             harness.subset(parts.train, 2000, seed=0), HeadTraining())
    return build_bundle(out, "cifar10-resnet-ee", plans, pre, parts.images.classes,
                        harness.subset(parts.calibration, 500, seed=0),
                        BuildOptions(threads=threads, int8=int8, overwrite=True))


def decides(path: Path) -> bool:
    """Whether every ONNX stage of the bundle at ``path`` outputs its exit decision (a bundle of this version)."""
    from stagewise.bundle import read_bundle

    bundle = read_bundle(path)
    try:
        return all(stage.artifacts["onnx"].decision is not None for stage in bundle.manifest.stages)
    finally:
        bundle.close()


class Recorded(StageSession):
    """A do-nothing session: returns one recorded output of the real stage (its exit decision included where the
    real one has it), whatever the input."""

    def __init__(self, outputs: dict[str, np.ndarray], decides: bool):
        self.outputs = outputs
        self.decides = decides

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        return self.outputs


def measure(path: Path, images: list[np.ndarray], threads: int) -> dict:
    """Round robin of ``cascade``, ``raw``, ``prep`` and ``null`` on ``images`` for the bundle at ``path``."""
    from stagewise.runtimes import Cascade, load
    from stagewise.runtimes.bench import ready_inputs

    cascade = load(path, runtime="onnxruntime", threads=threads)
    router = cascade.router
    stages = cascade._stages
    sessions = [st.session._session for st in stages]
    tensors = {id(im): ready_inputs(cascade, im) for im in images}

    # the plain chain fetches what a caller of the same artifacts reads (logits, carry: not the exit decision, whose
    # two more outputs cost the chain, not predict, a copy each) and feeds the decision's inverse temperature
    fetches = [list(st.io.outputs) for st in stages]
    feeds = [dict(st.io.feeds) for st in stages]

    names = [st.io.input for st in stages]

    def raw(image: np.ndarray) -> None:
        for session, fetch, extra, name, x in zip(sessions, fetches, feeds, names, tensors[id(image)]):
            session.run(fetch, {name: x, **extra})

    bindings = [st.session.runner() for st in stages]

    def bound(image: np.ndarray) -> None:  # the same stages through IO binding, carries kept in ONNX Runtime
        outs = []
        for k, runner in enumerate(bindings):
            feeder = router.carry_from(k)
            x = tensors[id(image)][k] if feeder is None else outs[feeder][router.carry_outputs[feeder]]
            outs.append(runner.run(x))

    def prep(image: np.ndarray) -> None:
        for k in range(len(stages)):
            if router.reads_image(k):
                router.input(k, [image], None)

    recorded = [Recorded({name: v.copy() for name, v in runner.run(x).items()}, st.decision is not None)
                for st, runner, x in zip(stages, bindings, tensors[id(images[0])])]
    null = Cascade(cascade.bundle, recorded, "onnxruntime", threads)
    runners = {"cascade": lambda im: cascade.predict(im, operating_point="full"), "raw": raw, "bound": bound,
               "prep": prep, "null": lambda im: null.predict(im, operating_point="full")}
    timing = harness.round_robin(runners, images, warmup=3, describe=f"timing {path.name}", rotate=True)
    per_stage_prep = {}
    for k, st in enumerate(stages):
        if router.reads_image(k):
            per_stage_prep[st.name] = float(np.median([_timed(lambda: router.input(k, [im], None)) for im in images]))
    per_stage_raw = {st.name: float(np.median([_timed(lambda: s.run(fetches[k], {names[k]: tensors[id(im)][k],
                                                                                  **feeds[k]}))
                                               for im in images]))
                     for k, (st, s) in enumerate(zip(stages, sessions))}
    medians = timing.medians()
    ms = {name: np.asarray(values) for name, values in timing.ms.items()}
    n = len(stages)
    cascade.close()
    return {"bundle": path.name, "resizer": cascade.preprocess.resizer, "stages": [st.name for st in stages],
            "graph_decisions": [st.decision is not None for st in stages],
            "images": len(images), "input": f"{images[0].shape[1]}x{images[0].shape[0]}", "median_ms": medians,
            "overhead_us_per_stage_null": float(np.median(ms["null"] - ms["prep"])) * 1e3 / n,
            "overhead_us_per_stage_real": float(np.median(ms["cascade"] - ms["raw"] - ms["prep"])) * 1e3 / n,
            "overhead_us_per_stage_real_ci95": median_interval((ms["cascade"] - ms["raw"] - ms["prep"]) * 1e3 / n),
            "overhead_us_per_stage_over_bound": float(np.median(ms["cascade"] - ms["bound"] - ms["prep"])) * 1e3 / n,
            "prep_ms": per_stage_prep, "backend_ms": per_stage_raw,
            "prep_share": {name: per_stage_prep[name] / per_stage_raw[name] for name in per_stage_prep}}


def median_interval(values: np.ndarray, resamples: int = 2000) -> list[float]:
    """A 95 % bootstrap interval (percentile, seeded) of the median of ``values`` (``scipy.stats.bootstrap``)."""
    from scipy.stats import bootstrap

    ci = bootstrap((values,), np.median, n_resamples=resamples, confidence_level=0.95, method="percentile",
                   random_state=0).confidence_interval
    return [float(ci.low), float(ci.high)]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cold_start(path: Path, image: np.ndarray, repeats: int) -> dict:
    """Fresh processes: ``import stagewise``, ``load`` and the first prediction, with an empty and a warm cache."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="stagewise-cold-") as tmp:
        picture = Path(tmp) / "image.npy"
        np.save(picture, image)
        for state in ("empty cache", "warm cache"):
            runs = []
            for r in range(repeats):
                env = dict(os.environ, STAGEWISE_CACHE_DIR=str(Path(tmp) / ("cache" if state == "warm cache" else f"c{r}")))
                line = subprocess.run([sys.executable, "-c", COLD, str(path), str(picture)], env=env, check=True,
                                      capture_output=True, text=True).stdout.split()
                runs.append([float(v) for v in line[:3]] + [line[3] == "True"])
            if state == "warm cache":
                runs = runs[1:] if repeats > 1 else runs  # the first run fills the cache
            out[state] = {"import_ms": float(np.median([r[0] for r in runs])),
                          "load_ms": float(np.median([r[1] for r in runs])),
                          "first_prediction_ms": float(np.median([r[2] for r in runs])),
                          "total_ms": float(np.median([sum(r[:3]) for r in runs])),
                          "from_cache": all(r[3] for r in runs), "runs": len(runs)}
    return out


def resizer_agreement(pillow: Path, opencv: Path, test, threads: int) -> dict:
    """Each stage's top-1 on ``test`` with either resizer, and how often the two resizers agree."""
    from stagewise.runtimes import load

    images = harness.decode_all(test, "decoding ImageNet test images")
    targets = np.asarray(test.targets)
    logits = {}
    for resizer, path in (("pillow", pillow), ("opencv", opencv)):
        with load(path, runtime="onnxruntime", threads=threads) as cascade:
            names = cascade.stage_names
            logits[resizer] = [x.argmax(1) for x in cascade.stage_logits(images)]
    return {"images": len(images), "stages": {
        name: {"top1_pillow": float(np.mean(logits["pillow"][k] == targets)),
               "top1_opencv": float(np.mean(logits["opencv"][k] == targets)),
               "agreement": float(np.mean(logits["pillow"][k] == logits["opencv"][k]))}
        for k, name in enumerate(names)}}


def markdown(result: dict) -> str:
    lines = ["## Runtime overhead (issue #12): pixel input, one resize per stage, cold start", "",
             f"Measured {result['machine']['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, "
             f"shared with other jobs; load average {result['load_average'][0]:.1f} when it started), ONNX Runtime, "
             f"1 thread. Command: `{result['command']}`.", "",
             "| bundle | resizer | input | stages (deciding in the graph) | cascade ms | raw backend ms | prep ms | "
             "executor overhead per stage (null backend) | same on the real backend [95 % interval] | over the "
             "IO-bound chain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["bundles"]:
        m, ci = r["median_ms"], r["overhead_us_per_stage_real_ci95"]
        decided = sum(r.get("graph_decisions", []))
        lines.append(f"| {r['bundle']} | {r['resizer']} | {r['input']} | {len(r['stages'])} ({decided}) | "
                     f"{m['cascade']:.2f} | "
                     f"{m['raw']:.2f} | "
                     f"{m['prep']:.3f} | {r['overhead_us_per_stage_null']:.0f} µs | "
                     f"{r['overhead_us_per_stage_real']:.1f} µs [{ci[0]:.1f}, {ci[1]:.1f}] | "
                     f"{r['overhead_us_per_stage_over_bound']:.1f} µs |")
    lines += ["", "Input preparation (crop-box resize; the pixels go to the model as they are) against the stage's "
              "backend time:", "", "| bundle | resizer | stage | prep ms | backend ms | prep / backend |",
              "|---|---|---|---|---|---|"]
    for r in result["bundles"]:
        for name, share in r["prep_share"].items():
            lines.append(f"| {r['bundle']} | {r['resizer']} | {name} | {r['prep_ms'][name]:.3f} | "
                         f"{r['backend_ms'][name]:.2f} | {100 * share:.1f} % |")
    agreement = result.get("resizer_agreement")
    if agreement:
        lines += ["", f"Pillow against OpenCV resizing, on the {agreement['images']} test images of the ImageNet "
                  "sample (each stage alone):", "", "| stage | top-1 Pillow | top-1 OpenCV | same answer |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {100 * a['top1_pillow']:.1f} % | {100 * a['top1_opencv']:.1f} % | "
                  f"{100 * a['agreement']:.1f} % |" for name, a in agreement["stages"].items()]
    lines += ["", "Cold start (fresh process: `import stagewise` + `load` + first prediction, medians):", "",
              "| bundle | model cache | import ms | load ms | first prediction ms | total ms |", "|---|---|---|---|---|---|"]
    for bundle, states in result["cold_start"].items():
        for state, c in states.items():
            lines.append(f"| {bundle} | {state} | {c['import_ms']:.0f} | {c['load_ms']:.0f} | "
                         f"{c['first_prediction_ms']:.0f} | {c['total_ms']:.0f} |")
    fast = next(r for r in result["bundles"] if r["resizer"] == "opencv")
    first = fast["stages"][0]
    int8 = next(r for r in result["bundles"] if r["bundle"].endswith("-int8.swb"))
    checks = [("executor overhead per stage (null backend, worst bundle)",
               max(r["overhead_us_per_stage_null"] for r in result["bundles"]), 5, "µs"),
              ("predict over the plain session.run chain per stage, CIFAR-10 INT8",
               int8["overhead_us_per_stage_real"], 5, "µs"),
              ("outside the backend and the resize per stage (real backend, worst bundle)",
               max(r["overhead_us_per_stage_real"] for r in result["bundles"]), 50, "µs"),
              (f"input preparation / backend, {first} on {fast['input']}, OpenCV resizer",
               100 * fast["prep_share"][first], 5, "%"),
              ("cold start with a warm cache (worst bundle)",
               max(states["warm cache"]["total_ms"] for states in result["cold_start"].values()), 1000, "ms")]
    lines += ["", "| target | reached | goal | met |", "|---|---|---|---|"]
    lines += [f"| {what} | {value:.1f} {unit} | ≤ {goal} {unit} | {'yes' if value <= goal else 'no'} |"
              for what, value, goal, unit in checks]
    lines += ["", "Timings on a shared machine: the backend times (and so the ratios) move with the load of the "
              "other jobs. The real-backend overhead column is a difference of two noisy medians of much larger "
              "numbers; the null-backend column measures the executor alone. Input preparation is one "
              "`PIL.Image.resize(box=...)` call (bilinear, antialiased) per image stage with Pillow, one "
              "`cv2.resize` of the whole-pixel box (after `cv2.pyrDown` halvings for boxes at least twice the "
              "stage size; none here) with OpenCV, which runs with one thread here (`cv2.setNumThreads(1)`); "
              "`load` includes importing numpy, jsonschema, ONNX Runtime (and OpenCV for its bundle), opening "
              "the `.swb`, creating the sessions and one warm-up backend call per stage."]
    return "\n".join(lines)


def main() -> None:
    ap = harness.parser(__doc__, f"{NAME}.json", bundles=NAME, render=True, limit=40)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per cold-start state (default 3)")
    args = ap.parse_args()
    if harness.render_only(args, NAME, markdown):
        return
    from PIL import Image

    from stagewise.datasets import open_image_set
    from stagewise.demo import demo_images

    import cv2

    cv2.setNumThreads(1)
    args.bundles.mkdir(parents=True, exist_ok=True)
    parts = harness.cifar10_parts(args.data)
    imagenet = {resizer: imagenet_bundle(args.bundles / f"effnet-lite-cascade-{resizer}.swb", args.threads, resizer)
                for resizer in ("pillow", "opencv")}
    cifar = cifar_bundle(args.bundles / "cifar10-resnet-ee.swb", parts, args.threads)
    cifar8 = cifar_bundle(args.bundles / "cifar10-resnet-ee-int8.swb", parts, args.threads, int8=True)
    demo = open_image_set(demo_images())
    pictures = [np.asarray(Image.fromarray(demo.image(i)).resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR))
                for i in range(min(args.limit, len(demo)))]
    tests = [parts.test.image(i) for i in range(args.limit)]
    result = harness.metadata(NAME)
    result["load_average"] = os.getloadavg()
    result["bundles"] = [measure(imagenet["pillow"], pictures, args.threads),
                         measure(imagenet["opencv"], pictures, args.threads), measure(cifar, tests, args.threads),
                         measure(cifar8, tests, args.threads)]
    result["resizer_agreement"] = resizer_agreement(imagenet["pillow"], imagenet["opencv"],
                                                    harness.imagenet_parts(args.data).test, args.threads)
    result["cold_start"] = {path.name: cold_start(path, pictures[0], args.repeats) for path in imagenet.values()}
    harness.save(result, args.out)
    print(json.dumps({k: result[k] for k in ("bundles", "resizer_agreement", "cold_start")}, indent=1, default=str))
    harness.publish(args, NAME, markdown(result))


if __name__ == "__main__":
    main()
