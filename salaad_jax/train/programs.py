"""What shapes a run's compiled programs, and the programs one process keeps.

A run's initialisation and train step are compiled from its TrainConfig, but
not from all of it:

* host fields (data, logging, evaluation and checkpoint cadence, the
  processes of a job) never reach them;
* runtime fields (the peak learning rate, and for methods that declare it
  the seed: ``Method.runtime_fields``) are inputs of the programs, not
  constants compiled into them.

So a seed sweep or a learning-rate trial compiles once: its later runs get
the same program (from this process's cache, :func:`cached`, or from the
persistent compilation cache in another process).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Hashable, Mapping

import jax
import numpy as np
import optax

from salaad_jax.train.config import TrainConfig
from salaad_jax.train.methods import Method
from salaad_jax.train.optim import make_schedule

# Fields that do not shape the compiled initialisation or step: what data is
# read and in which order, what is logged, evaluated and saved when, and the
# job's processes (the devices are part of a program's key on their own).
HOST_FIELDS = frozenset({
    "init_from", "init_from_hf", "source", "tokenizer", "data_dir", "train_split",
    "eval_split", "eval_batch_size", "data_seed", "deploy_budgets", "distributed",
    "coordinator_address", "num_processes", "process_id", "log_every", "eval_every",
    "eval_batches", "checkpoint_every", "keep_checkpoints", "async_checkpoint", "tensorboard",
    "stop_after",
})

_DTYPES = {"lr": np.float32, "seed": np.int32}
# A traced int32 seed gives jax.random.key(seed) and key(seed + k) of a Python
# int only while seed + k does not wrap around.
_SEED_LIMIT = 2 ** 31 - 1024


def runtime_fields(config: TrainConfig, method: Method) -> tuple[str, ...]:
  """The fields of ``config`` passed to ``method``'s programs as inputs."""
  fields = tuple(f for f in method.runtime_fields if f in _DTYPES)
  if not 0 <= config.seed < _SEED_LIMIT:
    fields = tuple(f for f in fields if f != "seed")
  return fields


def runtime_values(config: TrainConfig, method: Method) -> dict[str, np.ndarray]:
  """The runtime fields' values, as the scalars the programs take."""
  return {f: np.asarray(getattr(config, f), _DTYPES[f]) for f in runtime_fields(config, method)}


def program_config(config: TrainConfig, method: Method) -> TrainConfig:
  """``config`` with its host and runtime fields at their defaults: all a
  compiled program may read of it."""
  fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
  reset = HOST_FIELDS | set(runtime_fields(config, method))
  return config.replace(**{name: fields[name].default for name in reset})


def program_key(config: TrainConfig, method: Method) -> str:
  """Equal for two configs (of the same method) whose programs are the same."""
  return program_config(config, method).to_json()


def optimizer(config: TrainConfig, method: Method,
              values: Mapping[str, Any]) -> optax.GradientTransformation:
  """``method``'s optimiser for ``config`` with ``values`` (arrays, traced
  inside a program) for its runtime fields."""
  config = config.replace(**values)
  return method.make_optimizer(config, make_schedule(config))


def tree_spec(tree) -> Hashable:
  """The structure, shapes and dtypes of ``tree`` (None for None)."""
  if tree is None:
    return None
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


# The programs of the latest few configurations this process compiled.
_CACHE: collections.OrderedDict = collections.OrderedDict()
CACHE_SIZE = 8


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
  """``build()``, kept under ``key`` (the last CACHE_SIZE keys); a key that
  cannot be hashed (e.g. a model with a list attribute) is built every time."""
  try:
    hash(key)
  except TypeError:
    return build()
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  value = _CACHE[key] = build()
  while len(_CACHE) > CACHE_SIZE:
    _CACHE.popitem(last=False)
  return value


def clear_cache() -> None:
  """Drops the programs kept by :func:`cached`."""
  _CACHE.clear()
