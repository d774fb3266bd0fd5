"""The ``stagewise`` command line."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import traceback
from pathlib import Path

from typing import Any

import click
import numpy as np

from .errors import StagewiseError, unknown_choice
from .exits import COMBINES, SCORES
from .formats import FORMATS
from .runtimes.base import RUNTIMES


class _Finite(click.FloatRange):
    """A float range that also refuses NaN and infinities (click's own lets NaN through)."""

    name = "finite number"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class _Choice(click.Choice):
    """click's Choice whose refusal names the choice a near miss was meant to be (``--score margn``)."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(unknown_choice("choice", value, self.choices), param, ctx)


def _load(bundle: str, backend: str, threads: int | None, device: str = "CPU", trusted_keys: tuple = (),
          require_device: bool = False):
    from .runtimes import load

    return load(bundle, runtime=backend, threads=threads, device=device, trusted_keys=list(trusted_keys) or None,
                require_device=require_device)


backend_option = click.option("--runtime", "--backend", "backend", default="auto", show_default=True,
                              help=f"runtime: {', '.join(RUNTIMES)}, auto, or a preference order "
                                   "such as openvino,onnxruntime (--backend is the old name)")
device_option = click.option("--device", default="CPU", show_default=True,
                             help="device for the runtime: CPU, or with OpenVINO also GPU, NPU, AUTO")
require_device_option = click.option("--require-device", is_flag=True,
                                     help="fail instead of running a stage that the runtime put elsewhere than --device "
                                          "(a silent fallback to the CPU)")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="intra-op threads of the runtime")
patches_option = click.option("--patches", "patch_mode", type=click.Choice(["cam", "random"]), default="cam",
                               show_default=True,
                               help="glance and focus: patches chosen from the CAM, or at random (same size and count, "
                                    "seeded by --patch-seed) for the ablation")
patch_seed_option = click.option("--patch-seed", type=int, default=0, show_default=True, help="seed of --patches random")
trusted_key_option = click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path),
                                  help="Ed25519 public key (PEM); the bundle must be signed by one (repeat for more)")


@click.group()
@click.version_option(package_name="stagewise")
@click.option("--debug", is_flag=True, help="show the full traceback of an error")
def cli(debug: bool) -> None:
    """stagewise: image classifiers as sequences of stages that stop early."""


class _RequestOption(click.Option):
    """An option of ``convert`` that is an option of the conversion request: its help shows the request's
    default (:func:`stagewise.converters.request.option_default`, read when the help is shown, so that other
    commands import no converter), and a value left out reaches the request as ``None``."""

    def get_help_extra(self, ctx: click.Context) -> dict:
        extra = super().get_help_extra(ctx)
        from .converters.request import option_default

        default = option_default(self.name)
        if isinstance(default, bool):
            if self.secondary_opts:  # --int8/--no-int8 shows the one that is the default
                extra["default"] = (self.opts if default else self.secondary_opts)[0].lstrip("-")
        elif default not in (None, (), ""):
            extra["default"] = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        return extra


def _request_option(*decls: str, **attrs: Any):
    return click.option(*decls, cls=_RequestOption, **attrs)


@cli.command()
@click.argument("model", required=False)
@_request_option("--stage", "stages", multiple=True, metavar="MODEL@SIZE[+ADAPT]",
                 help="cascade stage: a model factory and its input size (repeat, cheapest first); +bn or +head "
                      "adapts that stage's model to its size")
@_request_option("--focus", metavar="MODEL@SIZE",
                 help="glance and focus (AnchorNet): the model that classifies CAM-chosen patches of the image, after "
                      "one --stage (the glance model, ending in global pooling + linear)")
@_request_option("--patches", type=int, help="glance and focus: patches (focus steps), 1 to 64")
@_request_option("--iou", type=float,
                 help="glance and focus: a patch is kept when its IoU with every kept one is below this")
@_request_option("--patch-fraction", type=float,
                 help="glance and focus: patch side over the shorter side of the glance view")
@_request_option("--adapt",
                 help="adapt stage models to their input size: none, bn re-estimates BatchNorm statistics on the "
                      "images (no labels used), head also fine-tunes the classifier with distillation")
@_request_option("--search", metavar="MODEL,MODEL,...",
                 help="cascade search: measure these factories at --sizes (and adapted with --adapt), search cascades "
                      "and thresholds on their logits, build the cheapest within --target-drop of the best single one")
@_request_option("--sizes", help="cascade search: input sizes to try, comma-separated [each model's own]")
@_request_option("--max-stages", type=int, help="cascade search: most stages in a cascade, 1 to 4")
@_request_option("--exits", help="early exit: cut points after which to attach exit heads, comma-separated "
                                 "(auto:N: at most N, placed by measurement)")
@_request_option("--data", type=click.Path(path_type=Path),
                 help="labelled images: class folders, an archive, or labels.tsv")
@_request_option("--calibration-data", type=click.Path(path_type=Path),
                 help="separate labelled images for thresholds (default: a stratified 20% of --data)")
@_request_option("--format", "formats", help=f"artifact formats, comma-separated: {', '.join(FORMATS)}")
@click.option("--backend", "legacy_formats", hidden=True, help="deprecated name of --format")
@_request_option("--int8/--no-int8", default=None, help="post-training INT8 quantization with the calibration images")
@_request_option("--int8-max-drop", type=float,
                 help="INT8 is kept where its top-1 on held-back calibration images is at most this many points below "
                      "the float stage's (paired bootstrap; without labels, the float probabilities' expected top-1)")
@_request_option("--int8-tolerance", type=float,
                 help="the old INT8 rule instead: kept where the 95% lower bound of its top-1 agreement with float "
                      "reaches this (e.g. 0.99); rejects INT8 that only flips boundary images")
@_request_option("--int8-mixed/--no-int8-mixed", default=None,
                 help="try other calibration recipes and keep a stage's most sensitive layers in float when full INT8 "
                      "fails the gate")
@_request_option("--int8-search-seconds", type=float,
                 help="time budget of each stage's INT8 search (recipes, then float layers); it stops at the first "
                      "candidate that passes")
@_request_option("--int8-min-speedup", type=float,
                 help="INT8 is kept only where it runs at least this many times as fast as float on this machine "
                      "(e.g. 1.0 when converting on the device's CPU); 0 checks nothing")
@_request_option("--agreement-images", type=int,
                 help="held-back calibration images (not quantized on) that the INT8 gate judges on; more give a "
                      "tighter interval")
@_request_option("--fp16/--no-fp16", default=None,
                 help="OpenVINO and TFLite artifacts: store weights as fp16 (half the size)")
@_request_option("--int8-io/--no-int8-io", default=None,
                 help="TFLite INT8 artifacts take and return int8 tensors (integer-only NPUs such as the Edge TPU)")
@_request_option("--head",
                 help="exit heads: gap_linear (GAP + linear trained on labels and the network's softmax), "
                      "savchenko (Savchenko's linear head on L2-normalised pooled features), conv (3x3 stride-2 "
                      "convolution, pooling, linear) or mlp (pooling, hidden layer, linear); conv and mlp need a torch "
                      "model")
@_request_option("--head-width", type=int, help="channels of a conv head / hidden units of an mlp head")
@_request_option("--train-exits",
                 help="frozen: train heads on the fixed backbone; joint: fine-tune backbone and heads together "
                      "(torch); given: export the heads the model carries; auto: given if it carries heads, else frozen")
@_request_option("--epochs", type=int, help="joint/conv/mlp training: epochs over --data")
@_request_option("--lr", type=float, help="joint training: peak learning rate of the backbone")
@_request_option("--head-lr", type=float, help="peak learning rate of SGD-trained heads")
@_request_option("--freeze", help="joint training: modules kept frozen, comma-separated (e.g. stem,layer1)")
@_request_option("--exit-weights", help="joint training: loss weight of each exit, comma-separated [1 each]")
@_request_option("--augment", help="augmentation of SGD-trained heads and joint training: flip_crop, flip or none")
@_request_option("--npu", is_flag=True, default=None,
                 help="OpenVINO artifacts: NPU preset (static batch-1 shapes, fp16 weights, NPU INT8 scheme)")
@_request_option("--target-drop", type=float,
                 help="allowed top-1 drop in points for the default operating point")
@_request_option("--out", type=click.Path(path_type=Path), help="bundle directory, or a file ending in .swb")
@_request_option("--name", help="the bundle's name [the stem of --out]")
@_request_option("--input-size", type=int, help="square input size (optional when the images or model fix it)")
@_request_option("--mean", help="input normalisation mean R,G,B in 0-255 units")
@_request_option("--std", help="input normalisation std R,G,B in 0-255 units")
@_request_option("--resize", help="how images reach the input size: shorter_crop or stretch")
@_request_option("--crop-fraction", type=float, help="centre-crop fraction for shorter_crop")
@_request_option("--resizer",
                 help="library that resizes the images, at calibration and on the device: pillow (antialiased) or "
                      "opencv (6-9x faster; the device needs stagewise[opencv])")
@_request_option("--combine", help=f"cascade stages decide on own or averaged probabilities: {', '.join(COMBINES)}")
@_request_option("--score", type=click.Choice(list(SCORES)), help="exit score")
@_request_option("--max-head-images", type=int, help="cap on images used to train exit heads")
@_request_option("--max-calibration-images", type=int, help="cap on images used to pick thresholds")
@_request_option("--threads", type=int, help="runtime threads for calibration and profiling")
@_request_option("--force", is_flag=True, default=None, help="replace an existing bundle at --out")
@_request_option("--new-classes", is_flag=True, default=None,
                 help="early exit: classify the data's own classes (class folders name them) on the frozen backbone's "
                      "features: a linear head on every stage, the last on the penultimate features; without it, data "
                      "whose classes are not the model's outputs is refused")
@_request_option("--cache", type=click.Path(file_okay=False, path_type=Path),
                 help="folder that keeps extracted backbone features, so re-runs skip the backbone pass")
@_request_option("--device",
                 help="torch: where features are extracted and heads/joint training run (auto, cpu, cuda, mps; mixed "
                      "precision on a GPU); Keras follows TensorFlow")
@click.option("--verbose", is_flag=True, help="show the warnings of the libraries the conversion runs")
def convert(model, legacy_formats, verbose, **options):
    """Build a bundle from a torch or Keras model (file.py:factory or module:factory) or a TOML config.

    The options make one conversion request (stagewise.converters.ConversionRequest), checked whole
    before any model or image is opened; a TOML config names the same options, and flags win over it.
    """
    from .converters.convert import run_job
    from .converters.request import ConversionRequest, request_from_toml

    if legacy_formats:
        click.echo("warning: --backend is deprecated for convert; use --format (onnx, openvino, tflite)", err=True)
        options["formats"] = options["formats"] or legacy_formats
    options = {key: value for key, value in options.items() if value is not None and value != ()}
    if model and model.endswith(".toml"):
        request = request_from_toml(Path(model), options)
    else:
        request = ConversionRequest.from_options(dict(options, model=model))
    if not verbose:
        _silence_libraries()
    path = run_job(request)
    if path is None:  # a torchrun rank other than 0
        return
    click.echo(f"wrote {path}")
    from .bundle import read_bundle
    from .reports import manifest_tables, print_tables, search_tables

    bundle = read_bundle(path)
    searched = bundle.manifest.producer.get("search")
    print_tables(*(search_tables(searched) if searched else []), *manifest_tables(bundle.manifest))
    bundle.close()


@cli.command()
@click.argument("model")
@click.option("--input-size", type=click.IntRange(min=1, max=4096),
              help="square input size of the probe image [the model's declared size, else 224]")
@click.option("--all", "show_all", is_flag=True, help="also list places where more than one tensor crosses")
@click.option("--json", "as_json", is_flag=True, help="print the cut points as JSON records")
def cuts(model, input_size, show_all, as_json):
    """The cut points of a torch or Keras model (file.py:factory or module:factory), in graph order.

    Each cut: name (pass it to convert --exits), output shape, channels, spatial reduction,
    cumulative MACs, and whether a single tensor crosses it (only those can take an exit).
    Needs no data: one forward pass on a blank image.
    """
    from .converters import cut_points

    found = [c for c in cut_points(model, input_size) if show_all or c.single_tensor]
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in found], indent=2))
        return
    from rich.table import Table

    from .reports import print_tables

    at = f"{input_size}x{input_size}" if input_size else "its declared input size (else 224x224)"
    table = Table(title=f"cut points of {model} at {at}")
    for column in ("name", "output shape", "layout", "channels", "reduction", "MACs (cumulative)", "single tensor"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for c in found:
        table.add_row(c.name, "x".join(map(str, c.shape)), c.layout, str(c.channels),
                      "-" if c.reduction is None else f"/{c.reduction}",
                      f"{c.macs / 1e6:.2f} M", "yes" if c.single_tensor else "no")
    print_tables(table)


def _silence_libraries() -> None:
    """Library warnings and TensorFlow's C++ log lines off for a conversion (``--verbose`` keeps them)."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("tensorflow", "absl", "tf2onnx", "nncf", "torch.onnx", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _calibration_summary(cal: object) -> str | None:
    """One line about the calibration record, if it has the fields stagewise writes (the record is free-form)."""
    try:
        return (f"calibrated on {int(cal['n'])} images ({cal['data']}): running every stage gives top-1 "
                f"{100 * float(cal['reference_accuracy']):.1f}%, oracle {100 * float(cal['oracle']['accuracy']):.1f}% "
                f"at {float(cal['oracle']['mean_cost']):.2f} ms")
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


@cli.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def inspect(bundle, as_json):
    """Stages, precisions, thresholds, costs and operating points of a bundle (and its cascade search, if any)."""
    from .bundle import read_bundle
    from .reports import manifest_tables, print_tables, search_tables

    b = read_bundle(bundle)
    try:
        if as_json:
            click.echo(json.dumps(b.manifest.to_dict(), indent=2))
        else:
            searched = b.manifest.producer.get("search")
            print_tables(*(search_tables(searched) if searched else []), *manifest_tables(b.manifest))
            summary = _calibration_summary(b.manifest.calibration)
            if summary:
                click.echo(summary)
    finally:
        b.close()


@cli.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@backend_option
@device_option
@require_device_option
@threads_option
@click.option("--operating-point", help="named operating point (see inspect)")
@click.option("--budget-ms", type=_Finite(min=0, min_open=True), help="latency budget per image (a late stage is cancelled)")
@click.option("--mean-budget-ms", type=_Finite(min=0, min_open=True),
              help="average-budget mode: pick each image's operating point so the mean latency stays at this")
@click.option("--json", "as_json", is_flag=True,
              help="one JSON object per image: its path and the prediction (label, class_name, score, stage_index, "
                   "stage_name, elapsed_ms, budget_ms, budget_limited, operating_point, trace)")
@click.option("--explain", type=click.Path(path_type=Path),
              help="glance and focus: write a PNG of the glance CAM and the patches the steps read (several images: "
                   "NAME-1.png, NAME-2.png, ...)")
@patches_option
@patch_seed_option
@trusted_key_option
def run(bundle, images, backend, device, require_device, threads, operating_point, budget_ms, mean_budget_ms, as_json,
        explain, patch_mode, patch_seed, trusted_keys):
    """Classify images: label, score, exit stage and time."""
    if operating_point and mean_budget_ms is not None:
        raise click.UsageError("give --operating-point or --mean-budget-ms (which picks the point itself), not both")
    with _load(bundle, backend, threads, device, trusted_keys, require_device) as cascade:
        if operating_point:
            cascade.use(operating_point)
        cascade.set_mean_budget(mean_budget_ms)
        cascade.choose_patches(patch_mode, patch_seed)
        for i, path in enumerate(images):
            p = cascade.predict(path, budget_ms=budget_ms)
            if explain:
                _explain(cascade, path, p, explain if len(images) == 1 else
                         explain.with_name(f"{explain.stem}-{i + 1}{explain.suffix or '.png'}"))
            if as_json:
                click.echo(json.dumps({"image": path, **p.to_dict()}))
            else:
                flag = " (budget-limited)" if p.budget_limited else ""
                click.echo(f"{path}: {p.name} [{p.label}] score {p.score:.3f} at {p.stage_name} "
                           f"in {p.elapsed_ms:.2f} ms{flag}")


def _explain(cascade: Any, path: str, prediction: Any, out: Path) -> None:
    from .explain import draw_explanation
    from .images import load_image

    cam, extent = cascade.class_activation(path)
    boxes = [r.box for r in prediction.trace if r.box is not None]
    click.echo(f"wrote {draw_explanation(load_image(path), cam, extent, boxes, out)}", err=True)


@cli.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path),
              help="labelled images the thresholds never saw")
