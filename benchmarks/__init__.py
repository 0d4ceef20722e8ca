"""Benchmark scripts (``python -m benchmarks.<name>``); results in RESULTS.md.

NPROC (the XLA:CPU intra-op pool size) is raised to at least 8 before any
script imports JAX, for the reason given in ``experiments/__init__.py``.
"""

import os

os.environ.setdefault("NPROC", str(max(8, os.cpu_count() or 1)))
