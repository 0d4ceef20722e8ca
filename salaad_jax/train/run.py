"""``load_run``: a trained workdir back as config, model, params and optimizer state."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from jax.sharding import Mesh, SingleDeviceSharding

from salaad_jax.models import Llama, LlamaConfig
from salaad_jax.train import sharding as shd
from salaad_jax.train.checkpoint import (CheckpointError, Checkpointer, checkpoint_dir,
                                         saved_params)
from salaad_jax.train.config import TrainConfig, read_config, starts_pretrained
from salaad_jax.train.methods import Method
from salaad_jax.train.state import applied_params, build, init_state


@dataclasses.dataclass(frozen=True)
class Run:
  """A restored run.

  Attributes:
    config: the run's TrainConfig (from ``<workdir>/config.json``).
    model_config: its LlamaConfig.
    model: the Llama module (with the method's projection class).
    params: the parameters X at ``step``.
    opt_state: the full optimiser state (NamedTuples restored; for SALAAD,
      ``salaad_jax.find_state(opt_state)`` is the SalaadState).
    step: the checkpoint's step.
    method: the registered Method.
    data_state: the training iterator's state at ``step``.

  ``run.model.apply({'params': run.llama_params}, tokens)`` evaluates it
  (for SLTrain-like methods with constant collections, use
  ``salaad_jax.train.state.model_variables(run.params)``).
  """

  config: TrainConfig
  model_config: LlamaConfig
  model: Llama
  params: Any
  opt_state: Any
  step: int
  method: Method
  data_state: dict

  @property
  def llama_params(self) -> Any:
    """The params the model applies (for a fine-tuning method, the merged
    weights, e.g. W + (alpha / r) A B)."""
    return applied_params(self.config, self.method, self.params)


def load_run(workdir: str, step: Optional[int] = None, mesh: Optional[Mesh] = None) -> Run:
  """Restores checkpoint ``step`` (default: the latest) of ``workdir``.

  Arrays land on the first device of this process, or sharded FSDP-style
  over ``mesh`` (a mesh with a 'fsdp' axis; see ``salaad_jax.train.sharding``).
  With several processes (``jax.distributed``) every process must call it:
  the restore is collective, and each process gets its own full copy.

  Raises:
    TrainError: no run, no such checkpoint, or a checkpoint that does not
      restore (unreadable files, or not fitting the saved config); the run
      is left as it is, and another ``step`` can be asked for.
  """
  config = read_config(workdir)
  parts = build(config)
  directory = checkpoint_dir(workdir)
  initial = None
  if starts_pretrained(config):
    # A run started from another one (--init_from, --init_from_hf) has the shapes of its
    # starting point (e.g. LoRA ranks): those of the saved params.
    initial = saved_params(directory, step)
    if initial is None:
      raise CheckpointError(f"no checkpoint {'' if step is None else f'at step {step} '}in "
                            f"{directory}")
  abstract = jax.eval_shape(
      lambda p: init_state(config, parts.model, parts.method, parts.tx, p), initial)
  del initial
  if mesh is None:  # with several processes: every one restores, onto its own first device
    first = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: first, abstract)
  else:
    shardings = shd.state_shardings(abstract, mesh)
  ckpt = Checkpointer(directory, async_save=False, reader=True)
  try:
    state, data_state = ckpt.restore(shd.with_shardings(abstract, shardings), step)
  finally:
    ckpt.close()
  return Run(config, parts.model_config, parts.model, state.params, state.opt_state,
             int(state.step), parts.method, data_state)