@backend_option
@device_option
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="use at most this many images (stratified, seeded)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--operating-point", "points", multiple=True, help="only these operating points (repeat)")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the result as JSON")
@click.option("--plot", type=click.Path(path_type=Path), help="write a Pareto plot (PNG)")
@patches_option
@patch_seed_option
@click.option("--reference", "references", multiple=True, type=click.Path(exists=True),
              help="another bundle (e.g. the plain network's) run beside this one at its full point, in the same "
                   "round robin; equal-accuracy speed-ups compare with it too (repeat for more)")
def bench(bundle, data, backend, device, threads, limit, seed, points, json_out, plot, patch_mode, patch_seed,
          references):
    """Top-1/top-5, latency p50/p95, exits and speed-up of each operating point and single stage."""
    from .datasets import open_image_set
    from .reports import bench_table, pareto_plot, print_tables
    from .runtimes.bench import benchmark

    images = open_image_set(data)
    if limit and limit < len(images):
        images = images.split([limit / len(images)], seed=seed)[0]
    with contextlib.ExitStack() as stack:
        cascade = stack.enter_context(_load(bundle, backend, threads, device))
        cascade.choose_patches(patch_mode, patch_seed)
        others = {Path(r).stem: stack.enter_context(_load(r, backend, threads, device)) for r in references}
        result = benchmark(cascade, [images.image(i) for i in range(len(images))], images.targets, points or None,
                           references=others)
    result.update(bundle=str(bundle), data=str(data), patches=patch_mode)
    print_tables(bench_table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {json_out}")
    if plot:
        click.echo(f"wrote {pareto_plot(result, plot)}")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="held-out images: class folders, labels.tsv or an archive; with --no-labels any folder of images")
