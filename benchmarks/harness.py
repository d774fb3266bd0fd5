"""What every benchmark script shares: data, splits, arguments, threads, round-robin timing, result files, markdown.

A benchmark script keeps only what it measures; it takes from here

* where the real data is (:data:`DEFAULT_DATA`, ``../shared/data`` next to the repository) and
  :func:`require_data`, which skips the benchmark with a clear message (exit status 0) when an
  archive is absent;
* the standard splits the published tables were measured on (:func:`cifar10_parts`,
  :func:`imagenet_parts`, :func:`subset`);
* the common argument parser (:func:`parser`) and :func:`set_threads`;
* :func:`round_robin`: several runners on the same inputs, input by input, so machine noise
  hits them alike, with per-runner medians and ratios (:class:`Timing`);
* :func:`metadata` (benchmark, machine, date, command) for every result file, :func:`save`
  (JSON under ``benchmarks/results/``) and :func:`write_section` / :func:`render_only`
  (markdown of a result into its section of ``docs/benchmarks.md``).

Run a benchmark from the repository root as ``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np

from stagewise.machine import cpu_record, cpu_summary

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
RESULTS = REPO_ROOT / "benchmarks" / "results"
RUNS = REPO_ROOT / "runs"
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
CIFAR10 = "cifar10-train.tar.gz"
IMAGENET = "imagenet-sample-320.tar"


# ---- data and splits ------------------------------------------------------------------------

def skip_message(path: Path) -> str:
    """The message a benchmark prints when the real data at ``path`` is absent."""
    return (f"SKIPPED: {path} not found. This benchmark needs the real data set {Path(path).name} from the "
            f"project's shared data folder (../shared/data next to the repository, or pass --data DIR).")


def require_data(folder: Path, name: str) -> Path:
    """The archive ``name`` under ``folder``; exits with :func:`skip_message` (status 0: skipped) if absent."""
    path = Path(folder) / name
    if not path.exists():
        print(skip_message(path), file=sys.stderr)
        sys.exit(0)
    return path


@dataclass(frozen=True)
class Parts:
    """A data set opened from its archive and split the way the published tables were measured."""

    archive: Path
    images: Any
    """Every image (a :class:`stagewise.datasets.ImageSet`)."""
    train: Any | None
    calibration: Any
    test: Any
    split: str
    """How the parts were drawn, as written into result files."""


CIFAR10_SPLIT = "stratified 0.8/0.1/0.1 seed 0"
IMAGENET_SPLIT = "random halves, seed 0 (one image per class)"


def cifar10_parts(folder: Path) -> Parts:
    """CIFAR-10 training archive, stratified with seed 0 into 80% train / 10% calibration / 10% test."""
    from stagewise.datasets import open_image_set

    archive = require_data(folder, CIFAR10)
    images = open_image_set(archive)
    train, calibration, test = images.split([0.8, 0.1, 0.1], seed=0)
    return Parts(archive, images, train, calibration, test, CIFAR10_SPLIT)


def imagenet_parts(folder: Path) -> Parts:
    """The 1,000-image ImageNet sample split with seed 0 into calibration and test halves."""
    from stagewise.datasets import open_image_set

    archive = require_data(folder, IMAGENET)
    images = open_image_set(archive)
    calibration, test = images.split([0.5, 0.5], seed=0)
    return Parts(archive, images, None, calibration, test, IMAGENET_SPLIT)


def subset(images, limit: int | None, seed: int):
    """A seeded stratified share of at most ``limit`` of ``images`` (all of them without a smaller limit)."""
    return images.split([limit / len(images)], seed=seed)[0] if limit and limit < len(images) else images


def decode_all(images, describe: str) -> list[np.ndarray]:
    """Decode every image of an ImageSet once (timing loops then see only arrays)."""
    from stagewise.progress import progress_bar

    return [images.image(i) for i in progress_bar(range(len(images)), describe)]


def example_module(folder: str) -> ModuleType:
    """``examples/<folder>/model.py`` as a module of its own (both CIFAR-10 examples name it model.py)."""
    name = f"_example_{folder}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- arguments and threads ------------------------------------------------------------------

OPTIONS: dict[str, tuple[type, str]] = {
    "head_images": (int, "train images used to fit the exit heads"),
    "test_limit": (int, "report on a seeded subset of this many test images (quicker, noisier)"),
    "timing_images": (int, "test images timed at batch 1 (accuracy always uses every test image)"),
    "limit": (int, "use only this many images (quick runs)"),
    "parts": (str, "comma-separated parts to measure"),
    "cuts": (str, "comma-separated cut points"),
    "cifar_weights": (Path, "CIFAR-10 ResNet weights (default: the committed examples/cifar10 weights)"),
}
"""The options several benchmarks share: name -> (type, help). Pass ``name=default`` to :func:`parser`."""


def parser(doc: str, out: str | None = None, *, bundles: str | None = None, render: bool = False,
           threads: int | None = 1, **options: Any) -> argparse.ArgumentParser:
    """The argument parser of a benchmark whose docstring is ``doc``.

    Every benchmark takes ``--data`` and (unless ``threads`` is None) ``--threads``; ``out`` (a file name under
    ``benchmarks/results/``) adds ``--out``; ``bundles`` (a folder name under ``runs/``) adds
    ``--bundles`` and ``--reuse``; ``render`` adds the render-only ``--render`` and ``--into``;
    each keyword of :data:`OPTIONS` adds that option with the given default.
    """
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="folder holding the real data archives (default: ../shared/data next to the repository)")
    if out is not None:
        ap.add_argument("--out", type=Path, default=RESULTS / out, help=f"result file (default: benchmarks/results/{out})")
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help=f"intra-op threads (default {threads})")
    if bundles is not None:
        ap.add_argument("--bundles", type=Path, default=RUNS / bundles, help=f"where bundles are built (default: runs/{bundles})")
        ap.add_argument("--reuse", action="store_true", help="load bundles already under --bundles instead of rebuilding")
    if render:
        ap.add_argument("--render", type=Path, nargs="*", default=None, metavar="RESULT",
                        help="do not measure: print the markdown of these result files (default: --out)")
        ap.add_argument("--into", type=Path, default=None, metavar="DOC",
                        help="also write the markdown into its section of DOC (e.g. docs/benchmarks.md)")
    for name, default in options.items():
        kind, text = OPTIONS[name]
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                        help=text if default is None else f"{text} (default {default})")
    return ap


def set_threads(torch: int | None = None, tensorflow: int | None = None) -> None:
    """Intra-op threads of PyTorch and of TensorFlow (whose inter-op pool is then 1 thread)."""
    if torch is not None:
        import torch as _torch

        _torch.set_num_threads(torch)
    if tensorflow is not None:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(tensorflow)
        tf.config.threading.set_inter_op_parallelism_threads(1)


# ---- round-robin timing -------------------------------------------------------------------------

def ort_session(path: Path, threads: int = 1) -> Any:
    """A CPU ONNX Runtime session with fixed threads (for timing single exported models)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def timed_call(fn: Callable[[Any], Any], x: Any) -> tuple[Any, float]:
    """``fn(x)`` and its wall time in milliseconds."""
    t0 = time.perf_counter()
    out = fn(x)
    return out, (time.perf_counter() - t0) * 1e3


