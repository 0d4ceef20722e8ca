"""SALAAD as an optax GradientTransformation (SALAAD.md §2, §4, §5).

Two forms share one state and one ADMM round:

* ``salaad(inner, ...)`` — coupled: the gradient of every block becomes
  g_i + rho_i (X_i - L_i - S_i + U_i) before ``inner`` (e.g. clip + AdamW)
  turns it into the update.
* ``salaad_decoupled(learning_rate, ...)`` — an element appended to an
  existing chain: the incoming update u_i (already scaled by the base
  optimiser) becomes u_i - lr * rho_i (X_i - L_i - S_i + U_i).

The factories only bind the options (``options.parse``).  Each step is in
one phase (``options.Consolidation.phase``), chosen by one ``lax.switch``:

* ADMM (``admm``): every ``every_k`` steps, on the new X = params + update,
  each block runs one ADMM round in float32 (L-step by singular value
  thresholding, controller on alpha, S-step by a sparse prox, controller on
  beta, dual ascent on the scaled dual U = Y / rho), under ``lax.cond`` and
  vmapped over the blocks that share a matrix shape.  L is kept factored at
  a bounded rank, and S compactly at a bounded number of entries
  (``compact``; ``sparse_capacity``).
* PROJECT (``consolidation.project_step``): from ``consolidate_from`` on,
  every block projected onto a fixed structure.
* FACTORS (``consolidation.factor_step``): with ``consolidate_params=
  'factors'``, after the first projection, L's factors and S's values
  trained by the inner optimiser, with cuts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Union

from absl import logging
import jax
import jax.numpy as jnp
import optax

from salaad_jax import admm
from salaad_jax import consolidation as cons_steps
from salaad_jax import opt_state
from salaad_jax import options as options_lib
from salaad_jax.layout import Layout, layout_of
from salaad_jax.opt_state import FactorState, SalaadState

_F32 = jnp.float32
ScalarOrPerBlock = Union[float, jax.Array, Any, Callable[[str], float]]


class _Step(NamedTuple):
  """What a phase's step is given besides (updates, state, params)."""
  layout: Layout
  opts: options_lib.Options
  inner: Optional[optax.GradientTransformationExtraArgs]  # None: decoupled
  learning_rate: Any  # decoupled
  extra_args: dict  # for inner
  grad_fn: Optional[Callable]  # the joint cut loss's


def _penalised(step: _Step, updates, state, params):
  """The coupled step (g_i + rho_i (X_i - L_i - S_i + U_i) through inner) or
  the decoupled one (u_i - lr rho_i (...)); returns (updates, the new X of
  each block in float32, the inner state)."""
  pen = admm.penalties(state, params, step.layout, step.opts)
  leaves = step.layout.flatten(updates)
  if step.inner is None:
    lr = step.learning_rate
    lr = jnp.asarray(lr(state.count) if callable(lr) else lr, _F32)
    leaves = [u if p is None else (jnp.asarray(u, _F32) - lr * p).astype(u.dtype)
              for u, p in zip(leaves, pen)]
    updates, inner_state = step.layout.unflatten(leaves), state.inner_state
  else:
    leaves = [g if p is None else (jnp.asarray(g, _F32) + p).astype(g.dtype)
              for g, p in zip(leaves, pen)]
    updates, inner_state = step.inner.update(step.layout.unflatten(leaves), state.inner_state,
                                             params, **step.extra_args)
  return updates, admm.new_params(params, updates, step.layout), inner_state


def _factors_follow(step: _Step, state, new_state, from_projection: bool):
  """With consolidation in factors, before the factors train: their
  optimiser steps on zero gradients (so its counts keep pace), and the
  first projection's L becomes the balanced factors (B, A)."""
  if not step.opts.consolidation.factored:
    return new_state
  fac = state.factored
  zeros = jax.tree.map(jnp.zeros_like, fac.factors)
  _, f_inner = step.inner.update(zeros, fac.inner_state, fac.factors, **step.extra_args)
  factors = fac.factors
  if from_projection:
    fields = opt_state.fields_of(new_state, step.layout.treedef)
    factors = cons_steps.balanced_factors(fields, step.layout, step.opts)
  return new_state._replace(factored=FactorState(factors, f_inner))