@click.option("--from-log", type=click.Path(exists=True, path_type=Path),
              help="instead of --data: re-choose the thresholds without labels from the agreement samples of a trace "
                   "log recorded on the device (stagewise serve --monitor-log); goal: --target-drop")
@click.option("--target-drop", type=_Finite(min=0, max=100),
              help="goal: cheapest point with top-1 at most this many points below full")
@click.option("--budget-ms", type=_Finite(min=0, min_open=True),
              help="goal: most accurate point with mean latency at most this")
@click.option("--alpha", type=_Finite(min=0, min_open=True),
              help="goal: Savchenko's thresholds, false-acceptance rate alpha*m/M at stage m (Benjamini-Hochberg)")
@click.option("--risk", type=_Finite(min=0, min_open=True),
              help="goal: guarantee that the risk (see --risk-kind) is at most this fraction, with probability 1-DELTA")
@click.option("--delta", type=_Finite(min=0, min_open=True),
              help="with --risk: allowed probability that the guarantee fails (e.g. 0.1)")
@click.option("--risk-kind", type=click.Choice(["disagreement", "error_increase"]), default="disagreement",
              show_default=True, help="with --risk: disagreement with the full model, or error increase (needs labels)")
@click.option("--no-labels", is_flag=True, help="calibrate against the full model's own answers (images need no labels)")
@click.option("--score", type=click.Choice(list(SCORES)),
              help="switch the exit score of the non-final stages (default: keep the bundle's)")
