"""Registry of training methods: what ``--method=NAME`` builds.

A method supplies the optimiser (``make_optimizer(config, schedule)``) and,
optionally, the model's projection class, a transform of the freshly
initialised params, extra scalar metrics, alternative parameter sets to
evaluate (e.g. SALAAD's surrogate X_hat = L + S) and its own options
(``--method_option key=value``).  Other modules add methods with
:func:`register_method`; modules listed in ``PLUGIN_MODULES`` are imported the
first time an unknown name is asked for, so their methods register themselves.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

import salaad_jax as sj
from salaad_jax import structure
from salaad_jax.models import llama
from salaad_jax.train.config import (TrainConfig, TrainError, alpha_init_value, cut_budgets,
                                     sparse_capacity_value)
from salaad_jax.train.optim import base_optimizer

Params = Any
PLUGIN_MODULES = ("salaad_jax.baselines", "salaad_jax.baselines.harness",
                  "salaad_jax.baselines.finetune")


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method.

  Attributes:
    name: the ``--method`` value.
    make_optimizer: ``(config, schedule) -> optax.GradientTransformation``;
      its ``update`` is called as ``update(grads, opt_state, params)``.
    dense_cls: ``config -> class`` for the model's attention/MLP projections
      (see ``salaad_jax.models.Llama.dense_cls``); None: ``Llama``'s default
      (``salaad_jax.models.llama.Dense``).
    transform_params: ``(config, params, rng) -> params`` applied once to the
      initialised params (e.g. an SVD initialisation); None: identity.
    metrics: ``(params, opt_state) -> {name: scalar}`` logged with the loss.
    eval_params: ``(params, opt_state) -> {variant: params}`` evaluated next
      to ``params`` (e.g. ``{'surrogate': X_hat}``).
    options: default values of the method's own options; the type of each
      default is the type a ``--method_option`` string is converted to.
    description: one line for ``--help``.
    constant_collections: Flax variable collections besides 'params' that the
      model creates at init and needs at every apply but never trains (e.g.
      SLTrain's 'sparsity'); they are carried in ``TrainState.params``.
    from_pretrained: ``(config, params, rng, next_batch) -> TrainState.params``:
      the starting point built from the dense Llama ``params`` of the
      ``--init_from`` run (eagerly, on the host's first device; e.g. LoRA:
      ``{'params': adapters, 'frozen': {'base': params}}``);
      ``next_batch()`` yields training batches for calibration.  Methods
      with it are fine-tuning methods and need ``--init_from``.  None: the
      pretrained params themselves.
    model_variables: ``config -> (variables -> Llama variables)``: what the
      model applies for ``TrainState.params`` (e.g. W + (alpha / r) A B).
      The function must be hashable (a module-level function or a
      ``functools.partial``).  None: the variables as they are.
    runtime_fields: the TrainConfig fields ``make_optimizer`` accepts as
      traced values, so that they are inputs of the compiled programs rather
      than constants (see ``salaad_jax.train.programs``): 'lr' (read through
      the schedule) and 'seed'.  A method that needs a field as a Python
      value (e.g. to build its model from it) leaves it out.
  """

  name: str
  make_optimizer: Callable[[TrainConfig, optax.Schedule], optax.GradientTransformation]
  dense_cls: Optional[Callable[[TrainConfig], Any]] = None
  transform_params: Optional[Callable[[TrainConfig, Params, jax.Array], Params]] = None
  metrics: Optional[Callable[[Params, Any], dict]] = None
  eval_params: Optional[Callable[[Params, Any], dict]] = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  description: str = ""
  constant_collections: tuple[str, ...] = ()
  from_pretrained: Optional[Callable[..., Params]] = None
  model_variables: Optional[Callable[[TrainConfig], Callable[[dict], dict]]] = None
  runtime_fields: tuple[str, ...] = ("lr", "seed")

  def model_dense_cls(self, config: TrainConfig):
    return llama.Dense if self.dense_cls is None else self.dense_cls(config)


_REGISTRY: dict[str, Method] = {}
_plugins_loaded = False


def register_method(name: str, make_optimizer, *, dense_cls=None, transform_params=None,
                    metrics=None, eval_params=None, options=None, description: str = "",
                    constant_collections=(), from_pretrained=None, model_variables=None,
                    runtime_fields=("lr", "seed"), overwrite: bool = False) -> Method:
  """Adds a method to the registry and returns it (see :class:`Method`)."""
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"method {name!r} is already registered (pass overwrite=True)")
  method = Method(name, make_optimizer, dense_cls, transform_params, metrics,
                  eval_params, dict(options or {}), description,
                  tuple(constant_collections), from_pretrained, model_variables,
                  tuple(runtime_fields))
  _REGISTRY[name] = method
  return method