@dataclass
class Timing:
    """What :func:`round_robin` measured: each runner's outputs and wall times (ms), warm-up excluded."""

    outputs: dict[Hashable, list]
    ms: dict[Hashable, list[float]]

    def medians(self) -> dict[Hashable, float]:
        """Median milliseconds of each runner."""
        return {name: float(np.median(ms)) for name, ms in self.ms.items()}

    def ratios(self, reference: Hashable) -> dict[Hashable, float]:
        """Each runner's median time over ``reference``'s (below 1: faster than the reference)."""
        medians = self.medians()
        return {name: m / medians[reference] for name, m in medians.items()}


def round_robin(runners: dict[Hashable, Callable[[Any], Any]], inputs: Iterable[Any], warmup: int = 0,
                describe: str | None = None, rotate: bool = False) -> Timing:
    """Every runner on every input, input by input (so machine noise hits all alike), timed.

    The first ``warmup`` inputs run through every runner untimed (their outputs are not kept).
    ``rotate``: the runner that goes first moves on by one each input (the first after another model
    finds colder caches; without rotation that always costs the same runner).
    """
    from stagewise.progress import progress_bar

    inputs = list(inputs)
    outputs: dict[Hashable, list] = {name: [] for name in runners}
    ms: dict[Hashable, list[float]] = {name: [] for name in runners}
    order = list(runners.items())
    for i, x in enumerate(progress_bar(inputs, describe or f"timing {len(runners)} configurations")):
        shift = i % len(order) if rotate else 0
        for name, run in order[shift:] + order[:shift]:
            out, t = timed_call(run, x)
            if i >= warmup:
                outputs[name].append(out)
                ms[name].append(t)
    return Timing(outputs, ms)


