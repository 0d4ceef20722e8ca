"""Orbax checkpoints of (TrainState, data-iterator state).

One ``CheckpointManager`` item pair per step: ``state`` (StandardSave of the
TrainState) and ``data`` (JsonSave of the iterator's ``get_state()``).  Saves
are asynchronous and atomic: Orbax writes ``<step>.orbax-checkpoint-tmp-*``
and renames it to ``<step>`` once complete, and removes steps beyond the last
``keep`` only after that commit, so a failed or killed save leaves every
earlier checkpoint as it was (leftover temporary directories are removed when
the next run opens the directory).  Restoring needs the abstract TrainState
(``jax.eval_shape`` with shardings), so NamedTuples come back as NamedTuples
and arrays land directly in their shardings.

A resumed run restores the newest checkpoint that reads back
(:meth:`Checkpointer.restore_latest`): an unreadable newer one (truncated or
missing files, bad metadata, another structure) is renamed to
``<step>.corrupt`` -- never deleted -- once an older one has restored.
Readers of a finished run (:meth:`Checkpointer.restore`) get the step they
ask for or a one-line error.

Orbax cannot store zero-size arrays, which the SALAAD state uses as
placeholders for non-block leaves; they are stored as one-element arrays and
rebuilt from the abstract target on restore.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath  # orbax's path type (orbax-checkpoint depends on etils[epath])
from jax.experimental import multihost_utils

from salaad_jax import opt_state
from salaad_jax.train.config import TrainError

CHECKPOINT_DIR = "checkpoints"  # under a run's workdir
CORRUPT_SUFFIX = ".corrupt"  # an unreadable step set aside: <step>.corrupt


def checkpoint_dir(workdir: str) -> str:
  """Where a run in ``workdir`` keeps its checkpoints."""
  return os.path.join(workdir, CHECKPOINT_DIR)


class CheckpointError(TrainError):
  """A checkpoint could not be found, read back or written."""


class UnreadableCheckpointError(CheckpointError):
  """A checkpoint is there but does not restore."""


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


def _reason(e: BaseException) -> str:
  """One line for why ``e`` happened: its innermost cause (TensorStore wraps
  e.g. ``OUT_OF_RANGE: ... byte range ... is not valid`` into a generic
  'Encountered error while reading array')."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  text = str(e).strip()
  line = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
  return line if len(line) <= 300 else line[:297] + "..."