def admm_phase(step: _Step, updates, state, params):
  """A step of the ADMM phase: the coupled / decoupled step, then the
  rounds that are due."""
  updates, new_x, inner_state = _penalised(step, updates, state, params)
  fields = opt_state.fields_of(state, step.layout.treedef)
  fields = admm.rounds(fields, new_x, state.count, step.layout, step.opts)
  new = opt_state.advance(state, step.layout.treedef, fields, inner_state, step.opts.every_k)
  return updates, _factors_follow(step, state, new, from_projection=False)


def project_phase(step: _Step, updates, state, params):
  """A step of the projection phase: the coupled / decoupled step, then the
  projection onto the fixed structure."""
  updates, new_x, inner_state = _penalised(step, updates, state, params)
  fields = opt_state.fields_of(state, step.layout.treedef)
  updates, fields = cons_steps.project_step(updates, new_x, fields, state.count, step.layout,
                                            step.opts)
  new = opt_state.advance(state, step.layout.treedef, fields, inner_state, step.opts.every_k)
  return updates, _factors_follow(step, state, new, from_projection=True)


def factor_phase(step: _Step, updates, state, params):
  """A step of training in factors (``consolidation.factor_step``)."""
  return cons_steps.factor_step(updates, state, params, layout=step.layout, opts=step.opts,
                                inner=step.inner, extra_args=step.extra_args,
                                grad_fn=step.grad_fn)


PHASES = (admm_phase, project_phase, factor_phase)  # by options.ADMM, PROJECT, FACTORS


def _holds_multisteps(tree) -> bool:
  is_ms = lambda x: isinstance(x, optax.MultiStepsState)
  return any(is_ms(x) for x in jax.tree.leaves(tree, is_leaf=is_ms))


def _init(params, *, inner, opts: options_lib.Options) -> SalaadState:
  inner_state = optax.EmptyState() if inner is None else inner.init(params)
  if _holds_multisteps(inner_state):
    raise ValueError(
        "salaad(inner): inner contains optax.MultiSteps, so SALAAD would count "
        "micro-steps and run its rounds on updates that are not applied; nest it "
        "the other way: optax.MultiSteps(salaad(inner, ...), every_k_schedule=k)")
  layout = layout_of(params, opts)
  if not layout.blocks:
    logging.warning(
        "salaad: no parameter is a block under the default structure (2-D+ "
        "'kernel' leaves); the transform passes through (coupled: the inner "
        "optimiser alone, decoupled: the identity). Paths: %s", layout.paths[:8])
  fields = admm.init_fields(layout.flatten(params), layout, opts)
  factored = ()
  if opts.consolidation.factored:
    factors = cons_steps.init_factors(layout, opts)
    factored = FactorState(factors, inner.init(factors))
  return SalaadState(count=jnp.zeros([], jnp.int32), num_rounds=jnp.zeros([], jnp.int32),
                     inner_state=inner_state, factored=factored,
                     **{k: layout.unflatten(v) for k, v in fields.items()})


def _update(updates, state, params=None, *, inner, learning_rate, opts: options_lib.Options,
            **extra_args):
  if params is None:
    raise ValueError("salaad needs the current params: call update(grads, state, params)")
  grad_fn = extra_args.pop("grad_fn", None)  # ours: not passed to inner
  if inner is None:
    extra_args = {}
  elif opts.consolidation.cuts.joint and grad_fn is None:
    raise ValueError("consolidate_cut_joint needs the gradient at the cut: call "
                     "update(grads, state, params, grad_fn=f), f(params) -> the gradients "
                     "of this step's loss at params (salaad_jax.train.train_step does)")
  step = _Step(layout_of(params, opts, state.sparse), opts, inner, learning_rate, extra_args,
               grad_fn)
  phases = [functools.partial(p, step, updates, state, params)
            for p in PHASES[:opts.consolidation.num_phases]]
  if len(phases) == 1:
    return phases[0]()
  return jax.lax.switch(opts.consolidation.phase(state.count), phases)


def _make(inner: Optional[optax.GradientTransformation], learning_rate, **options):
  opts = options_lib.parse(coupled=inner is not None, **options)
  inner = None if inner is None else optax.with_extra_args_support(inner)
  # init is compiled as one program: run eagerly, each of its operations (the
  # initial SVD's, every leaf's zeros) would be dispatched and compiled on its
  # own, which takes many times longer on the first call for a given model.
  init = jax.jit(functools.partial(_init, inner=inner, opts=opts))
  update = functools.partial(_update, inner=inner, learning_rate=learning_rate, opts=opts)
  return optax.GradientTransformationExtraArgs(init, update)