def _load_plugins() -> None:
  global _plugins_loaded
  if _plugins_loaded:
    return
  _plugins_loaded = True
  for module in PLUGIN_MODULES:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name is None or not module.startswith(e.name):
        raise


def get_method(name: str) -> Method:
  """The registered method ``name``; TrainError listing the known ones otherwise."""
  if name not in _REGISTRY:
    _load_plugins()
  if name not in _REGISTRY:
    raise TrainError(f"--method={name!r} is not a registered method; known: "
                     f"{sorted(_REGISTRY)}")
  return _REGISTRY[name]


def method_names() -> list[str]:
  _load_plugins()
  return sorted(_REGISTRY)


def method_options(method: Method, config: TrainConfig) -> dict[str, Any]:
  """The method's defaults overridden by ``config.method_options`` (converted
  to the defaults' types)."""
  out = dict(method.options)
  for key, value in config.method_options.items():
    if key not in method.options:
      raise TrainError(f"--method_option {key}=...: method {method.name!r} has no option "
                       f"{key!r}; its options: {sorted(method.options) or 'none'}")
    kind = type(method.options[key])
    try:
      if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        value = value.lower() in ("true", "1")
      out[key] = kind(value)
    except (TypeError, ValueError):
      raise TrainError(f"--method_option {key}={value!r} is not a {kind.__name__}") from None
  return out


