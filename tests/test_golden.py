"""The transform against its golden runs (``golden_cases``): the params and
optimizer state after a few steps of ADMM rounds, consolidation by
projection and in factors (cut budgets, global dropout, the joint cut loss)
match those the fixtures hold, also when resumed from the fixture checkpoint
(which tests/test_checkpoint.py restores)."""

import numpy as np
import pytest

import golden_cases as gc

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(gc.CASES))
def test_run_matches_its_golden_state(name):
  params, state = gc.run(name)
  with np.load(gc.fixture_path(name)) as want:
    gc.assert_matches(gc.flatten({"params": params, "opt_state": state}), want, name)


@pytest.mark.slow
def test_golden_comparison_can_fail():
  params, state = gc.run("admm", gc.STEPS - 1)  # one step short
  with np.load(gc.fixture_path("admm")) as want:
    with pytest.raises(AssertionError):
      gc.assert_matches(gc.flatten({"params": params, "opt_state": state}), want, "admm")


@pytest.mark.slow
def test_resumed_run_with_cut_budgets_draws_the_same_cuts():
  """A run resumed from the checkpoint (the case's transform: three cut budgets,
  jitter) ends where the uninterrupted run ends."""
  restored, _ = gc.restored_checkpoint()
  params, state = gc.run(gc.CHECKPOINT_CASE, gc.STEPS - gc.CHECKPOINT_STEP,
                         start=(restored["params"], restored["opt_state"]))
  with np.load(gc.fixture_path(gc.CHECKPOINT_CASE)) as want:
    gc.assert_matches(gc.flatten({"params": params, "opt_state": state}), want, "resumed")