def _everywhere(ok: bool) -> bool:
  """True when ``ok`` holds on every process (all of them take the same step)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _step_dirs(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def _params_metadata(directory: str, step: int) -> Any:
  path = os.path.join(directory, str(int(step)), "state")
  # The item's own metadata: the checkpoint-level metadata file lives one
  # directory up, and StandardCheckpointer would warn that it is missing here.
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree["params"],
                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def saved_params(directory: str, step: Optional[int] = None) -> Optional[Any]:
  """The ``TrainState.params`` of checkpoint ``step`` under ``directory`` as
  ShapeDtypeStructs, read from the checkpoint's metadata (nested dicts:
  NamedTuples come back as dicts of their fields).  Default: the newest
  checkpoint whose metadata reads (the steps of one run share their shapes).
  None when there is no such checkpoint.

  Raises:
    CheckpointError: the metadata of the given ``step`` cannot be read.
  """
  steps = _step_dirs(directory)
  if step is not None:
    if int(step) not in steps:
      return None
    try:
      return _params_metadata(directory, step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise UnreadableCheckpointError(f"checkpoint {step} in {directory} cannot be read "
                            f"({_reason(e)})") from None
  for candidate in reversed(steps):
    try:
      return _params_metadata(directory, candidate)
    except Exception:  # pylint: disable=broad-exception-caught
      continue  # restore_latest reports it
  return None


class Checkpointer:
  """Saves and restores training checkpoints under ``directory``
  (``reader``: only for restoring; creates, cleans up and removes nothing)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               reader: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if reader else keep, create=not reader,
        cleanup_tmp_directories=not reader, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._async = async_save
    self._saving: Optional[int] = None  # the step of the save in flight

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  # -- saving ------------------------------------------------------------------
  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving ``state`` (global arrays) and ``data_state`` at ``step``.

    Raises:
      CheckpointError: this save (or the one before, still in flight) failed;
        the checkpoints committed before it are intact.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(_encode(state)),
                              data=ocp.args.JsonSave(data_state))
    self.wait()
    self._saving = int(step)
    try:
      self._manager.save(int(step), args=args, force=True)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_error(e) from None
    if not self._async:
      self._saving = None

  def wait(self) -> None:
    """Blocks until every started save is on disk.

    Raises:
      CheckpointError: a save failed (the earlier checkpoints are intact).
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_error(e) from None
    self._saving = None

  def _save_error(self, e: BaseException) -> CheckpointError:
    step, self._saving = self._saving, None
    self._manager.reload()  # what is committed on disk
    kept = [s for s in self.all_steps() if s != step]
    return CheckpointError(
        f"saving checkpoint {step} in {self.directory} failed ({_reason(e)}); "
        f"{f'the earlier checkpoints (steps {kept}) are intact' if kept else 'no earlier checkpoint'}"
        "; free space or fix the directory, then run the same command again to resume")

  # -- restoring ---------------------------------------------------------------
  def _restore(self, abstract_state, step: int) -> tuple[Any, dict]:
    def read(abstract):
      args = ocp.args.Composite(state=ocp.args.StandardRestore(_encode_abstract(abstract)),
                                data=ocp.args.JsonRestore())
      return self._manager.restore(step, args=args)

    try:
      restored = read(abstract_state)
      state = restored.state
    except ValueError as e:
      # Checkpoints written before SalaadState had its ``factored`` field.
      legacy = opt_state.as_v1(abstract_state)
      if ("tree structures do not match" not in str(e)
          or jax.tree.structure(legacy) == jax.tree.structure(abstract_state)):
        raise
      restored = read(legacy)
      state = opt_state.from_v1(restored.state)
    return _decode(state, abstract_state), dict(restored.data or {})

  def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, dict]:
    """(state, data_state) of ``step`` (default: the latest), without falling
    back to another step.

    Raises:
      CheckpointError: no such checkpoint, or one that does not read back
        (the message names the other steps).
    """
    steps = self.all_steps()
    if step is None and steps:
      step = steps[-1]
    if step is None or int(step) not in steps:
      raise CheckpointError(f"no checkpoint {'' if step is None else f'at step {step} '}in "
                            f"{self.directory}; steps: {steps}")
    step = int(step)
    try:
      return self._restore(abstract_state, step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      others = [s for s in steps if s != step]
      raise UnreadableCheckpointError(f"checkpoint {step} in {self.directory} cannot be restored "
                            f"({_reason(e)}); other steps there: {others}") from None

  def restore_latest(self, abstract_state, check: Optional[Callable[[dict], Any]] = None
                     ) -> Optional[tuple[int, Any, dict]]:
    """(step, state, data_state) of the newest checkpoint that restores, or
    None when there is none.  ``check(data_state)`` raises when the data
    state does not fit (the step then counts as unreadable).

    Each newer checkpoint that failed is logged as one warning line (its step
    and why) and renamed to ``<step>.corrupt``.

    Raises:
      CheckpointError: there are checkpoints but none restores (all are left
        in place).
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self._restore(abstract_state, step)
        if check is not None:
          check(data_state)
        ok = True
      except Exception as e:  # pylint: disable=broad-exception-caught
        failures.append((step, _reason(e)))
        ok = False
      everywhere = _everywhere(ok)
      if ok and not everywhere:
        failures.append((step, "it failed on another process"))
      if everywhere:
        for bad, why in failures:
          aside = self._set_aside(bad)
          logging.warning("checkpoint %d in %s cannot be restored (%s); renamed to %s",
                          bad, self.directory, why, aside)
        return step, state, data_state
    if not failures:
      return None
    shown = "; ".join(f"step {s}: {why}" for s, why in failures[:2])
    raise UnreadableCheckpointError(
        f"no checkpoint in {self.directory} can be restored ({shown}"
        f"{'; ...' if len(failures) > 2 else ''}); nothing was changed there: restore a "
        "copy of the directory, or move it away to train from scratch")

  def _set_aside(self, step: int) -> str:
    """Renames ``<step>`` to ``<step>.corrupt`` (``.corrupt.<n>`` if taken)."""
    source = os.path.join(self.directory, str(step))
    target, n = source + CORRUPT_SUFFIX, 1
    while os.path.exists(target):
      target, n = f"{source}{CORRUPT_SUFFIX}.{n}", n + 1
    if jax.process_index() == 0:
      os.rename(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"salaad_set_aside_{step}")
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()
