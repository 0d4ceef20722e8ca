"""Orbax checkpoints of (TrainState, data-iterator state).

One ``CheckpointManager`` item pair per step: ``state`` (StandardSave of the
TrainState) and ``data`` (JsonSave of the iterator's ``get_state()``).  Saves
are asynchronous and atomic (Orbax writes to a temporary directory and
renames it); the last ``keep`` steps are kept.  Restoring needs the abstract
TrainState (``jax.eval_shape`` with shardings), so NamedTuples come back as
NamedTuples and arrays land directly in their shardings.

Orbax cannot store zero-size arrays, which the SALAAD state uses as
placeholders for non-block leaves; they are stored as one-element arrays and
rebuilt from the abstract target on restore.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath  # orbax's path type (orbax-checkpoint depends on etils[epath])

from salaad_jax.train.config import TrainError

CHECKPOINT_DIR = "checkpoints"  # under a run's workdir


def checkpoint_dir(workdir: str) -> str:
  """Where a run in ``workdir`` keeps its checkpoints."""
  return os.path.join(workdir, CHECKPOINT_DIR)


def _encode(tree):
  return jax.tree.map(
      lambda x: jnp.zeros((1,), x.dtype, device=x.sharding) if x.size == 0 else x, tree)


def _encode_abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((1,), x.dtype, sharding=x.sharding) if x.size == 0 else x,
      tree)


def _decode(tree, abstract):
  return jax.tree.map(
      lambda x, a: jnp.zeros(a.shape, a.dtype, device=a.sharding) if a.size == 0 else x,
      tree, abstract)


def _step_dirs(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def saved_params(directory: str, step: Optional[int] = None) -> Optional[Any]:
  """The ``TrainState.params`` of checkpoint ``step`` (default: the latest)
  under ``directory`` as ShapeDtypeStructs, read from the checkpoint's
  metadata (nested dicts: NamedTuples come back as dicts of their fields);
  None when there is no checkpoint."""
  steps = _step_dirs(directory)
  if step is None:
    if not steps:
      return None
    step = steps[-1]
  path = os.path.join(directory, str(int(step)), "state")
  if not os.path.isdir(path):
    return None
  # The item's own metadata: the checkpoint-level metadata file lives one
  # directory up, and StandardCheckpointer would warn that it is missing here.
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree["params"],
                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


class Checkpointer:
  """Saves and restores training checkpoints under ``directory``."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving ``state`` (global arrays) and ``data_state`` at ``step``."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(_encode(state)),
                              data=ocp.args.JsonSave(data_state))
    self._manager.save(int(step), args=args, force=True)

  def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, dict]:
    """(state, data_state) of ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else int(step)
    if step is None or step not in self.all_steps():
      raise TrainError(f"no checkpoint {'' if step is None else f'at step {step} '}in "
                       f"{self.directory}; steps: {self.all_steps()}")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_encode_abstract(abstract_state)),
                              data=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise TrainError(f"checkpoint {step} in {self.directory} does not fit this "
                       f"configuration: {first}") from None
    return _decode(restored.state, abstract_state), dict(restored.data or {})

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
