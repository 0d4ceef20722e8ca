"""Executors: where the training state lives and how a step runs on it.

``JitExecutor`` (default) jit-compiles the step with NamedShardings over the
('data', 'fsdp') mesh; the state is a tree of global arrays.  ``PmapExecutor``
keeps one replica of the state per local device and averages gradients with
``lax.pmean`` (one host).  Both expose the same methods, so the loop, the
checkpoints and the evaluation do not depend on which one runs.

Built without an explicit optimiser, an executor compiles the method's own
(``salaad_jax.train.programs``): the seed (where the method declares it) and
the peak learning rate are inputs of the programs, and the programs are kept
for the process, so a seed sweep or a learning-rate trial in one process
traces and compiles its initialisation and step once.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from salaad_jax.train import programs
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

  def __init__(self, config: TrainConfig, model, method, tx=None, devices=None,
               initial=None):
    self.mesh = shd.make_mesh(config, devices)
    n = self.mesh.size
    shd.check_batch_divisible("batch_size", config.batch_size, n, config.grad_accum)
    shd.check_batch_divisible("eval_batch_size", eval_batch_size(config), n)
    self._initial, self._key_data = initial, seed_key_data(config)
    self._values = {} if tx is not None else programs.runtime_values(config, method)
    self._batch_sharding = shd.batch_sharding(self.mesh)
    where = ("jit", self.mesh.axis_names, self.mesh.devices.shape,
             tuple(d.id for d in self.mesh.devices.flat))
    self.abstract, self._init, self._step = _programs(
        self, where, config, model, method, tx, initial)
    self.shardings = jax.tree.map(lambda x: x.sharding, self.abstract)
    # On every device of the mesh once (global arrays, with any number of
    # processes), so that a step passes them without a host transfer.
    replicated = NamedSharding(self.mesh, P())
    self._values = {k: jax.make_array_from_callback((), replicated, lambda _, v=v: v)
                    for k, v in self._values.items()}

  def _compile(self, config, model, method, tx, initial):
    """(abstract state, jitted init, jitted step); the last two take the
    runtime values as their last argument."""
    init_fn, step_fn = _program_functions(config, model, method, tx)
    abstract = jax.eval_shape(init_fn, initial, self._key_data, self._values)
    shardings = shd.state_shardings(abstract, self.mesh)
    init = jax.jit(init_fn, out_shardings=shardings)
    step = jax.jit(functools.partial(step_fn, grad_accum=config.grad_accum),
                   in_shardings=(shardings, self._batch_sharding,
                                 NamedSharding(self.mesh, P())),
                   out_shardings=(shardings, NamedSharding(self.mesh, P())),
                   donate_argnums=0)
    return shd.with_shardings(abstract, shardings), init, step

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def init(self) -> TrainState:
    initial, self._initial = self._initial, None  # not kept alive after step 0
    if initial is not None:  # e.g. on the first device: spread over the mesh first
      initial = jax.device_put(initial, self.shardings.params)
    return self._init(initial, self._key_data, self._values)

  def from_global(self, state: TrainState) -> TrainState:
    return state

  def to_global(self, state: TrainState) -> TrainState:
    return state

  def put_batch(self, batch: dict):
    return shd.global_batch(batch, self._batch_sharding)

  def put_eval_batch(self, batch: dict):
    return shd.global_batch(batch, self._batch_sharding)

  def step(self, state: TrainState, batch):
    return self._step(state, batch, self._values)


class PmapExecutor:
  """pmap over the local devices: replicated state, gradients pmean-ed over
  the 'batch' axis.  One host only."""

  def __init__(self, config: TrainConfig, model, method, tx=None, devices=None,
               initial=None):
    if jax.process_count() > 1:
      raise TrainError("--parallelism=pmap runs on one host; use --parallelism=jit")
    self.devices = list(jax.local_devices() if devices is None else devices)
    shd.check_batch_divisible("batch_size", config.batch_size, len(self.devices),
                              config.grad_accum)
    self._initial, self._key_data = initial, seed_key_data(config)
    self._values = {} if tx is not None else programs.runtime_values(config, method)
    self.abstract, self._init, self._step = _programs(
        self, ("pmap", tuple(d.id for d in self.devices)), config, model, method, tx, initial)

  def _compile(self, config, model, method, tx, initial):
    init_fn, step_fn = _program_functions(config, model, method, tx)
    first = SingleDeviceSharding(self.devices[0])
    abstract = jax.eval_shape(init_fn, initial, self._key_data, self._values)
    abstract = shd.with_shardings(abstract, jax.tree.map(lambda _: first, abstract))
    init = jax.jit(init_fn, out_shardings=first)
    step = jax.pmap(functools.partial(step_fn, grad_accum=config.grad_accum,
                                      axis_name="batch"),
                    axis_name="batch", in_axes=(0, 0, None), devices=self.devices,
                    donate_argnums=0)
    return abstract, init, step

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def init(self) -> TrainState:
    initial, self._initial = self._initial, None
    return self.from_global(self._init(initial, self._key_data, self._values))

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
    state, metrics = self._step(state, batch, self._values)
    return state, jax.tree.map(lambda x: x[0], metrics)


def _programs(executor, where, config: TrainConfig, model, method, tx, initial):
  """``executor._compile(...)``: (abstract state, init, step), kept for the
  process under what shapes them (the config's program key, the model, the
  method, the devices ``where`` and the shapes of ``initial``) unless ``tx``
  is given."""
  build = lambda: executor._compile(config, model, method, tx, initial)  # pylint: disable=protected-access
  if tx is not None:
    return build()
  # The cached programs hold the method, so its id is not reused while they are kept.
  key = (where, programs.program_key(config, method), model, id(method),
         programs.tree_spec(initial))
  return programs.cached(key, build)


def _program_functions(config: TrainConfig, model, method, tx):
  """(init(initial, key_data, values), step(state, batch, values, **kw)).
  With ``tx`` None the optimiser is the method's, built from the program
  config (host fields reset) with ``values`` for its runtime fields; else it
  is ``tx`` itself (``values`` is then empty)."""
  if tx is not None:
    make_tx, config = (lambda values: tx), config
  else:
    config = programs.program_config(config, method)
    make_tx = functools.partial(programs.optimizer, config, method)

  def init(initial, key_data, values):
    return init_state(config, model, method, make_tx(values), initial, key_data)

  def step(state, batch, values, **kwargs):
    return train_step(model, make_tx(values), state, batch, **kwargs)

  return init, step


def make_executor(config: TrainConfig, model, method, tx=None, devices=None, initial=None):
  """The executor of ``config.parallelism``; ``tx``: the optimiser (None: the
  method's for ``config``, compiled with its runtime fields as inputs and
  kept for the process, see the module docstring); ``initial``: the starting
  ``TrainState.params`` (None: the model initialiser's)."""
  cls = PmapExecutor if config.parallelism == "pmap" else JitExecutor
  return cls(config, model, method, tx, devices, initial)
