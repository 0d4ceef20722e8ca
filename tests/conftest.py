"""Test configuration: 8 fake CPU devices for multi-device tests.

XLA reads the flag when the backend starts, so it is set before any test
module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU sizes its thread pool from NPROC; with one thread per core, batched
# LAPACK calls on a 2-core machine have been seen to wait on each other.
os.environ.setdefault("NPROC", "8")
