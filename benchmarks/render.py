"""Render benchmark result files as markdown, optionally into their sections of docs/benchmarks.md.

    python -m benchmarks.render benchmarks/results/cifar10_early_exit.json [--into docs/benchmarks.md]

Each result file names its benchmark; that benchmark's ``markdown`` renders it (files of the same
benchmark form one section, in the order given).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from benchmarks.harness import load_result, publish


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="+", help="result JSON files")
    ap.add_argument("--into", type=Path, default=None, metavar="DOC", help="also write each section into DOC")
    args = ap.parse_args(argv)
    by_benchmark: dict[str, list[dict]] = {}
    for path in args.results:
        result = load_result(path)
        by_benchmark.setdefault(result["benchmark"], []).append(result)
    for name, results in by_benchmark.items():
        module = importlib.import_module(f"benchmarks.{name}")
        publish(args, name, getattr(module, "HEADER", "") + "\n".join(module.markdown(r) for r in results))


if __name__ == "__main__":
    main()