@click.option("--temperature/--no-temperature", default=True, show_default=True,
              help="fit each stage's softmax temperature by NLL before choosing thresholds")
@click.option("--front", "front_points", type=click.IntRange(min=1), default=6, show_default=True,
              help="also store this many Pareto-front points as pareto-1 (cheapest) ...")
@click.option("--tune-fraction", type=_Finite(min=0, max=1, min_open=True, max_open=True), default=0.5, show_default=True,
              help="share of the images that fits the learned score (and, with --risk, picks the candidate order)")
@click.option("--limit", type=click.IntRange(min=1), help="use at most this many images (seeded random subset)")
@click.option("--seed", type=int, default=0, show_default=True)
@backend_option
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
def calibrate(bundle, data, from_log, target_drop, budget_ms, alpha, risk, delta, risk_kind, no_labels, score,
              temperature, front_points, tune_fraction, limit, seed, backend, threads):
    """Re-pick thresholds and operating points on new data, without reconverting.

    Exactly one goal: --target-drop, --budget-ms, --alpha, or --risk with --delta. The manifest's
    operating points are rewritten atomically and the expected accuracy / cost table is printed.
    With --from-log instead of --data, the thresholds are re-chosen label-free from the agreement
    samples recorded in the field (goal: --target-drop, as agreement with the full model).
    """
    from .calibration import Settings
    from .reports import manifest_tables, print_tables
    from .runtimes.calibrate import recalibrate

    if from_log is not None:
        if data is not None or any(g is not None for g in (budget_ms, alpha, risk)) or target_drop is None:
            raise click.UsageError("--from-log takes no --data and one goal, --target-drop (agreement with the full "
                                   "model at least 1 - D)")
        from .runtimes.trace_log import recalibrate_from_log

        manifest = recalibrate_from_log(bundle, from_log, target_drop)
        print_tables(manifest_tables(manifest)[1])
        click.echo(f"re-calibrated on {manifest.calibration['n']} agreement samples from {from_log} (no labels): "
                   f"default point {manifest.default_operating_point}")
        return
    if data is None:
        raise click.UsageError("give --data IMAGES (or --from-log TRACES to re-calibrate from field traces)")

    settings = Settings(score=score, fit_temperature=temperature, front_points=front_points,
                        tune_fraction=tune_fraction, seed=seed)
    manifest = recalibrate(bundle, data, backend, threads, target_drop=target_drop, budget_ms=budget_ms, alpha=alpha,
                           risk=risk, delta=delta, risk_kind=risk_kind, labelled=not no_labels, settings=settings,
                           limit=limit)
    print_tables(manifest_tables(manifest)[1])
    cal = manifest.calibration
    what = "agreement with the full model" if no_labels else "top-1"
    click.echo(f"calibrated on {cal['n']} images ({'no labels' if no_labels else 'labels'}): expected {what} and mean "
               f"latency per point above; oracle exit rule {100 * cal['oracle']['accuracy']:.1f}% at "
               f"{cal['oracle']['mean_cost']:.2f} ms; default point: {manifest.default_operating_point}")
    g = manifest.point(manifest.default_operating_point).guarantee
    if g:
        click.echo(f"guarantee: {g.risk} <= {100 * g.epsilon:g}% with probability >= {1 - g.delta:g} "
                   f"(n={g.n} test images, {g.n_tune} tune; observed {100 * g.empirical_risk:.2f}%, "
                   f"{1 - g.delta:g} upper bound {100 * g.upper_bound:.2f}%)")


