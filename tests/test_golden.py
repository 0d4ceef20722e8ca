"""The transform against its golden runs (``golden_cases``): the params and
optimizer state after a few steps of ADMM rounds, consolidation by
projection and in factors (cut budgets, global dropout, the joint cut loss)
match those the fixtures hold, and a checkpoint written then restores."""

import jax
import numpy as np
import pytest

import golden_cases as gc
from salaad_jax.opt_state import FactorState, SalaadState
from salaad_jax.train.checkpoint import Checkpointer

# Not bitwise: a reordering of float32 operations may move the last bits,
# which a few SVDs and thresholds amplify a little.
RTOL, ATOL = 1e-4, 1e-5


def _assert_matches(got: dict, want, what: str):
  assert sorted(got) == sorted(want.files), f"{what}: the state's leaves differ"
  for key in want.files:
    g, w = got[key], want[key]
    assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {key}: {g.shape} {g.dtype}"
    if np.issubdtype(w.dtype, np.floating):
      np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"{what} {key}")
    else:
      np.testing.assert_array_equal(g, w, err_msg=f"{what} {key}")


@pytest.mark.parametrize("name", sorted(gc.CASES))
def test_run_matches_its_golden_state(name):
  params, state = gc.run(name)
  with np.load(gc.fixture_path(name)) as want:
    _assert_matches(gc.flatten({"params": params, "opt_state": state}), want, name)


def test_golden_comparison_can_fail():
  params, state = gc.run("admm", gc.STEPS - 1)  # one step short
  with np.load(gc.fixture_path("admm")) as want:
    with pytest.raises(AssertionError):
      _assert_matches(gc.flatten({"params": params, "opt_state": state}), want, "admm")


def _restored():
  tx, _ = gc.CASES[gc.CHECKPOINT_CASE]
  abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": tx().init(p)},
                            gc.initial_params())
  ckpt = Checkpointer(str(gc.CHECKPOINT), reader=True)
  restored, data = ckpt.restore(abstract, gc.CHECKPOINT_STEP)
  ckpt.close()
  return restored, data


def test_checkpoint_of_earlier_code_restores():
  restored, data = _restored()
  assert data == {"position": 3}
  state = restored["opt_state"]
  assert isinstance(state, SalaadState) and isinstance(state.factored, FactorState)
  assert int(state.count) == gc.CHECKPOINT_STEP
  with np.load(gc.FIXTURES / "checkpoint_state.npz") as want:
    _assert_matches(gc.flatten(restored), want, "checkpoint")


def test_resumed_run_with_cut_budgets_draws_the_same_cuts():
  """A run resumed from the checkpoint (a new transform, three cut budgets,
  jitter) ends where the uninterrupted run ends."""
  restored, _ = _restored()
  params, state = gc.run(gc.CHECKPOINT_CASE, gc.STEPS - gc.CHECKPOINT_STEP,
                         start=(restored["params"], restored["opt_state"]))
  with np.load(gc.fixture_path(gc.CHECKPOINT_CASE)) as want:
    _assert_matches(gc.flatten({"params": params, "opt_state": state}), want, "resumed")