# ---- result files and markdown --------------------------------------------------------------------

def machine() -> dict:
    """What the numbers were measured on, and when: the CPU with its INT8-relevant extensions
    (:func:`stagewise.machine.cpu_record`: VNNI or not changes INT8 speed by up to 2x)."""
    cpu = cpu_record()
    return {"cpu": cpu["model"], "cores": os.cpu_count(), "cpu_features": cpu["features"], "summary": cpu_summary(),
            "python": platform.python_version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def command(name: str, argv: Sequence[str] | None = None) -> str:
    """The command line that reproduces a run of benchmark ``name`` with ``argv`` (default: this process's)."""
    return " ".join(["python -m benchmarks." + name, *(sys.argv[1:] if argv is None else argv)])


def metadata(name: str, argv: Sequence[str] | None = None) -> dict:
    """The head of every result file: the benchmark, the machine and date, the command."""
    return {"benchmark": name, "machine": machine(), "command": command(name, argv)}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return o.item() if isinstance(o, np.generic) else float(o)


def save(result: dict, path: Path, markdown: Callable[[dict], str] | None = None) -> Path:
    """Write ``result`` as JSON (numpy values converted) and, with ``markdown``, its tables beside it (.md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_json_default))
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {path}")
    return path


def load_result(path: Path) -> dict:
    """A result file written by :func:`save`."""
    return json.loads(Path(path).read_text())


def percent(x: float) -> str:
    """A share as a percentage with two decimals, for tables."""
    return f"{100 * x:.2f}"


def exit_shares(histogram: Sequence[int]) -> str:
    """An exit histogram as the share of images leaving at each stage ("62% / 38%")."""
    total = sum(histogram) or 1
    return " / ".join(f"{100 * h / total:.0f}%" for h in histogram)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"


def write_section(doc: Path, name: str, text: str) -> None:
    """Put ``text`` into the section of ``doc`` between the markers of ``name``; append it (with markers) if absent."""
    start, end = _markers(name)
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = doc.read_text() if doc.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old, count=1) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    doc.write_text(new)
    print(f"wrote section {name} of {doc}")


def render_only(args: argparse.Namespace, name: str, markdown: Callable[[dict], str], header: str = "") -> bool:
    """With ``--render``: print (and with ``--into`` write) the markdown of the result files; whether it did.

    The section is ``header`` followed by ``markdown`` of each result file in turn.
    """
    if args.render is None:
        return False
    publish(args, name, header + "\n".join(markdown(load_result(p)) for p in args.render or [args.out]))
    return True


def publish(args: argparse.Namespace, name: str, text: str) -> None:
    """Print the markdown ``text`` of benchmark ``name`` and, with ``--into``, write it into its section there."""
    print(text)
    if args.into is not None:
        write_section(args.into, name, text)