@cli.command()
@click.argument("log", type=click.Path(exists=True, path_type=Path))
@click.option("--bundle", required=True, type=click.Path(exists=True), help="the bundle the log was recorded with")
@click.option("--operating-point", "points", multiple=True,
              help="operating points to test (repeat; default: the bundle's default point)")
@click.option("--false-alarms-per-10k", type=_Finite(min=0, max=1e4, min_open=True, max_open=True), default=1.0,
              show_default=True, help="average false-alarm rate bound of the drift test")
@click.option("--json", "as_json", is_flag=True, help="print the monitor's report as JSON")
def monitor(log, bundle, points, false_alarms_per_10k, as_json):
    """Replay a trace log (JSON lines: stagewise run --json, stream frame logs, the monitor's sample log) through
    the drift monitor: alarms, live vs calibration exit rates, and the agreement estimate of the accuracy loss."""
    from .bundle import read_bundle
    from .runtimes.monitor import DriftMonitor, MonitorSettings
    from .runtimes.trace_log import read_log

    b = read_bundle(bundle)
    try:
        watched = DriftMonitor(b.manifest, MonitorSettings(false_alarms_per_10k=false_alarms_per_10k,
                                                           points=tuple(points) or None))
    finally:
        b.close()
    for prediction, sample in read_log(log):
        watched.observe(prediction)
        if sample is not None:
            watched.add_sample(sample)
    report = watched.report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['requests']} requests; testing {', '.join(report['watching'])} "
               f"(at most {false_alarms_per_10k:g} false alarm per 10,000 requests on average)")
    if not report["reference"]:
        click.echo(report["message"])
    for alarm in report["alarms"]:
        click.echo(f"ALARM {alarm['message']}")
    if report["reference"] and not report["alarms"]:
        click.echo("no alarm: live traffic is consistent with the calibration")
    for name, point in report["points"].items():
        rates = ", ".join(f"{s['stage']} {100 * s['exit_rate']:.1f}%"
                          + (f" (calibration {100 * s['reference_exit_rate']:.1f}%)" if "reference_exit_rate" in s else "")
                          for s in point["stages"] if s.get("exit_rate") is not None)
        click.echo(f"{name}: {point['requests']} requests; exits {rates}")
        a = point.get("agreement")
        if a:
            promise = "" if a["promised_drop"] is None else f"; promised drop {100 * a['promised_drop']:g} pt"
            click.echo(f"  agreement samples {a['n']}: disagreement {100 * a['disagreement']:.2f}% "
                       f"(95% {100 * a['disagreement_interval'][0]:.2f}..{100 * a['disagreement_interval'][1]:.2f}), "
                       f"estimated loss {100 * a['loss']:.2f} pt (95% {100 * a['loss_interval'][0]:.2f}.."
                       f"{100 * a['loss_interval'][1]:.2f}){promise}")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--data", type=click.Path(exists=True, path_type=Path), help="images to time on (default: random images)")
