"""Test configuration: 8 fake CPU devices, the ``slow`` lane, and trained runs
shared by the whole session.

XLA reads the device-count flag when the backend starts, so it is set before
any test module imports jax.

Speed conventions (the suite has to fit in a few minutes on 2 CPU cores):

* Compiled programs are shared through a persistent XLA compilation cache
  (below): keep shapes and configurations equal across tests where the
  assertion allows, so that they compile once per session.

* ``@pytest.mark.slow`` marks a test that trains (runs an optimiser over
  several steps, a toy problem's included) and takes more than a second or
  two, or starts subprocesses.  ``pytest -q`` runs everything; ``pytest -q -m
  "not slow"`` is the fast lane for development (under 2 minutes on 2 cores):
  the unit tests of the operators, models, accounting and deployment.
* ``cached_dir(tmp_path_factory, key, build)`` builds a directory once per test session
  (across xdist workers: the first worker to take its lock builds it, the
  others wait and reuse it).  Use it for any trained run that tests in more
  than one module read (``shakespeare_runs`` below), or whose tests copy it
  (``reference`` in test_fault_tolerance.py); within one module a
  module-scoped fixture is computed once (next point).  Tests that read such a
  directory must not change it (copy it first).  A test that requests a fixture listed in ``TRAINED_FIXTURES`` is
  marked slow automatically.
* The suite runs with ``--dist loadfile``: each module's tests run on one
  worker, so a module-scoped fixture is computed once.  (pytest-xdist's
  ``--dist loadgroup`` does not group under pytest 9: it renames
  ``item._nodeid``, which pytest 9 no longer reads.)  xdist hands out the
  modules with the most tests first (its ``--loadscope-reorder``, the default); a
  simulation of that hand-out on one run's module times came within 2 % of
  the best order (longest first), so the suite does not order them itself.
* OpenBLAS, MKL and OpenMP get one thread per process (below).
"""

import atexit
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

# XLA:CPU compiles for the tests, not for speed: the suite's programs are
# tiny, so compiling them is most of its time and running them almost none.
# Backend optimisation level 0 skips LLVM's optimisation of the generated code,
# and without the fusion emitters XLA:CPU's fusions are emitted by its older,
# cheaper loop emitter (HLO passes, fusion included, still run).  A cold tiny
# flag-file run (5 steps) spends half the CPU (user 23.5 s -> 11.2 s), a
# 300-step one less too (27.6 s -> 21.5 s), with the same losses.  Every
# process of the session (subprocess apps, notebook kernels) inherits them
# through XLA_FLAGS.  XLA:CPU also splits each program's generated code into
# modules to compile them in parallel; one module is cheaper for these small
# programs on a worker's one core: the fast lane took 88-92 s against 94-101 s
# with the default split, two back-to-back pairs, the same results.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One BLAS/LAPACK thread per process.  The suite runs one xdist worker per core
# (and the apps they start on top), so OpenBLAS's own threads only contend: on
# 2 busy cores, threaded OpenBLAS (NumPy's, and jaxlib's CPU SVD/eigh/QR, which
# call the same library) spends ~100x longer in an SVD of a small block than one
# thread does (8 blocks of 172 x 64: 1.1 s against 0.01 s).  OpenBLAS reads this
# when it is loaded, so it is set before anything imports NumPy.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")
# XLA:CPU sizes its thread pool from NPROC; with one thread per core, batched
# LAPACK calls on a 2-core machine have been seen to wait on each other.
os.environ.setdefault("NPROC", "8")
# Each xdist worker (and the apps and kernels it starts, which inherit it) on
# its own share of the CPUs: one core each when there are as many workers as
# cores (``-n auto``).  Unpinned, the XLA:CPU thread pools (NPROC threads
# each, above) of the workers and their apps contend for every core: on 2
# cores the fast lane took 1 min 45 s pinned against 2 min 01 s unpinned,
# back to back.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
  _cpus = sorted(os.sched_getaffinity(0))
  _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
  if 1 < _workers <= len(_cpus):
    try:
      os.sched_setaffinity(0, _cpus[int(_WORKER[2:]) % _workers::_workers])
    except (OSError, ValueError):  # an optimisation only: run unpinned
      pass
# One persistent XLA compilation cache for the session: the xdist workers, the
# apps they start in subprocesses and the notebook kernels inherit it, so the
# same train step (the tiny flag file's, say) is compiled once, not once per
# process.  Created empty by the process that starts the session and removed
# when it exits; a compile under 0.2 s is not worth a file.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="salaad-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# The paths the suite shares (tests/helpers.py, which imports JAX: only once
# the environment above is set), imported by name from here too.
from helpers import ROOT, SHAKESPEARE, TINY_FLAGS  # pylint: disable=wrong-import-position
from hypothesis import settings  # pylint: disable=wrong-import-position

# One hypothesis profile for the whole suite, whatever runs first: 40 examples
# per property (a test's own @settings wins), no deadline (the first example
# of a property compiles its XLA programs).
settings.register_profile("suite", max_examples=40, deadline=None)
settings.load_profile("suite")


# ---------------------------------------------------------------------------
# The slow lane.
# ---------------------------------------------------------------------------


