"""Executors: where the training state lives and how a step runs on it.

``JitExecutor`` (default) jit-compiles the step with NamedShardings over the
('data', 'fsdp') mesh; the state is a tree of global arrays.  ``PmapExecutor``
keeps one replica of the state per local device and averages gradients with
``lax.pmean`` (one host).  Both expose the same methods, so the loop, the
checkpoints and the evaluation do not depend on which one runs.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from salaad_jax.train import sharding as shd
from salaad_jax.train.config import TrainConfig, TrainError
from salaad_jax.train.state import TrainState, init_state, seed_key_data
from salaad_jax.train.steps import train_step


def eval_batch_size(config: TrainConfig) -> int:
  return config.eval_batch_size or config.batch_size


class JitExecutor:
  """jit + NamedSharding: data parallel over the mesh, FSDP over its 'fsdp' axis.

  Attributes:
    mesh: the device mesh.
    shardings: a NamedSharding per leaf of the TrainState.
    abstract: the TrainState as ShapeDtypeStructs with those shardings (the
      restore target).
  """

  def __init__(self, config: TrainConfig, model, method, tx, devices=None, initial=None):
    self.mesh = shd.make_mesh(config, devices)
    n = self.mesh.size
    shd.check_batch_divisible("batch_size", config.batch_size, n, config.grad_accum)
    shd.check_batch_divisible("eval_batch_size", eval_batch_size(config), n)
    init_fn = functools.partial(init_state, config, model, method, tx)
    self._initial, self._key_data = initial, seed_key_data(config)
    abstract = jax.eval_shape(init_fn, initial)
    self.shardings = shd.state_shardings(abstract, self.mesh)
    self.abstract = shd.with_shardings(abstract, self.shardings)
    self._batch_sharding = shd.batch_sharding(self.mesh)
    self._init = jax.jit(init_fn, out_shardings=self.shardings)
    step = functools.partial(train_step, model, tx, grad_accum=config.grad_accum)
    self._step = jax.jit(step, in_shardings=(self.shardings, self._batch_sharding),
                         out_shardings=(self.shardings, NamedSharding(self.mesh, P())),
                         donate_argnums=0)

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def init(self) -> TrainState:
    initial, self._initial = self._initial, None  # not kept alive after step 0
    if initial is not None:  # e.g. on the first device: spread over the mesh first
      initial = jax.device_put(initial, self.shardings.params)
    return self._init(initial, self._key_data)

  def from_global(self, state: TrainState) -> TrainState:
    return state

  def to_global(self, state: TrainState) -> TrainState:
    return state

  def put_batch(self, batch: dict):
    return shd.global_batch(batch, self._batch_sharding)

  def put_eval_batch(self, batch: dict):
    return shd.global_batch(batch, self._batch_sharding)

  def step(self, state: TrainState, batch):
    return self._step(state, batch)


class PmapExecutor:
  """pmap over the local devices: replicated state, gradients pmean-ed over
  the 'batch' axis.  One host only."""

  def __init__(self, config: TrainConfig, model, method, tx, devices=None, initial=None):
    if jax.process_count() > 1:
      raise TrainError("--parallelism=pmap runs on one host; use --parallelism=jit")
    self.devices = list(jax.local_devices() if devices is None else devices)
    n = len(self.devices)
    shd.check_batch_divisible("batch_size", config.batch_size, n, config.grad_accum)
    init_fn = functools.partial(init_state, config, model, method, tx)
    self._initial, self._key_data = initial, seed_key_data(config)
    first = SingleDeviceSharding(self.devices[0])
    abstract = jax.eval_shape(init_fn, initial)
    self.abstract = shd.with_shardings(abstract, jax.tree.map(lambda _: first, abstract))
    self._init = jax.jit(init_fn, out_shardings=first)
    step = functools.partial(train_step, model, tx, grad_accum=config.grad_accum,
                             axis_name="batch")
    self._step = jax.pmap(step, axis_name="batch", devices=self.devices, donate_argnums=0)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def init(self) -> TrainState:
    initial, self._initial = self._initial, None
    return self.from_global(self._init(initial, self._key_data))

  def from_global(self, state: TrainState) -> TrainState:
    """One replica per device (through host memory; pmap scatters it)."""
    n = len(self.devices)
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + x.shape), state)

  def to_global(self, state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: x[0], state)

  def put_batch(self, batch: dict):
    n = len(self.devices)
    return {k: np.asarray(v).reshape((n, -1) + v.shape[1:]) for k, v in batch.items()}

  def put_eval_batch(self, batch: dict):
    """Evaluation runs jitted on the first device with the first replica."""
    return batch

  def step(self, state: TrainState, batch):
    state, metrics = self._step(state, batch)
    return state, jax.tree.map(lambda x: x[0], metrics)


def make_executor(config: TrainConfig, model, method, tx, devices=None, initial=None):
  """The executor of ``config.parallelism``; ``initial``: the starting
  ``TrainState.params`` (None: the model initialiser's)."""
  cls = PmapExecutor if config.parallelism == "pmap" else JitExecutor
  return cls(config, model, method, tx, devices, initial)