@backend_option
@device_option
@require_device_option
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--images", "count", type=click.IntRange(min=1), default=50, show_default=True, help="how many images to time")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True, help="passes over the images")
@click.option("--name", help="profile name (default: <runtime>-<device>-<threads>t, the one the runtime looks up)")
@click.option("--dry-run", is_flag=True, help="measure and print, do not write the bundle")
@click.option("--json", "as_json", is_flag=True, help="print the profile as JSON")
def profile(bundle, data, backend, device, require_device, threads, count, repeats, name, dry_run, as_json):
    """Measure each stage's latency distribution on this device and store it in the bundle as a profile.

    Every stage runs at batch 1 on each image (step time: input preparation, backend call and
    exit rule, as the budget scheduler sees it); p50/p90/p95/p99/mean/max are stored per stage
    under the profile's name, with the runtime, device, threads, precisions, machine, date and
    the load average while measuring. The runtime seeds its latency model from the profile of
    its configuration, and calibration and bench cost stages with it.
    """
    import os
    import platform

    from .bundle import update_manifest
    from .datasets import open_image_set
    from .machine import cpu_record, cpu_summary
    from .runtimes.executor import profile_name
    from .runtimes.profiling import measure_return_overhead, measure_stage_latency, record_profile

    with _load(bundle, backend, threads, device, require_device=require_device) as cascade:
        if data:
            images = open_image_set(data)
            frames = [images.image(i) for i in range(min(count, len(images)))]
        else:
            rng = np.random.default_rng(0)
            frames = [rng.integers(0, 256, (320, 320, 3), dtype=np.uint8) for _ in range(count)]
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        stats = measure_stage_latency(cascade, frames, repeats=repeats)
        ret = measure_return_overhead(cascade, frames[0], runs=min(50, 10 * len(frames)))
        extra = {"return_ms": {k: ret[k] for k in ("p50", "p95", "p99", "n")}, "images": len(frames),
                 "repeats": repeats, "data": str(data) if data else "random 320x320 images",
                 "python": platform.python_version(), "ran_on": cascade.ran_on}
        if load_before is not None:
            extra["loadavg_1min"] = [load_before, os.getloadavg()[0]]
        profile_id = name or profile_name(cascade.runtime, cascade.threads, cascade.device)
        if not dry_run:
            update_manifest(bundle, lambda manifest, _root: record_profile(manifest, cascade, stats, profile_id, extra))
        stage_names = cascade.stage_names
    if as_json:
        click.echo(json.dumps({"profile": profile_id, "cpu": cpu_record(), "stages": dict(zip(stage_names, stats)),
                               **extra}, indent=2))
        return
    click.echo(f"cpu: {cpu_summary()}")
    for stage, s in zip(stage_names, stats):
        click.echo(f"{stage}: p50 {s['p50']:.2f} ms, p95 {s['p95']:.2f} ms, p99 {s['p99']:.2f} ms, "
                   f"max {s['max']:.2f} ms (n={s['n']})")
    click.echo(f"return overhead: p95 {ret['p95']:.3f} ms")
    click.echo(f"{'measured (not stored)' if dry_run else 'stored as profile'} {profile_id}")