# Fixtures that train or start an app (the session's through ``cached_dir``,
# the modules' own): a test requesting one is slow.
TRAINED_FIXTURES = ("shakespeare_runs", "compared", "fair", "reference", "pretrained",
                    "one_device_run")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Marks the tests of ``TRAINED_FIXTURES`` slow."""
  del config
  for item in items:
    if any(f in getattr(item, "fixturenames", ()) for f in TRAINED_FIXTURES):
      item.add_marker(pytest.mark.slow)


# ---------------------------------------------------------------------------
# Directories built once per session.
# ---------------------------------------------------------------------------


def _shared_root(tmp_path_factory) -> Path:
  """A folder every xdist worker of this session sees (the workers' base
  temporary directories are siblings)."""
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_cache"
  root.mkdir(exist_ok=True)
  return root


def cached_dir(tmp_path_factory, key: str, build: Callable[[Path], None]) -> Path:
  """``<session cache>/<key>``, filled by ``build(path)`` the first time any
  worker asks for it.  A failed build leaves nothing behind (the next caller
  tries again and sees the same error)."""
  root = _shared_root(tmp_path_factory)
  path = root / key
  with open(root / f"{key}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      done = root / f"{key}.done"
      if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        try:
          build(path)
        except BaseException:
          shutil.rmtree(path, ignore_errors=True)
          raise
        done.write_text("")
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return path


# ---------------------------------------------------------------------------
# The app in a subprocess.
# ---------------------------------------------------------------------------


def app_env(devices: int = 1) -> dict:
  """Environment for ``python -m experiments.*`` / ``benchmarks.*``: CPU,
  ``devices`` fake devices, and an XLA:CPU pool that grows with them (each
  fake device runs its own batched LAPACK calls on it)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", NPROC=str(8 * devices), PYTHONUNBUFFERED="1")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def run_app_cases(module: str, cases: list, devices: int = 1,
                  timeout: float = 300) -> list[subprocess.CompletedProcess]:
  """``python -m module *args`` for every ``args`` of ``cases``, each as a
  fresh process would run it but forked from one that imported JAX and the
  package once (tests/app_batch.py): for input an app refuses before it
  trains, where the imports are most of the cost.  One CompletedProcess per
  case, in order."""
  cmd = [sys.executable, str(ROOT / "tests" / "app_batch.py"), module]
  done = subprocess.run(cmd, cwd=ROOT, env=app_env(devices), input=json.dumps(cases),
                        capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  return [subprocess.CompletedProcess([sys.executable, "-m", module, *args], r["returncode"],
                                      r["stdout"], r["stderr"])
          for args, r in zip(cases, json.loads(done.stdout))]


def run_app(module: str, *args, devices: int = 1, timeout: float = 240,
            **kwargs) -> subprocess.CompletedProcess:
  """``python -m module *args`` in ``app_env(devices)``, its output captured
  (``kwargs`` go to ``subprocess.run``)."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=app_env(devices),
                        capture_output=True, text=True, timeout=timeout, **kwargs)


def pretrain_app(*args, devices: int = 1, timeout: float = 240,
                 **kwargs) -> subprocess.CompletedProcess:
  """``python -m experiments.pretrain --flagfile=tiny.flags *args``."""
  return run_app("experiments.pretrain", f"--flagfile={TINY_FLAGS}", *args, devices=devices,
                 timeout=timeout, **kwargs)


def compare_app(*args, timeout: float = 900) -> subprocess.CompletedProcess:
  """``python -m benchmarks.compare *args``."""
  return run_app("benchmarks.compare", *args, timeout=timeout)


# ---------------------------------------------------------------------------
# A SALAAD run and a dense run of the tiny model on the same data.
# ---------------------------------------------------------------------------


class RunPair(NamedTuple):
  salaad: Path
  dense: Path
  source: str       # the data both were trained on
  real_text: bool   # tinyshakespeare.txt (else the synthetic corpus)


# 300 steps of batch 8 x 64 tokens: the controller settles (rank and density
# near their targets) and SALAAD's loss is within 10 % of dense on real text.
SHAKESPEARE_STEPS = 300
SHAKESPEARE_EVAL_BATCHES = 10


@pytest.fixture(scope="session")
def shakespeare_runs(tmp_path_factory) -> RunPair:
  """The tiny flag file's SALAAD run and its dense twin, trained concurrently
  once per session on ``tinyshakespeare.txt`` (the synthetic corpus when the
  file is absent): 300 steps, batch 8, sequence 64, the train metrics logged
  every 20 steps, 10 validation batches, the final checkpoint only."""
  real = SHAKESPEARE.exists()
  source = str(SHAKESPEARE) if real else "synthetic:order=1"
  common = [f"--source={source}", f"--steps={SHAKESPEARE_STEPS}", "--batch_size=8",
            "--seq_len=64", "--warmup_steps=30", "--log_every=20", "--eval_every=0",
            f"--eval_batches={SHAKESPEARE_EVAL_BATCHES}", "--checkpoint_every=0"]

  # An ADMM-trained run with a fast controller and no consolidation (the
  # tiny flag file's preset consolidates): the spectrum properties and the
  # target test are about deploying the L + S that ADMM itself finds.
  admm = ["--consolidate_from=0", "--rank_target=0.15", "--density_target=0.05",
          "--every_k=5", "--rho=0.003", "--rho_embed=0.003", "--k_alpha=1.0",
          "--k_beta=0.3", "--alpha_init=sigma_k"]

  def train(path: Path, method: str) -> None:
    extra = admm if method == "salaad" else []
    out = pretrain_app(f"--workdir={path / method}", f"--method={method}", *common, *extra,
                       timeout=900)
    assert out.returncode == 0, (method, out.stderr[-3000:])

  def build(path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
      list(pool.map(lambda m: train(path, m), ("salaad", "dense")))

  root = cached_dir(tmp_path_factory, "shakespeare_runs", build)
  return RunPair(root / "salaad", root / "dense", source, real)
