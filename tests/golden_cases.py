"""Golden runs of the SALAAD transform: a few short runs whose final params
and optimizer state are kept as fixtures (``tests/fixtures/golden``), so a
change to the transform's code that moves its arithmetic shows up.

``python tests/golden_cases.py`` rewrites the fixtures (the .npz files and
the Orbax checkpoint) from the code as it is: do it only for a change of
behaviour that is meant, and say so in the commit.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":  # compile as the test session does (tests/conftest.py)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                        "--xla_cpu_use_fusion_emitters=false "
                        "--xla_cpu_parallel_codegen_split_count=1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import salaad_jax as sj
from salaad_jax import schedules

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "golden"
CHECKPOINT = FIXTURES / "checkpoint"
CHECKPOINT_STEP = 7
CHECKPOINT_CASE = "factors_budgets"
STEPS = 12
CONSOLIDATE_FROM = 6

# Two blocks of one shape (a vmapped group), a rank-3 kernel (a matrix view),
# a block of another shape and a vector that is no block.
SHAPES = {"a": {"kernel": (16, 12)}, "b": {"kernel": (16, 12)}, "c": {"kernel": (4, 6, 10)},
          "d": {"kernel": (20, 8)}, "e": {"bias": (12,)}}

_COMMON = dict(every_k=2, rho=0.5, rank_target=0.3, density_target=0.1, deriv_start=2)
CONSOLIDATE = dict(_COMMON, consolidate_from=CONSOLIDATE_FROM)


def adam():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))


# name -> (transform factory, whether update gets grad_fn)
CASES = {
    "admm": (lambda: sj.salaad(adam(), alpha_init="sigma_k", **_COMMON), False),
    "admm_decoupled_spread": (lambda: optax.chain(optax.adam(0.05), sj.salaad_decoupled(
        0.05, spread_rounds=True, sparse_capacity=None, sparse_mode="topk",
        target_schedule=schedules.cubic_looseness(4.0),
        rho_schedule=schedules.tanh_rho_ramp(2.0, 2.0), **_COMMON)), False),
    "projection": (lambda: sj.salaad(adam(), **CONSOLIDATE), False),
    "projection_dropout": (lambda: sj.salaad(
        adam(), consolidate_structure="current", consolidate_dropout=0.3, **CONSOLIDATE),
        False),
    "factors_budgets": (lambda: sj.salaad(
        adam(), consolidate_params="factors", consolidate_factor_lr=2.0,
        consolidate_cut_budgets=(0.4, 0.7, 1.0), consolidate_cut_overhead=1 / 16,
        consolidate_cut_jitter=0.05, **CONSOLIDATE), False),
    "factors_global_dropout": (lambda: sj.salaad(
        adam(), consolidate_params="factors", consolidate_global_dropout=0.5,
        **CONSOLIDATE), False),
    "factors_joint": (lambda: sj.salaad(
        adam(), consolidate_params="factors", consolidate_cut_budgets=(0.5, 1.0),
        consolidate_cut_joint=0.5, **CONSOLIDATE), True),
}


def initial_params():
  leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, s, jnp.float32)
                                      for k, s in zip(keys, leaves)])


def _targets():
  return jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.5, initial_params())


def loss(params):
  """A smooth non-quadratic loss pulling every leaf to a fixed target."""
  t = _targets()
  return sum(jnp.sum(0.5 * (p - q) ** 2 + 0.05 * p ** 4)
             for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(t)))


# The transform of each case and the compiled step of each transform, built
# once per process: the runs of one case (to its end, one step short, resumed
# from the checkpoint) compile its step once.  A transform holds no state of
# its own, so a run gets nothing from the one before but the compiled program.
_TRANSFORMS = {}
_STEPS = {}


def run(name: str, steps: int = STEPS, start=None):
  """(params, state) after ``steps`` steps of case ``name``, from the
  initial params and state or from ``start`` = (params, state)."""
  make, joint = CASES[name]
  if name not in _TRANSFORMS:
    _TRANSFORMS[name] = make()
  return run_transform(_TRANSFORMS[name], steps, start, joint)


def _step(tx, joint: bool):
  """The jitted train step of ``tx`` on :func:`loss`."""
  key = (id(tx), joint)
  if key not in _STEPS:
    grad_fn = jax.grad(loss)

    @jax.jit
    def step(params, state):
      extra = {"grad_fn": grad_fn} if joint else {}
      updates, state = tx.update(grad_fn(params), state, params, **extra)
      return optax.apply_updates(params, updates), state

    _STEPS[key] = (tx, step)  # tx kept alive: its id stays its own
  return _STEPS[key][1]


def run_transform(tx, steps: int, start=None, joint: bool = False):
  """:func:`run` for the transform ``tx`` (``joint``: its update takes grad_fn)."""
  params = initial_params()
  params, state = start if start is not None else (params, tx.init(params))
  # Committed to the one device, as a restored checkpoint's arrays are, so
  # that a resumed run calls the step with the arguments the others give it.
  params, state = jax.device_put((params, state), jax.devices()[0])
  step = _step(tx, joint)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def flatten(tree) -> dict[str, np.ndarray]:
  """Leaves of ``tree`` by their key paths (placeholders included)."""
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def fixture_path(name: str) -> Path:
  return FIXTURES / f"{name}.npz"


# Not bitwise: a reordering of float32 operations may move the last bits,
# which a few SVDs and thresholds amplify a little.  The fixtures hold what the
# test session's XLA flags (conftest.py; the same as ``main`` below) compute:
# other flags reorder operations enough to flip the signs of singular vectors
# (L = U diag(s) V^T stays within 1e-5) and one threshold decision.
RTOL, ATOL = 1e-4, 1e-5


def assert_matches(got: dict, want, what: str):
  """``got`` (``flatten``-ed) holds the leaves of the fixture ``want`` (an
  .npz), of the same shapes and dtypes, floats within RTOL/ATOL."""
  assert sorted(got) == sorted(want.files), f"{what}: the state's leaves differ"
  for key in want.files:
    g, w = got[key], want[key]
    assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {key}: {g.shape} {g.dtype}"
    if np.issubdtype(w.dtype, np.floating):
      np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"{what} {key}")
    else:
      np.testing.assert_array_equal(g, w, err_msg=f"{what} {key}")


def restored_checkpoint(directory=CHECKPOINT):
  """(state, data state) of the checkpoint at ``directory`` (the fixture's:
  written by earlier code), step CHECKPOINT_STEP, restored against the
  abstract state of today's code."""
  from salaad_jax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  tx, _ = CASES[CHECKPOINT_CASE]
  abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": tx().init(p)},
                            initial_params())
  ckpt = Checkpointer(str(directory), reader=True)
  restored, data = ckpt.restore(abstract, CHECKPOINT_STEP)
  ckpt.close()
  return restored, data


def _write_checkpoint():
  from salaad_jax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  params, state = run(CHECKPOINT_CASE, CHECKPOINT_STEP)
  shutil.rmtree(CHECKPOINT, ignore_errors=True)
  ckpt = Checkpointer(str(CHECKPOINT), async_save=False)
  ckpt.save(CHECKPOINT_STEP, {"params": params, "opt_state": state}, {"position": 3})
  ckpt.wait()
  ckpt.close()
  np.savez_compressed(FIXTURES / "checkpoint_state.npz",
           **flatten({"params": params, "opt_state": state}))


def main():
  FIXTURES.mkdir(parents=True, exist_ok=True)
  for name in CASES:
    params, state = run(name)
    np.savez_compressed(fixture_path(name), **flatten({"params": params, "opt_state": state}))
    print(name, os.path.getsize(fixture_path(name)), "bytes")
  _write_checkpoint()


if __name__ == "__main__":
  sys.exit(main())
