"""The real-data benchmarks behind docs/benchmarks.md; run each from the repository root as ``python -m benchmarks.<name>``.

They need the shared data folder (``../shared/data`` next to the repository, or ``--data DIR``)
and skip with a message (exit status 0) without it. :mod:`benchmarks.harness` holds what they share.
"""