def salaad(inner: optax.GradientTransformation, *, structure=None,
           include_embedding: bool = False, include_head: bool = False,
           row_axes=None, every_k: int = 10, rho: ScalarOrPerBlock = 1e-6,
           rank_target: ScalarOrPerBlock = 0.15,
           density_target: ScalarOrPerBlock = 0.05,
           k_alpha: ScalarOrPerBlock = 0.2, k_beta: ScalarOrPerBlock = 0.002,
           k_d: ScalarOrPerBlock = 0.01, deriv_start: int = 1500,
           energy: float = 0.999, mode: str = "adaptive",
           sparse_mode: str = "soft", svt: str = "fast", svt_iters: int = 2,
           init_iters: int = 4, max_rank: Optional[int] = None,
           alpha_init: Union[str, float] = "zero", beta_init: float = 0.0,
           state_dtype="float32", dual_dtype="float32",
           sparse_capacity: Union[str, float, None] = "auto", spread_rounds: bool = False,
           seed: int = 0, target_schedule=None, rho_schedule=None,
           consolidate_from: Optional[int] = None,
           consolidate_structure: str = "target",
           consolidate_dropout: float = 0.0,
           consolidate_support: str = "largest",
           consolidate_params: str = "projection",
           consolidate_factor_lr: float = 1.0,
           consolidate_global_dropout: float = 0.0,
           consolidate_cut_budgets: tuple = (),
           consolidate_cut_overhead: float = 0.0,
           consolidate_cut_jitter: float = 0.0,
           consolidate_cut_joint: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """Coupled SALAAD: g_i + rho_i (X_i - L_i - S_i + U_i) feeds ``inner``.

  ``inner`` is any optax transformation (e.g. clip + AdamW); extra keyword
  arguments of ``update`` are passed on to it.
  """
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise TypeError("salaad(inner, ...) needs an optax GradientTransformation as inner")
  return _make(inner, None, **{k: v for k, v in locals().items() if k != "inner"})


def salaad_decoupled(learning_rate, *, structure=None,
                     include_embedding: bool = False, include_head: bool = False,
                     row_axes=None, every_k: int = 10, rho: ScalarOrPerBlock = 1e-6,
                     rank_target: ScalarOrPerBlock = 0.15,
                     density_target: ScalarOrPerBlock = 0.05,
                     k_alpha: ScalarOrPerBlock = 0.2, k_beta: ScalarOrPerBlock = 0.002,
                     k_d: ScalarOrPerBlock = 0.01, deriv_start: int = 1500,
                     energy: float = 0.999, mode: str = "adaptive",
                     sparse_mode: str = "soft", svt: str = "fast", svt_iters: int = 2,
                     init_iters: int = 4, max_rank: Optional[int] = None,
                     alpha_init: Union[str, float] = "zero", beta_init: float = 0.0,
                     state_dtype="float32", dual_dtype="float32",
                     sparse_capacity: Union[str, float, None] = "auto",
                     spread_rounds: bool = False,
                     seed: int = 0, target_schedule=None, rho_schedule=None,
                     consolidate_from: Optional[int] = None,
                     consolidate_structure: str = "target",
                     consolidate_dropout: float = 0.0,
                     consolidate_support: str = "largest",
                     consolidate_params: str = "projection",
                     consolidate_factor_lr: float = 1.0,
                     consolidate_global_dropout: float = 0.0,
                     consolidate_cut_budgets: tuple = (),
                     consolidate_cut_overhead: float = 0.0,
                     consolidate_cut_jitter: float = 0.0,
                     consolidate_cut_joint: float = 0.0
                     ) -> optax.GradientTransformationExtraArgs:
  """Decoupled SALAAD, appended after a base chain:
  u_i <- u_i - lr * rho_i (X_i - L_i - S_i + U_i).

  ``learning_rate`` is a scalar or an optax schedule of the step count.
  """
  return _make(None, learning_rate,
               **{k: v for k, v in locals().items() if k != "learning_rate"})


salaad.__doc__ += options_lib.OPTIONS_DOC
salaad_decoupled.__doc__ += options_lib.OPTIONS_DOC
