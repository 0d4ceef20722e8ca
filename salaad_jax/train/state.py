"""The training state and how a method's model and state are built."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from salaad_jax.models import Llama, LlamaConfig, get_config
from salaad_jax.train.config import TrainConfig, TrainError
from salaad_jax.train.methods import Method, get_method, method_options
from salaad_jax.train.optim import make_schedule


class TrainState(NamedTuple):
  """Everything that changes during training (and is checkpointed).

  Attributes:
    step: optimisation steps taken (int32 scalar).
    params: the model parameters X.  For a method whose model keeps constant
      variable collections (``Method.constant_collections``, e.g. SLTrain's
      fixed sparse support in 'sparsity'), the Flax variables
      ``{'params': X, '<collection>': ...}`` instead: the constants are
      carried and checkpointed next to X, passed to every ``model.apply``,
      and never seen by the optimiser (see :func:`split_constants`).
    opt_state: the optimiser state (for SALAAD it contains the SalaadState).
  """

  step: jax.Array
  params: Any
  opt_state: Any


def split_constants(params) -> tuple[Any, dict]:
  """(trainable params, constant collections) of ``TrainState.params``:
  ``(v['params'], the other collections)`` for a variables dict, else
  ``(params, {})``."""
  if isinstance(params, Mapping) and "params" in params:
    rest = {k: v for k, v in params.items() if k != "params"}
    return params["params"], rest
  return params, {}


def join_constants(trainable, constants: Mapping) -> Any:
  """Inverse of :func:`split_constants`."""
  if not constants:
    return trainable
  return {"params": trainable, **constants}


def model_variables(params) -> dict:
  """The variables ``model.apply`` takes for ``TrainState.params``."""
  trainable, constants = split_constants(params)
  return {"params": trainable, **constants}


def applied_params(config: TrainConfig, method: Method, params) -> Any:
  """The Llama params a run with ``method`` applies for its ``TrainState.params``
  (``params`` itself unless the method reparameterises its model, e.g. LoRA's
  W + (alpha / r) A B)."""
  variables = model_variables(params)
  if method.model_variables is not None:
    variables = method.model_variables(config)(variables)
  return variables["params"]


def model_config(config: TrainConfig) -> LlamaConfig:
  """The preset ``config.model`` with the run's vocabulary, length and dtypes."""
  if config.vocab_size < 1:
    raise TrainError("vocab_size is unresolved (0); resolve it from the tokenizer first")
  try:
    return get_config(config.model, vocab_size=config.vocab_size, max_len=config.seq_len,
                      dtype=config.dtype, param_dtype=config.param_dtype)
  except ValueError as e:
    raise TrainError(f"--model={config.model}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Reparameterized:
  """A Llama applied to ``to_llama(variables)`` instead of the variables
  themselves: the model of a method that trains something other than the
  Llama's own weights (e.g. LoRA adapters on a frozen base).  ``apply`` has
  Flax's signature, so the loss, the evaluation and the checkpoints are those
  of every other method; other attributes are the Llama's."""

  llama: Llama
  to_llama: Callable[[dict], dict]

  def apply(self, variables, *args, **kwargs):
    return self.llama.apply(self.to_llama(dict(variables)), *args, **kwargs)

  def init(self, *args, **kwargs):
    raise TrainError("this method's parameters are built from a pretrained run "
                     "(--init_from), not by the model initialiser")

  def __getattr__(self, name):
    if name.startswith("__") or name in ("llama", "to_llama"):  # copy / pickle probes
      raise AttributeError(name)
    return getattr(self.llama, name)


def build_model(config: TrainConfig, method: Method) -> tuple[LlamaConfig, Any]:
  """(LlamaConfig, model): the Llama with the method's projection class,
  wrapped in :class:`Reparameterized` when the method maps its variables."""
  mcfg = model_config(config)
  llama = Llama(mcfg, dense_cls=method.model_dense_cls(config))
  if method.model_variables is None:
    return mcfg, llama
  return mcfg, Reparameterized(llama, method.model_variables(config))


def seed_key_data(config: TrainConfig) -> np.ndarray:
  """The raw data of ``jax.random.key(config.seed)``, as a host array: pass
  it to a jitted :func:`init_state` as ``key_data``, so that the compiled
  initialisation takes the seed as an input and is the same program for every
  seed (the persistent compilation cache then serves a seed sweep's later
  runs)."""
  return np.asarray(jax.random.key_data(jax.random.key(config.seed)))


def init_state(config: TrainConfig, model: Llama, method: Method,
               tx: optax.GradientTransformation, initial: Optional[Any] = None,
               key_data: Optional[Any] = None) -> TrainState:
  """Step 0: params from the model's initialiser (seeded by ``config.seed``,
  or by ``key_data``: :func:`seed_key_data` of it, as an argument), then the
  method's param transform, then ``tx.init`` (of the trainable params only);
  the method's constant collections join the params.  With ``initial`` (a
  ``TrainState.params`` tree, e.g. from a pretrained run), the params are
  ``initial`` instead.  Traceable, so it can be jitted with output shardings
  or run under ``jax.eval_shape``."""
  if initial is not None:
    trainable, _ = split_constants(initial)
    return TrainState(jnp.zeros((), jnp.int32), initial, tx.init(trainable))
  rng = (jax.random.key(config.seed) if key_data is None
         else jax.random.wrap_key_data(key_data))
  init_rng, transform_rng = jax.random.split(rng)
  tokens = jnp.zeros((1, min(config.seq_len, 8)), jnp.int32)
  variables = model.init(init_rng, tokens)
  params = variables["params"]
  if method.transform_params is not None:
    params = method.transform_params(config, params, transform_rng)
  constants = {c: variables[c] for c in method.constant_collections if c in variables}
  return TrainState(jnp.zeros((), jnp.int32), join_constants(params, constants),
                    tx.init(params))


class Components(NamedTuple):
  """What a (resolved) TrainConfig builds: method, schedule, optimiser, model."""

  method: Method
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  model_config: LlamaConfig
  model: Llama


def build(config: TrainConfig) -> Components:
  """Method, learning-rate schedule, optimiser and model of ``config``."""
  method = get_method(config.method)
  method_options(method, config)
  schedule = make_schedule(config)
  tx = method.make_optimizer(config, schedule)
  mcfg, model = build_model(config, method)
  return Components(method, schedule, tx, mcfg, model)
