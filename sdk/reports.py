"""Human-readable tables of bundles and benchmark results, and the Pareto plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

from .extras import require
from .manifest import Expected, Manifest


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _threshold(t: float | None) -> str:
    return "-" if t is None else f"{t:.3f}"


def _quantization(record: Mapping[str, Any] | None) -> str:
    """What INT8 did for one artifact: rejected or mixed, with what the gate measured (the top-1 difference and its
    paired interval, or the agreement and its interval under the agreement rule) and the speed-up the build
    machine measured."""
    if not record or "agreement_with_fp32" not in record:
        return ""
    interval = record.get("agreement_interval")
    agreement = f"{100 * record['agreement_with_fp32']:.1f}%" + (
        f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "") + f" of {record.get('agreement_images')}"
    measured = f"agreement {agreement}"
    if "accuracy_difference" in record:
        low, high = record["difference_interval"]
        measured = (f"top-1 {100 * record['accuracy_difference']:+.2f} pt [{100 * low:+.2f}, {100 * high:+.2f}] of "
                    f"{record['images']}, agreement {100 * record['agreement_with_fp32']:.1f}%")
    speed = f", {record['host_speedup']:.2f}x float speed when built" if "host_speedup" in record else ""
    if record.get("kept_fp32"):
        why = "too slow, " if "speed" in str(record.get("rejected", "")) else ""
        return f" (int8 rejected: {why}{measured}{speed})"
    kept = record.get("float_layers") or []
    return (f" (mixed: {len(kept)} float layers, {measured}{speed})" if kept else f" ({measured}{speed})")


def _input_text(stage: Any) -> str:
    """What a stage reads, and for a glance stage how its CAM cells map to the image (exact or proportional)."""
    src = stage.input
    if src.source == "image":
        where = f"image {src.size[0]}x{src.size[1]}"
    elif src.source == "patch":
        where = (f"patch {src.index + 1}/{src.count} from {src.from_stage}'s CAM ({src.patch_fraction:g} of its view, "
                 f"IoU < {src.iou:g}) at {src.size[0]}x{src.size[1]}")
    else:
        where = f"carry from {src.from_stage}"
    if stage.cam is not None:
        grid = stage.cam
        where += (f"; CAM {grid.grid[0]}x{grid.grid[1]}, {grid.mapping} mapping "
                  f"(stride {grid.stride[0]:g}x{grid.stride[1]:g} px)")
    return where


def manifest_tables(manifest: Manifest) -> list[Table]:
    """Stages (inputs, precision per format, cost) and operating points of a bundle."""
    producer = manifest.producer
    pre = manifest.input
    resize = pre.resize + (f" {pre.crop_fraction:g}" if pre.resize == "shorter_crop" else "")
    stages = Table(title=f"{manifest.name}: {len(manifest.stages)} stages "
                         f"({producer.get('kind', 'stages')}, from {producer['source_framework']}; images: {resize}, "
                         f"{pre.interpolation} by {pre.resizer})")
    for col in ("stage", "input", "artifacts", "exit score", "MMACs", "latency p50 (ms)"):
        stages.add_column(col)
    for s in manifest.stages:
        where = _input_text(s)
        arts = ", ".join(f"{fmt}:{a.precision}{_quantization(a.quantization)}" for fmt, a in s.artifacts.items())
        lat = ", ".join(f"{v.p50:.2f} [{k}]" for k, v in (s.cost.latency_ms or {}).items()) or "-"
        exit_rule = f"{s.exit.score} T={s.exit.temperature:g}"
        if s.exit.combine != "own":
            exit_rule += f" {s.exit.combine}"
        stages.add_row(s.name, where, arts, exit_rule, f"{(s.cost.macs or 0) / 1e6:.1f}", lat)
    reference = (manifest.calibration or {}).get("float_reference_accuracy")
    points = Table(title=f"operating points (default: {manifest.default_operating_point})" + (
        f"; the float full model: {_pct(reference)} expected top-1" if reference is not None else ""))
    for col in ("name", "thresholds", "expected top-1", *(("vs float full",) if reference is not None else ()),
                "agreement with full", "expected mean cost", "exit rates", "n", "guarantee"):
        points.add_column(col)
    for p in manifest.operating_points:
        e = p.expected or Expected()
        cost = f"{e.mean_cost:.2f} {e.cost_unit or ''}" if e.mean_cost is not None else "-"
        rates = " / ".join(f"{100 * r:.0f}%" for r in e.exit_rates or ()) or "-"
        g = p.guarantee
        promise = (f"{g.risk.replace('_', ' ')} <= {100 * g.epsilon:g}% w.p. >= {1 - g.delta:g} (n={g.n})"
                   if g else "-")
        versus = () if reference is None else (
            "-" if e.accuracy is None else f"{100 * (e.accuracy - reference):+.1f} pt",)
        points.add_row(p.name, " ".join(_threshold(t) for t in p.thresholds), _pct(e.accuracy), *versus,
                       _pct(e.agreement), cost, rates, str("-" if e.n is None else e.n), promise)
    return [stages, points]


def search_tables(record: Mapping[str, Any], max_rows: int = 25) -> list[Table]:
    """The candidates and the Pareto front (at most ``max_rows`` points, spread over it, the chosen one
    included) of a cascade search (a bundle's ``producer.search`` record)."""
    candidates = Table(title=f"candidates measured on {record['n']} calibration images "
                             f"(latency: median of {record['timing_images']} images)")
    for col in ("candidate", "input", "adaptation", "top-1", "latency ms", "temperature"):
        candidates.add_column(col)
    for c in record["candidates"]:
        candidates.add_row(c["name"], "x".join(map(str, c["size"])), c["adaptation"], _pct(c["accuracy"]),
                           f"{c['cost_ms']:.2f}", f"{c['temperature']:.3f}")
    reference = record["reference"]
    front = Table(title=f"Pareto front of {record['cascades_searched']} searched cascades (chosen: the cheapest within "
                        f"{100 * record['target_drop']:g} pt of {reference['candidate']}'s {_pct(reference['accuracy'])})")
    for col in ("", "stages", "combine", "thresholds", "top-1", "mean ms", "exit rates"):
        front.add_column(col)
    points = record["front"]
    shown = sorted({round(j * (len(points) - 1) / (max_rows - 1)) for j in range(max_rows)} | {record["chosen"]}
                   ) if len(points) > max_rows else range(len(points))
    if len(points) > max_rows:
        front.caption = f"{len(shown)} of {len(points)} points, spread over the front (all of them: stagewise inspect --json)"
    for i in shown:
        p = points[i]
        front.add_row("*" if i == record["chosen"] else "", " > ".join(p["stages"]), p["combine"],
                      " ".join(_threshold(t) for t in p["thresholds"]), _pct(p["accuracy"]), f"{p['mean_cost']:.2f}",
                      " / ".join(f"{100 * r:.0f}%" for r in p["exit_rates"]))
    return [candidates, front]


def bench_table(result: dict) -> Table:
    """One row per operating point and single stage of a :func:`benchmark` result."""
    table = Table(title=f"{result.get('bundle', 'bundle')} on {result['runtime']} ({result['threads'] or 'default'} "
                        f"threads, batch 1), {result['n']} images")
    for col in ("configuration", "top-1", "top-5", "mean ms", "p50 ms", "p95 ms", "exits per stage",
                "speed-up vs full", "vs single at equal top-1"):
        table.add_column(col)
    for r in result["rows"]:
        label = {"operating_point": r["name"], "reference": r["name"]}.get(r["kind"], f"{r['name']} alone")
        eq = "-"
        if "speedup_vs_equal_accuracy_single" in r:
            eq = f"{r['speedup_vs_equal_accuracy_single']:.2f}x ({r['equal_accuracy_reference']})"
        elif r.get("more_accurate_than_every_single"):
            eq = "beats every single"
        table.add_row(label, _pct(r["top1"]), _pct(r["top5"]), f"{r['mean_ms']:.2f}", f"{r['p50_ms']:.2f}",
                      f"{r['p95_ms']:.2f}", "/".join(map(str, r["exit_histogram"])) if r["kind"] == "operating_point" else "-",
                      f"{r['speedup_vs_full']:.2f}x" if "speedup_vs_full" in r else "-", eq)
    o = result["oracle"]
    table.caption = (f"oracle exit rule (each image leaves at the first stage that is right): top-1 {_pct(o['top1'])}, "
                     f"mean {o['mean_ms']:.2f} ms")
    return table


def print_tables(*tables: Table) -> None:
    """Print tables to stdout (at least 150 columns wide when not on a terminal, e.g. in CI logs)."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    for t in tables:
        console.print(t)


def pareto_plot(result: dict, path: str | Path) -> Path:
    """Top-1 against mean latency for every row of a benchmark result (PNG).

    Rows are grouped by their ``series`` (default: their ``kind``); a series of operating
    points is drawn as a connected front, single networks as separate markers.
    """
    require("matplotlib", "plot", "drawing the plot").use("Agg")
    plt = require("matplotlib.pyplot", "plot", "drawing the plot")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    series: dict[str, list[dict]] = {}
    for r in result["rows"]:
        series.setdefault(r.get("series", r["kind"]), []).append(r)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["mean_ms"])
        front = rows[0]["kind"] in ("operating_point", "cascade")
        ax.plot([r["mean_ms"] for r in rows], [100 * r["top1"] for r in rows], marker="o" if front else "s",
                linestyle="-" if front else "none", label=name.replace("_", " "))
        for r in rows:
            ax.annotate(r.get("short", r["name"]), (r["mean_ms"], 100 * r["top1"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    o = result.get("oracle")
    if o:
        ax.plot([o["mean_ms"]], [100 * o["top1"]], marker="*", color="tab:green", linestyle="none", markersize=10,
                label="oracle exit rule")
    ax.set_xlabel(f"mean latency per image (ms, {result['runtime']}, batch 1)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{result.get('bundle', '')}: n={result['n']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
