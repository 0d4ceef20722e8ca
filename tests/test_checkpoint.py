"""train.checkpoint: Orbax checkpoints of (state, data state) restore into
today's state (written by earlier code, or before the ``factored`` field);
a resumed run falls back past a newest checkpoint that does not read back,
and a data state that does not fit is refused with one clear message."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golden_cases as gc
import salaad_jax as sj
from salaad_jax import opt_state
from salaad_jax.opt_state import FactorState, SalaadState
from salaad_jax.train.checkpoint import Checkpointer


def test_checkpoint_of_earlier_code_restores():
  restored, data = gc.restored_checkpoint()
  assert data == {"position": 3}
  state = restored["opt_state"]
  assert isinstance(state, SalaadState) and isinstance(state.factored, FactorState)
  assert int(state.count) == gc.CHECKPOINT_STEP
  with np.load(gc.FIXTURES / "checkpoint_state.npz") as want:
    gc.assert_matches(gc.flatten(restored), want, "checkpoint")


def test_checkpoints_from_before_the_factored_field_restore(tmp_path):
  """A SalaadState saved in the field layout it had before ``factored``
  (checkpoints of earlier versions) restores into today's state."""
  params = {"w": {"kernel": jnp.arange(48.0).reshape(8, 6) / 10}, "b": jnp.ones(3)}
  tx = sj.salaad(optax.adam(1e-2), every_k=2, rank_target=0.3, svt="exact")
  state = {"params": params, "opt": tx.init(params)}
  u, state["opt"] = tx.update(jax.tree.map(jnp.ones_like, params), state["opt"], params)
  old = opt_state.as_v1(state)
  assert jax.tree.structure(old) != jax.tree.structure(state)
  ckpt = Checkpointer(str(tmp_path / "ck"), async_save=False)
  ckpt.save(7, old, {"epoch": 1})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, data = ckpt.restore(abstract, 7)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert isinstance(restored["opt"], sj.SalaadState) and data == {"epoch": 1}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Any other mismatch is still an error.
  with pytest.raises(Exception):
    ckpt.restore({**abstract, "extra": jax.ShapeDtypeStruct((2,), jnp.float32)}, 7)
  ckpt.close()