@cli.command()
@click.argument("bundle", envvar="STAGEWISE_BUNDLE", type=click.Path(exists=True))
@click.option("--host", envvar="STAGEWISE_HOST", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0: every interface)")
@click.option("--port", envvar="STAGEWISE_PORT", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--backend", envvar="STAGEWISE_RUNTIME", default="auto", show_default=True,
              help="runtime: onnxruntime, openvino, litert, auto, or a preference order")
@click.option("--device", envvar="STAGEWISE_DEVICE", default="CPU", show_default=True)
@click.option("--threads", envvar="STAGEWISE_THREADS", type=click.IntRange(min=1), help="intra-op threads of the runtime")
@click.option("--operating-point", envvar="STAGEWISE_OPERATING_POINT", help="default operating point (see inspect)")
@click.option("--max-batch", envvar="STAGEWISE_MAX_BATCH", type=click.IntRange(1, 64), default=8, show_default=True,
              help="images per micro-batch (1: one request at a time)")
@click.option("--batch-window-ms", envvar="STAGEWISE_BATCH_WINDOW_MS", type=_Finite(0, 100), default=3.0,
              show_default=True, help="how long a request waits for others to batch with")
@click.option("--queue-size", envvar="STAGEWISE_QUEUE_SIZE", type=click.IntRange(1), default=64, show_default=True,
              help="images that may wait; beyond it requests get 503 with Retry-After")
@click.option("--workers", envvar="STAGEWISE_WORKERS", type=click.IntRange(1, 32), default=1, show_default=True,
              help="inference threads")
@click.option("--max-body-mb", envvar="STAGEWISE_MAX_BODY_MB", type=_Finite(0.01, 1024), default=8.0,
              show_default=True, help="largest request body (413 above)")
@click.option("--max-pixels", envvar="STAGEWISE_MAX_PIXELS", type=click.IntRange(1), default=4096 * 3072,
              show_default=True, help="largest image, width x height, read from its header before decoding (413 "
                                      "above); decoded images waiting for answers hold at most 2x this many (503 beyond)")
@click.option("--decode-slots", envvar="STAGEWISE_DECODE_SLOTS", type=click.IntRange(1, 64), default=2,
              show_default=True, help="images decoded at once")
@click.option("--client-timeout", envvar="STAGEWISE_CLIENT_TIMEOUT", type=_Finite(0.1, 3600), default=30.0,
              show_default=True, help="seconds a client has to send its request (then 408 or disconnected)")
@click.option("--max-connections", envvar="STAGEWISE_MAX_CONNECTIONS", type=click.IntRange(1), default=256,
              show_default=True, help="connections served at once (503 beyond)")
@click.option("--model-name", envvar="STAGEWISE_MODEL_NAME", help="name under /v2/models (default: the bundle's)")
@click.option("--trusted-key", "trusted_keys", envvar="STAGEWISE_TRUSTED_KEYS", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Ed25519 public key (repeatable); every bundle served, at start and on reload, must be signed by one")
@click.option("--reload-dir", envvar="STAGEWISE_RELOAD_DIR", type=click.Path(exists=True, file_okay=False),
              help="folder POST /v1/reload may load other bundles from (default: only the served path)")
@click.option("--drain-timeout", envvar="STAGEWISE_DRAIN_TIMEOUT", type=_Finite(0, 3600), default=30.0,
              show_default=True, help="seconds in-flight requests get to finish at shutdown")
@click.option("--log-level", envvar="STAGEWISE_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--monitor-agreement", envvar="STAGEWISE_MONITOR_AGREEMENT", type=_Finite(min=0, max=1), default=0.0,
              show_default=True, help="drift monitor: share of answered requests also run through every stage "
                                      "(after answering) to estimate the live accuracy loss without labels")
@click.option("--monitor-fallback", envvar="STAGEWISE_MONITOR_FALLBACK",
              help="drift monitor: operating point to switch to on an alarm (e.g. full; default: only report)")
@click.option("--monitor-log", envvar="STAGEWISE_MONITOR_LOG", type=click.Path(path_type=Path),
              help="drift monitor: append the agreement samples to this JSON-lines file (for calibrate --from-log)")
def serve(bundle, host, port, backend, device, threads, operating_point, max_batch, batch_window_ms, queue_size,
          workers, max_body_mb, max_pixels, decode_slots, client_timeout, max_connections, model_name, trusted_keys,
          reload_dir, drain_timeout, log_level, monitor_agreement, monitor_fallback, monitor_log):
    """Serve a bundle over HTTP: /v1/classify, the KServe v2 endpoints and /metrics (the serve extra).

    Every option can also be set by an environment variable (STAGEWISE_BUNDLE, STAGEWISE_PORT,
    STAGEWISE_RUNTIME, STAGEWISE_THREADS, ...; see docs/device.md). SIGTERM drains in-flight
    requests, SIGHUP or POST /v1/reload loads the bundle path again and switches to it.
    """
    from .runtimes.monitor import MonitorSettings
    from .runtimes.serve import ServeConfig
    from .runtimes.serve import serve as run_service

    monitor = MonitorSettings(agreement=monitor_agreement, fallback=monitor_fallback,
                              log=str(monitor_log) if monitor_log else None)
    config = ServeConfig(max_batch=max_batch, window_ms=batch_window_ms, queue_size=queue_size, workers=workers,
                         max_body_bytes=int(max_body_mb * 2 ** 20), max_pixels=max_pixels, decode_slots=decode_slots,
                         max_pixels_in_flight=2 * max_pixels, client_timeout_s=client_timeout, model_name=model_name,
                         reload_on_sighup=True, reload_dir=reload_dir, monitor=monitor)
    run_service(bundle, host, port, runtime=backend, threads=threads, device=device, config=config,
                operating_point=operating_point, drain_timeout_s=drain_timeout, log_level=log_level,
                trusted_keys=list(trusted_keys) or None, max_connections=max_connections)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("stagewise-demo"), show_default=True,
              help="folder for the demo bundle and results")