def _decay_mask(params):
  """Weight decay on matrices only (not on norm scales)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


# --------------------------------------------------------------------------
# dense: the base optimiser alone.
# --------------------------------------------------------------------------


def dense_optimizer(config: TrainConfig, schedule) -> optax.GradientTransformation:
  return base_optimizer(config, schedule, _decay_mask)


# --------------------------------------------------------------------------
# salaad: the coupled (or decoupled) SALAAD transform around the base optimiser.
# --------------------------------------------------------------------------


def _is_embed_or_head(path: str) -> bool:
  return bool(re.search(structure.DEFAULT_EMBED_PATTERN, path)
              or re.search(structure.DEFAULT_HEAD_PATTERN, path))


# A bitmap with bf16 values: 1 bit per matrix entry, 16 per value.
BITMAP_OVERHEAD = 1 / 16


def cut_options(config: TrainConfig, factors: bool = True) -> dict[str, Any]:
  """The transform's cut budgets for ``--consolidate_cut_budgets`` (fractions
  of the dense model's bytes: bf16 values, S as a bitmap; none unless
  ``factors``: consolidation in factors is on).  With
  ``--consolidate_cut_bitmaps`` each block's bitmap is a fixed cost of its S
  (``consolidate_cut_overhead`` 1/16), the deployment's own pricing, and the
  budgets are fractions of the dense parameter count in 2-byte units;
  otherwise every block's bitmap is counted as kept: a cut at b of the bytes
  stores 2 (rest + kept) values and a ceil(m n / 8)-byte bitmap per block, so
  it keeps b - bitmaps / (2 N) of the N parameters."""
  budgets = cut_budgets(config) if factors else ()
  if not budgets:
    return dict(consolidate_cut_budgets=(), consolidate_cut_overhead=0.0,
                consolidate_cut_jitter=0.0, consolidate_cut_joint=0.0)
  jitter = dict(consolidate_cut_jitter=config.consolidate_cut_jitter,
                consolidate_cut_joint=config.consolidate_cut_joint)
  if config.consolidate_cut_bitmaps:
    return dict(consolidate_cut_budgets=budgets, consolidate_cut_overhead=BITMAP_OVERHEAD,
                **jitter)
  from salaad_jax.baselines import accounting  # pylint: disable=g-import-not-at-top
  from salaad_jax.deploy import accounting as deploy_acc  # pylint: disable=g-import-not-at-top
  from salaad_jax.models import get_config  # pylint: disable=g-import-not-at-top
  if config.vocab_size < 1:
    raise TrainError("--consolidate_cut_budgets needs the vocabulary size resolved")
  blocks = accounting.model_blocks(get_config(config.model, vocab_size=config.vocab_size,
                                              max_len=config.seq_len))
  total = blocks.rest + sum(m * n for m, n in blocks.shapes.values())
  bitmaps = sum(deploy_acc.sparse_overhead_bytes("bitmap", m, n)
                for m, n in blocks.shapes.values())
  fracs = tuple(b - bitmaps / (2 * total) for b in budgets)
  if min(fracs) <= 0:
    raise TrainError(f"--consolidate_cut_budgets: {min(budgets)} of the dense bytes does not "
                     "hold the blocks' bitmaps")
  return dict(consolidate_cut_budgets=fracs, consolidate_cut_overhead=0.0, **jitter)


def salaad_kwargs(config: TrainConfig) -> dict[str, Any]:
  """Keyword arguments of ``salaad_jax.salaad`` from the config: rho and k_d
  take their ``*_embed`` values on the embedding and the head."""

  def per_block(block_value, embed_value):
    return lambda path: embed_value if _is_embed_or_head(path) else block_value

  rounds = config.steps / config.every_k
  target_schedule = rho_schedule = None
  if config.target_schedule_end > 0:
    target_schedule = sj.schedules.cubic_looseness(config.target_schedule_end * rounds)
  if config.rho_mode == "tanh":
    rho_schedule = sj.schedules.tanh_rho_ramp(config.rho_ramp_center * rounds,
                                              config.rho_ramp_width * rounds,
                                              config.rho_ramp_factor)
  rho = (per_block(config.rho, config.rho_embed) if config.rho_mode != "shape_dependent"
         else "shape_dependent")
  consolidate_from, factors = None, False
  if config.consolidate_from > 0:
    consolidate_from = int(round(config.consolidate_from * config.steps))
    factors = config.consolidate_params == "factors"
  return dict(
      target_schedule=target_schedule, rho_schedule=rho_schedule,
      consolidate_from=consolidate_from, consolidate_structure=config.consolidate_structure,
      consolidate_dropout=config.consolidate_dropout,
      consolidate_support=config.consolidate_support,
      consolidate_params="factors" if factors else "projection",
      consolidate_factor_lr=config.consolidate_factor_lr if factors else 1.0,
      consolidate_global_dropout=config.consolidate_global_dropout if factors else 0.0,
      **cut_options(config, factors),
      every_k=config.every_k, rho=rho,
      rank_target=config.rank_target, density_target=config.density_target,
      k_alpha=config.k_alpha, k_beta=config.k_beta,
      k_d=per_block(config.k_d, config.k_d_embed), deriv_start=config.deriv_start,
      energy=config.energy, mode=config.salaad_mode, sparse_mode=config.sparse_mode,
      svt=config.svt, svt_iters=config.svt_iters, init_iters=config.init_iters,
      max_rank=config.max_rank or None, alpha_init=alpha_init_value(config),
      beta_init=config.beta_init, include_embedding=config.include_embedding,
      include_head=config.include_head, state_dtype=config.state_dtype,
      dual_dtype=config.dual_dtype, sparse_capacity=sparse_capacity_value(config),
      seed=config.seed)


def salaad_optimizer(config: TrainConfig, schedule) -> optax.GradientTransformation:
  base = base_optimizer(config, schedule, _decay_mask)
  try:
    if config.coupling == "coupled":
      return sj.salaad(base, **salaad_kwargs(config))
    return optax.chain(base, sj.salaad_decoupled(schedule, **salaad_kwargs(config)))
  except ValueError as e:
    raise TrainError(f"SALAAD settings: {e}") from None


def salaad_metrics(params, opt_state) -> dict[str, jax.Array]:
  """Means over blocks (rank_rate, density, alpha, beta, primal_residual) and
  the same per block under ``blocks/<path>/``."""
  out = dict(sj.summary(params, opt_state))
  residual = sj.primal_residual(params, opt_state)
  for path, m in sj.block_metrics(opt_state).items():
    for key in ("rank_rate", "density", "alpha", "beta"):
      out[f"blocks/{path}/{key}"] = jnp.asarray(m[key], jnp.float32)
    out[f"blocks/{path}/primal_residual"] = residual[path]
  return out


def salaad_eval_params(params, opt_state) -> dict[str, Params]:
  return {"surrogate": sj.surrogate_params(params, opt_state)}


register_method("dense", dense_optimizer,
                description="dense training with the base optimiser (clip + AdamW)")
register_method("salaad", salaad_optimizer, metrics=salaad_metrics,
                eval_params=salaad_eval_params,
                description="SALAAD: sparse plus low-rank surrogates by ADMM")
