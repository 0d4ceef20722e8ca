"""train.checkpoint: Orbax checkpoints of (state, data state) restore into
today's state (written by earlier code, or before the ``factored`` field);
a resumed run falls back past a newest checkpoint that does not read back,
and a data state that does not fit is refused with one clear message."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golden_cases as gc
import salaad_jax as sj
from helpers import tiny_config
from salaad_jax import opt_state
from salaad_jax.opt_state import FactorState, SalaadState
from salaad_jax.train import TrainError, train_and_evaluate
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


# ---------------------------------------------------------------------------
# A resumed run: the newest checkpoint that restores.
# ---------------------------------------------------------------------------


def _three_checkpoints(directory):
  """Steps 1, 2, 3 of a state whose values are the step, data state {'step': s}."""
  ckpt = Checkpointer(str(directory), keep=5, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, {"w": jnp.full((4, 3), float(step)), "n": jnp.asarray(step)}, {"step": step})
  ckpt.wait()
  ckpt.close()
  return {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32),
          "n": jax.ShapeDtypeStruct((), jnp.asarray(1).dtype)}


@pytest.mark.parametrize("damage", ["state/_METADATA:garbage", "state/_METADATA:missing",
                                    "data/metadata:garbage"])
def test_unreadable_metadata_of_the_newest_checkpoint_falls_back_to_the_one_before(
    tmp_path, caplog, damage):
  abstract = _three_checkpoints(tmp_path / "ck")
  name, how = damage.split(":")
  path = tmp_path / "ck" / "3" / name
  if how == "garbage":
    path.write_text('{"garbage')
  else:
    path.unlink()
  ckpt = Checkpointer(str(tmp_path / "ck"), keep=5, async_save=False)
  with caplog.at_level("WARNING"):
    step, state, data = ckpt.restore_latest(abstract)
  assert (step, data, int(state["n"])) == (2, {"step": 2}, 2)
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 2.0))
  # Set aside, not deleted, with one warning line naming it; the run goes on
  # saving in the same directory.
  assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "2", "3.corrupt"]
  warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint 3 in {tmp_path / 'ck'}")
  ckpt.save(3, {"w": jnp.zeros((4, 3)), "n": jnp.asarray(3)}, {"step": 3})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2, 3]
  ckpt.close()


def test_the_checkpoint_level_metadata_alone_loses_no_checkpoint(tmp_path):
  # Orbax's _CHECKPOINT_METADATA (save time and the like) is not needed to
  # read the state and the data state back.
  abstract = _three_checkpoints(tmp_path / "ck")
  (tmp_path / "ck" / "3" / "_CHECKPOINT_METADATA").write_text('{"garbage')
  ckpt = Checkpointer(str(tmp_path / "ck"), reader=True)
  step, state, data = ckpt.restore_latest(abstract)
  assert (step, data, int(state["n"])) == (3, {"step": 3}, 3)
  ckpt.close()


def test_a_data_state_that_does_not_fit_is_set_aside_like_an_unreadable_one(tmp_path):
  abstract = _three_checkpoints(tmp_path / "ck")

  def check(data_state):
    if data_state["step"] == 3:
      raise TrainError("data state does not fit")

  ckpt = Checkpointer(str(tmp_path / "ck"), keep=5, async_save=False)
  step, _, data = ckpt.restore_latest(abstract, check=check)
  assert (step, data) == (2, {"step": 2})
  assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "2", "3.corrupt"]
  ckpt.close()


def _snapshot(directory):
  return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
          if p.is_file()}


@pytest.mark.slow  # trains the tiny model
def test_resuming_with_data_states_that_do_not_fit_is_one_clear_error(tmp_path):
  """Every checkpoint's data state written for another batch size: the
  resumed run refuses with one message naming the source, the checkpoints
  and what does not fit, and leaves the directory as it was."""
  wd = tmp_path / "run"
  config = tiny_config(steps=4, checkpoint_every=2, keep_checkpoints=3)
  train_and_evaluate(config, str(wd), devices=jax.devices()[:1])
  for step in ("2", "4"):
    meta = wd / "checkpoints" / step / "data" / "metadata"
    state = json.loads(meta.read_text())
    assert state["batch_size"] == config.batch_size
    meta.write_text(json.dumps(dict(state, batch_size=2 * config.batch_size)))
  before = _snapshot(wd / "checkpoints")
  with pytest.raises(TrainError) as caught:
    train_and_evaluate(config.replace(steps=6), str(wd), devices=jax.devices()[:1])
  message = str(caught.value)
  assert message.startswith(
      f"no checkpoint in {wd / 'checkpoints'} can be restored (step 4: TrainError: data state "
      f"does not fit --source={config.source}: "), message
  mismatch = (f"state has batch_size={2 * config.batch_size} but this iterator has "
              f"batch_size={config.batch_size}")
  assert message.count(mismatch) == 2 and "; step 2: TrainError: data state" in message, message
  assert "\n" not in message and "nothing was changed there" in message
  assert _snapshot(wd / "checkpoints") == before
