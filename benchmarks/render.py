"""Render a benchmark result JSON (CIFAR-10 early exit or ImageNet cascade) as Markdown tables.

    python benchmarks/render.py benchmarks/results/cifar10_early_exit.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _rates(hist: list[int]) -> str:
    total = sum(hist) or 1
    return " / ".join(f"{100 * h / total:.0f}%" for h in hist)


def cifar10(result: dict) -> str:
    d = result["data"]
    lines = [f"n = {d['test']} test images for top-1 and exits; latency: batch 1, {result['threads']} thread(s), "
             f"{d['timed_test_images']} test images timed round robin; {result['machine']['cpu']}, "
             f"{result['machine']['date'][:10]}.", "",
             "| configuration | top-1 % | Δ top-1 vs full model (same precision) | mean ms | p95 ms | speed-up vs full model (same precision) | speed-up vs fp32 full model | exits per stage |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        delta = r.get("top1_minus_full_model_same_precision")
        lines.append(f"| {r['name']} | {_pct(r['top1'])} | {'' if delta is None else f'{100 * delta:+.2f}'} | "
                     f"{r['mean_ms']:.3f} | {r['p95_ms']:.3f} | {r.get('speedup_vs_full_model_same_precision', 0):.2f}x | "
                     f"{r['speedup_vs_full_model_fp32']:.2f}x | {_rates(r['exit_histogram']) if r['kind'] == 'operating_point' else '-'} |")
    lines.append("")
    for name, o in result["oracle_on_test"].items():
        lines.append(f"Oracle bound, {name}: top-1 {_pct(o['top1'])} % at {o['mean_cost_ms']:.3f} ms mean "
                     f"(from the stages' profiled p50), exits {' / '.join(f'{100 * r:.0f}%' for r in o['exit_rates'])}.")
    return "\n".join(lines)


def imagenet(result: dict) -> str:
    d = result["data"]
    lines = [f"n = {d['test']} test images for top-1 and exits ({d['calibration']} other images calibrated the "
             f"thresholds); latency: batch 1, {result['threads']} thread(s), {d['timed_test_images']} test images timed "
             f"round robin; {result['machine']['cpu']}, {result['machine']['date'][:10]}.", "",
             "| configuration | top-1 % | top-5 % | mean ms | p95 ms | exits per stage | against single models |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        note = ""
        if "speedup_vs_equal_accuracy_single" in r:
            note = f"{r['speedup_vs_equal_accuracy_single']:.2f}x faster than {r['equal_accuracy_single']} (≥ its top-1)"
        elif r.get("more_accurate_than_every_single"):
            note = (f"more accurate than every single; {r['speedup_vs_most_accurate_single']:.2f}x the speed of "
                    f"{r['most_accurate_single']}")
        lines.append(f"| {r['name']} | {_pct(r['top1'])} | {_pct(r['top5'])} | {r['mean_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{_rates(r['exit_histogram']) if r['kind'] == 'cascade' else '-'} | {note} |")
    lines.append("")
    for name, o in result["oracle_on_test"].items():
        lines.append(f"Oracle bound, {name}: top-1 {_pct(o['top1'])} % at {o['mean_ms_from_stage_p50']:.2f} ms mean "
                     f"(stage p50s), exits {' / '.join(f'{100 * r:.0f}%' for r in o['exit_rates'])}.")
    lines.append("")
    for name, a in result["torch_agreement"].items():
        lines.append(f"- {name} fp32 bundle vs PyTorch: top-1 agreement {100 * a['top1_agreement_with_torch']:.1f} % on "
                     f"{a['n']} images (PyTorch top-1 {100 * a['torch_top1']:.1f} %).")
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1])
    result = json.loads(path.read_text())
    render = {"cifar10_early_exit": cifar10, "imagenet_cascade": imagenet}[result["benchmark"]]
    print(render(result))


if __name__ == "__main__":
    main()