@click.option("--int8/--no-int8", default=True, show_default=True,
              help="quantize the stages to INT8 (the converter's accuracy gate keeps INT8 where it loses at most 0.5 "
                   "pt); --no-int8 builds float bundles")
def demo(out, int8):
    """The whole path on the built-in example, from nothing to a benchmark table."""
    from .demo import run_demo

    run_demo(out, int8=int8)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="private key file to write (PEM); the public key goes to the same name plus .pub")
def keygen(out):
    """Create an Ed25519 key pair for signing bundles."""
    from .signing import generate_key

    public = out.with_name(out.name + ".pub")
    click.echo(f"wrote {out} (private, keep it secret) and {public} (public, give it to devices); key id "
               f"{generate_key(out, public)}")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--key", required=True, type=click.Path(exists=True, path_type=Path), help="private key (PEM) of keygen")
def sign(bundle, key):
    """Sign a bundle in place: an Ed25519 signature over its manifest, which pins every file's sha256."""
    from .bundle import sign_bundle

    click.echo(f"signed {bundle} with key {sign_bundle(bundle, key)}")


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--trusted-key", "trusted_keys", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Ed25519 public key (PEM) to accept (repeat for more)")
def verify(bundle, trusted_keys):
    """Check a bundle's signature and every file's sha256; exit 2 unless a trusted key signed it unchanged."""
    from .bundle import verify_bundle

    click.echo(f"{bundle}: signed by trusted key {verify_bundle(bundle, list(trusted_keys))}, every file verified")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _fail(message: str, code: int, debug: bool) -> None:
    """Inside an ``except``: the traceback (with ``--debug``), then ``message`` on stderr, then exit with ``code``."""
    if debug:
        traceback.print_exc()
    click.echo(message, err=True)
    sys.exit(code)


def _suggest_near_misses(command: click.Command) -> None:
    """Give every choice option of ``command`` and its subcommands the refusal of :class:`_Choice`."""
    for param in command.params:
        if type(param.type) is click.Choice:
            param.type = _Choice(param.type.choices, param.type.case_sensitive)
    for sub in getattr(command, "commands", {}).values():
        _suggest_near_misses(sub)


_suggest_near_misses(cli)


def main(argv: list[str] | None = None) -> None:
    """Run the command line: every failure is one line on stderr and a non-zero exit code.

    Exit codes: 1 aborted, 2 a stagewise error (the message says what to do) or an OS error,
    3 an unexpected error (a bug: ``--debug`` shows its traceback), ClickException's own for
    usage errors, 130 interrupted. ``--debug`` (before the command) prints the traceback too.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args[:next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))]
    try:
        cli.main(args, prog_name="stagewise", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except (StagewiseError, OSError) as exc:
        _fail(f"error: {_one_line(exc)}", 2, debug)
    except ImportError as exc:
        _fail(f"error: {_one_line(exc)}; install the extra this command needs, e.g. "
              'pip install "stagewise[torch]" (see the README)', 2, debug)
    except Exception as exc:
        _fail(f"unexpected error ({type(exc).__name__}: {_one_line(exc)}); this is a stagewise bug: run with "
              "--debug and report it", 3, debug)


if __name__ == "__main__":  # python -m stagewise.cli, as torchrun -m starts it
    main()
