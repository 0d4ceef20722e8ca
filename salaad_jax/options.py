"""The options of ``salaad`` / ``salaad_decoupled``, parsed and checked once.

:func:`parse` turns the keyword arguments into an :class:`Options` (or
raises one ValueError naming the option); the transform binds it, and
``train.config`` asks it about the flags' combination.  It accepts traced
values where the option may be injected (``optax.inject_hyperparams``
rebuilds the transform at every update); the options in ``STATIC_ARGS`` must
be Python numbers.

:class:`Consolidation` holds the options of the last part of training and
is the one place that says which phase a step is in
(:meth:`Consolidation.phase`): ADMM rounds, the projection onto the fixed
structure, or training in factors (``docs/consolidation.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from salaad_jax import block as blk
from salaad_jax import consolidate as cons
from salaad_jax import controller as ctl
from salaad_jax.cut_schedule import CutSchedule
from salaad_jax.hparams import (_HPARAM_RULES, _check_value, _concrete_float,
                                 _parse_sparse_mode, _static_budgets, _static_float,
                                 _static_int)

SVT_METHODS = ("fast", "exact")
ADMM, PROJECT, FACTORS = 0, 1, 2  # the phases of a step
HPARAM_NAMES = tuple(_HPARAM_RULES)  # per-block hyperparameters


@dataclasses.dataclass(frozen=True)
class Consolidation:
  """How the last part of training trains the surrogate L + S
  (``consolidate`` module).

  ``start`` (``consolidate_from``) counts steps taken: the step taken when
  ``state.count == start`` is the first projection.  With ``params=
  'projection'`` every later step projects too; with ``'factors'`` that
  first projection sets the structure and the factors, and every later step
  trains them.
  """

  start: Optional[int] = None
  structure: str = "target"
  support: str = "largest"
  dropout: float = 0.0
  params: str = "projection"
  factor_lr: float = 1.0
  cuts: CutSchedule = CutSchedule(seed=0)

  @property
  def factored(self) -> bool:
    return self.params == "factors"

  @property
  def num_phases(self) -> int:
    """How many of ADMM, PROJECT, FACTORS a run goes through."""
    return 1 if self.start is None else (3 if self.factored else 2)

  def _steps_into(self, count):
    """Steps taken since consolidation began (< 0 before): the boundary."""
    return jnp.asarray(count, jnp.int32) - self.start

  def phase(self, count) -> jax.Array:
    """The phase of the step taken from ``count`` steps: ADMM, PROJECT or FACTORS."""
    if self.start is None:
      return jnp.asarray(ADMM, jnp.int32)
    into = self._steps_into(count)
    later = FACTORS if self.factored else PROJECT
    return jnp.where(into < 0, ADMM, jnp.where(into == 0, PROJECT, later)).astype(jnp.int32)

  def first(self, count) -> jax.Array:
    """Whether the step taken from ``count`` steps is the first of its
    consolidation phase (the structure is chosen; the whole of it trained)."""
    if self.start is None:
      return jnp.asarray(False)
    into = self._steps_into(count)
    return (into == 0) | ((into == 1) & self.factored)


@dataclasses.dataclass(frozen=True)
class Options:
  """Every option of the transform, checked (see ``OPTIONS_DOC``)."""

  structure: Any
  include_embedding: bool
  include_head: bool
  row_axes: Any
  every_k: Any
  hparams: dict  # rho, rank_target, density_target, k_alpha, k_beta, k_d as given
  shape_rho: bool  # rho='shape_dependent'
  deriv_start: Any
  static: blk.Static
  beta_init: Any
  state_dtype: Any
  dual_dtype: Any
  sparse_capacity: Any
  spread_rounds: bool
  seed: int
  target_schedule: Optional[Callable]
  rho_schedule: Optional[Callable]
  consolidation: Consolidation


def _check_choices(*, mode, consolidate_params, rho, svt, alpha_init,
                   target_schedule, rho_schedule):
  ctl.check_mode(mode)
  if consolidate_params not in cons.PARAMETERISATIONS:
    raise ValueError(f"consolidate_params must be one of {cons.PARAMETERISATIONS}, "
                     f"got {consolidate_params!r}")
  for name, fn in (("target_schedule", target_schedule), ("rho_schedule", rho_schedule)):
    if fn is not None and not callable(fn):
      raise ValueError(f"{name} must be a callable of the round count or None, got {fn!r}")
  if isinstance(rho, str) and rho != "shape_dependent":
    raise ValueError(f"rho must be positive, per block, or 'shape_dependent', got {rho!r}")
  if svt not in SVT_METHODS:
    raise ValueError(f"svt must be one of {SVT_METHODS}, got {svt!r}")
  if isinstance(alpha_init, str) and alpha_init not in ("zero", "sigma_k"):
    raise ValueError(f"alpha_init must be 'zero', 'sigma_k' or a number, got {alpha_init!r}")


def _parse_static(*, mode, sparse_mode, svt, svt_iters, init_iters, energy, alpha_init,
                  max_rank, every_k) -> blk.Static:
  """The static configuration of a block's round."""
  sparse_kind, n_m = _parse_sparse_mode(sparse_mode)
  if not isinstance(alpha_init, str):
    _check_value("alpha_init", alpha_init, "", 0.0, None, low_open=False)
  k_val = _concrete_float(every_k)
  if k_val is not None and (k_val < 1 or k_val != int(k_val)):
    raise ValueError(f"every_k (K) must be an integer >= 1, got {every_k}")
  _check_value("energy", energy, "", 0.0, 1.0)
  svt_iters, init_iters = _static_int("svt_iters", svt_iters), _static_int("init_iters", init_iters)
  if max_rank is not None:
    max_rank = _static_int("max_rank", max_rank)
  if svt_iters < 1 or init_iters < 1:
    raise ValueError("svt_iters and init_iters must be >= 1")
  if max_rank is not None and max_rank < 1:
    raise ValueError(f"max_rank must be >= 1 or None, got {max_rank}")
  return blk.Static(mode, sparse_kind, n_m, svt, svt_iters, init_iters,
                    float(energy) if _concrete_float(energy) is not None else energy,
                    alpha_init, max_rank)


def _parse_cuts(*, factored: bool, seed: int, global_dropout, budgets, overhead, jitter,
                joint) -> CutSchedule:
  """The cut options (``cut_schedule``); they train cuts of the factors."""
  global_dropout = _static_float("consolidate_global_dropout", global_dropout)
  _check_value("consolidate_global_dropout", global_dropout, "", 0.0, 1.0, low_open=False)
  if global_dropout and not factored:
    raise ValueError("consolidate_global_dropout trains cuts of the factors: it needs "
                     "consolidate_params='factors'")
  budgets = _static_budgets(budgets)
  if budgets and not factored:
    raise ValueError("consolidate_cut_budgets trains cuts of the factors: it needs "
                     "consolidate_params='factors'")
  overhead = _static_float("consolidate_cut_overhead", overhead)
  _check_value("consolidate_cut_overhead", overhead, "", 0.0, None, low_open=False)
  if overhead and not budgets:
    raise ValueError("consolidate_cut_overhead prices the cuts of consolidate_cut_budgets: "
                     "pass those too")
  jitter = _static_float("consolidate_cut_jitter", jitter)
  _check_value("consolidate_cut_jitter", jitter, "", 0.0, 1.0, low_open=False)
  if jitter and not budgets:
    raise ValueError("consolidate_cut_jitter moves the cuts of consolidate_cut_budgets: "
                     "pass those too")
  joint = _static_float("consolidate_cut_joint", joint)
  _check_value("consolidate_cut_joint", joint, "", 0.0, 1.0, low_open=False)
  if joint == 1.0:
    raise ValueError("consolidate_cut_joint must be < 1: the whole structure keeps a share "
                     "of the loss")
  if joint and not any(b < 1.0 for b in budgets):
    raise ValueError("consolidate_cut_joint adds the loss at a cut of consolidate_cut_budgets: "
                     "pass at least one budget below 1")
  if budgets and global_dropout:
    raise ValueError("consolidate_cut_budgets and consolidate_global_dropout both choose "
                     "each step's cut: pass one of them")
  return CutSchedule(seed, global_dropout, budgets, overhead, jitter, joint)


def parse_consolidation(*, coupled: bool, seed: int, consolidate_from, consolidate_structure,
                        consolidate_support, consolidate_dropout, consolidate_params,
                        consolidate_factor_lr, **cut_options) -> Consolidation:
  """The checked :class:`Consolidation` (``parse`` uses it; so does the
  validation of the training flags, ``train.config``)."""
  if consolidate_structure not in cons.STRUCTURES:
    raise ValueError(f"consolidate_structure must be one of {cons.STRUCTURES}, "
                     f"got {consolidate_structure!r}")
  if consolidate_support not in cons.SUPPORTS:
    raise ValueError(f"consolidate_support must be one of {cons.SUPPORTS}, "
                     f"got {consolidate_support!r}")
  if consolidate_support != "largest" and consolidate_structure != "target":
    raise ValueError("consolidate_support chooses the support of structure 'target': it "
                     "needs consolidate_structure='target'")
  if consolidate_from is not None:
    consolidate_from = _static_int("consolidate_from", consolidate_from)
    if consolidate_from < 0:
      raise ValueError(f"consolidate_from must be a step >= 0 or None, got {consolidate_from}")
  dropout = _static_float("consolidate_dropout", consolidate_dropout)
  _check_value("consolidate_dropout", dropout, "", 0.0, 1.0, low_open=False)
  factored = consolidate_params == "factors"
  if factored and (not coupled or consolidate_from is None or dropout):
    raise ValueError(
        "consolidate_params='factors' trains the factors with the inner optimiser: it needs "
        "the coupled salaad(inner, ...), a consolidate_from step and no consolidate_dropout")
  factor_lr = _static_float("consolidate_factor_lr", consolidate_factor_lr)
  _check_value("consolidate_factor_lr", factor_lr, "", 0.0, None)
  if factor_lr != 1.0 and not factored:
    raise ValueError("consolidate_factor_lr scales the factors' steps: it needs "
                     "consolidate_params='factors'")
  cuts = _parse_cuts(
      factored=factored, seed=seed, global_dropout=cut_options["consolidate_global_dropout"],
      budgets=cut_options["consolidate_cut_budgets"],
      overhead=cut_options["consolidate_cut_overhead"],
      jitter=cut_options["consolidate_cut_jitter"], joint=cut_options["consolidate_cut_joint"])
  return Consolidation(consolidate_from, consolidate_structure, consolidate_support, dropout,
                       consolidate_params, factor_lr, cuts)


def _parse_capacity(sparse_capacity):
  if sparse_capacity is None or (isinstance(sparse_capacity, str)
                                 and sparse_capacity == "auto"):
    return sparse_capacity
  if isinstance(sparse_capacity, str):
    raise ValueError(f"sparse_capacity must be 'auto', a fraction in (0, 1] or None, "
                     f"got {sparse_capacity!r}")
  sparse_capacity = _static_float("sparse_capacity", sparse_capacity)
  _check_value("sparse_capacity", sparse_capacity, "", 0.0, 1.0)
  return sparse_capacity


def parse(*, coupled: bool, structure, include_embedding, include_head, row_axes, every_k,
          rho, rank_target, density_target, k_alpha, k_beta, k_d, deriv_start, energy, mode,
          sparse_mode, svt, svt_iters, init_iters, max_rank, alpha_init, beta_init,
          state_dtype, dual_dtype, sparse_capacity, spread_rounds, seed, target_schedule,
          rho_schedule, consolidate_from, consolidate_params, **consolidate_options) -> Options:
  """The checked :class:`Options` of ``salaad`` (``coupled``) or
  ``salaad_decoupled``; ValueError naming the option for a bad value or
  combination."""
  _check_choices(mode=mode, consolidate_params=consolidate_params, rho=rho, svt=svt,
                 alpha_init=alpha_init, target_schedule=target_schedule,
                 rho_schedule=rho_schedule)
  static = _parse_static(mode=mode, sparse_mode=sparse_mode, svt=svt, svt_iters=svt_iters,
                         init_iters=init_iters, energy=energy, alpha_init=alpha_init,
                         max_rank=max_rank, every_k=every_k)
  _check_value("beta_init", beta_init, "", 0.0, None, low_open=False)
  consolidation = parse_consolidation(
      coupled=coupled, seed=seed, consolidate_from=consolidate_from,
      consolidate_params=consolidate_params, **consolidate_options)
  sparse_capacity = _parse_capacity(sparse_capacity)
  if spread_rounds and _concrete_float(every_k) is None:
    raise ValueError("spread_rounds needs a concrete every_k (not an injected hyperparameter)")
  hparams = dict(rho=rho, rank_target=rank_target, density_target=density_target,
                 k_alpha=k_alpha, k_beta=k_beta, k_d=k_d)
  for name, value in hparams.items():  # scalars now, per-block values at init
    if not callable(value) and len(jax.tree.leaves(value)) == 1:
      _check_value(name, jax.tree.leaves(value)[0], "", *_HPARAM_RULES[name])
  return Options(structure, include_embedding, include_head, row_axes, every_k, hparams,
                 isinstance(rho, str), deriv_start, static, beta_init, state_dtype, dual_dtype,
                 sparse_capacity, spread_rounds, seed, target_schedule, rho_schedule,
                 consolidation)


# The options' reference, appended to the docstrings of ``salaad`` and
# ``salaad_decoupled`` (docs/options.md has them as tables).
OPTIONS_DOC = """
  Args (all keyword-only):
    structure: which params are blocks: None (2-D+ ``kernel`` leaves except
      the head), a regex on the '/'-joined parameter path, or a predicate
      ``(path, leaf) -> bool``.
    include_embedding, include_head: add the token embedding / output head to
      the default selection.
    row_axes: for kernels of rank > 2, how many leading axes form the matrix
      rows (int or ``(path, shape) -> int``); default: the squarest split.
    every_k: K, steps between ADMM rounds (>= 1).
    rho: ADMM penalty rho_i > 0.  Per-block hyperparameters (rho,
      rank_target, density_target, k_alpha, k_beta, k_d) are a scalar, a
      callable ``path -> value`` or a pytree shaped like the params.
    rank_target, density_target: r* and d* in (0, 1].
    k_alpha, k_beta, k_d: controller gains (>= 0).
    deriv_start: n_d, rounds before the one-sided derivative term acts.
    energy: e, the energy fraction of the effective rank.
    mode: 'adaptive' | 'fixed' | 'hard_cut'.
    sparse_mode: 'soft' (l1), 'topk' (keep d* of the entries), 'rows' /
      'cols' (group l2 over rows / columns), or 'N:M' along the input
      dimension (e.g. '2:4').
    svt: 'fast' (warm-started subspace iteration at rank ``max_rank``) or
      'exact' (full SVD).
    svt_iters: subspace iterations per round (fast SVT).
    init_iters: subspace iterations of the randomized initial SVD (fast SVT).
    max_rank: bound on the factor rank r; default: min(m, n) for 'exact',
      ceil(2 r* min(m, n)) + 8 for 'fast'.
    alpha_init: 'zero' (reference) or 'sigma_k' (alpha_0 = rho sigma_k(X_0),
      k = ceil(r* min(m, n)), so the first SVT cuts at the target rank), or
      a number (alpha_0 itself; with mode='fixed' it stays there).
    beta_init: beta_0 (default 0).
    state_dtype: storage dtype of S (default float32; None: the params'
      dtype).
    dual_dtype: storage dtype of the scaled dual U, which integrates the
      residual X - L - S over the rounds (default float32; None: the params'
      dtype).  The factors of L stay float32, and every round computes in
      float32 whatever the storage.  bfloat16 S and U halve their memory
      (benchmarks/RESULTS.md: state memory and its quality cost).
    sparse_capacity: how S is stored.  'auto' (default): compactly, as
      values and int32 flat indices of at most ceil(kappa m n) entries per
      block, kappa = min(1, 3 d*) (at least N/M for 'N:M'); needs a concrete
      density_target.  A fraction kappa in (0, 1]: that capacity.  None: S
      dense in the param's shape.  When a round's S has more nonzeros than
      the capacity, the largest |entries| are kept (a projection; the block's
      ``density`` stat, measured before it, then exceeds kappa).  'auto'
      keeps the group-sparse modes ('rows', 'cols') dense.  Static.
    spread_rounds: spread the blocks' rounds over the K steps (each shape
      group, chunked, runs at its own phase) instead of running all blocks
      every K-th step: the same work, no step-time spike, less transient
      memory.  Needs a concrete every_k.
    seed: seed of the random initial sketch.
    target_schedule: None (constant targets) or a looseness schedule w(n)
      in [0, 1] of the round count: the controller tracks
      r*_n = r* + w(n) (1 - r*) and d*_n = d* + w(n) (1 - d*)
      (e.g. ``schedules.cubic_looseness``).
    rho_schedule: None (fixed rho) or a multiplier m(n) > 0 of the round
      count: rho_i(n) = rho_i m(n) (e.g. ``schedules.tanh_rho_ramp``); U
      is rescaled by m(n) / m(n + 1) in the dual step.  ``rho`` may also be
      'shape_dependent': rho_i = 1 / (n_blocks sqrt(m n)) (reference mode).
    consolidate_from: None, or the step count after which the ADMM rounds
      stop and every block is projected each step onto a fixed structure,
      so the model trains its own surrogate L + S (``consolidate``).
    consolidate_structure: 'target' (rank ceil(r* min(m, n)), the d* largest
      residual entries) or 'current' (the controller's rank and support),
      chosen at the first consolidation step.
    consolidate_support: with structure 'target', the support Omega_i of S
      chosen at the first consolidation step: 'largest' (the d* m n largest
      |X_i - L_i|) or 'random' (d* m n entries drawn uniformly, seeded by
      ``seed`` and the block; a control that isolates what the chosen
      support is worth, as SLTrain's random support).
    consolidate_dropout: p in [0, 1): during consolidation the params hold
      L + S with a random trailing share q ~ U(0, p) of every block's
      triplets and smallest S entries removed (nested dropout), while the
      state keeps the full L and S, so smaller deployments train too.  The
      surrogate (``surrogate_params``) is the full model.
    consolidate_params: how consolidation trains the surrogate: 'projection'
      (the dense step, then the projection onto the structure) or 'factors'
      (the structure chosen by the first projection, then L's factors
      B, A (L = B A^T) and S's values on its support trained by ``inner``
      through the chain rule, with their own optimiser state; coupled
      ``salaad`` only, no ``consolidate_dropout``; ``consolidate`` module).
    consolidate_factor_lr: c > 0, with ``consolidate_params='factors'``: the
      factors' steps are c times the inner optimiser's (their learning rate
      relative to the run's; S's values keep the run's), as LoRA's and
      SLTrain's alpha / r multiplies their low-rank product.
    consolidate_global_dropout: p in [0, 1], with ``consolidate_params=
      'factors'``: each step the params hold the global allocator's cut of
      L + S to a random share 1 - q, q ~ U(0, p), of the structure's
      parameters, and only what the cut kept is trained that step (nested
      dropout with the deployment's own cut, ``consolidate.global_cut``);
      the state keeps the whole surrogate (``surrogate_params``).
    consolidate_cut_budgets: budgets b in (0, 1], with ``consolidate_params=
      'factors'``: each step trains the global allocator's cut of L + S to
      one of them, drawn uniformly: b times the model's parameter count
      (every leaf at full size, as a dense model), less the parameters
      outside the blocks, is what the structure keeps (a budget the whole
      structure fits in trains all of it).  The deployments the run is
      meant for are trained, not a uniform share of cuts; no
      ``consolidate_global_dropout`` with it.
    consolidate_cut_overhead: with ``consolidate_cut_budgets``, the fixed
      cost of storing any of a block's S, in parameters per matrix entry,
      counted in the budgets and folded into the cut as the deployment's
      allocator does (a bitmap with 2-byte values: 1/16; then the budgets
      are fractions of the dense model's bytes).  0: S has no fixed cost.
    consolidate_cut_jitter: j in [0, 1], with ``consolidate_cut_budgets``:
      each drawn budget below 1 moves by U(-j, j), so the run trains the
      cuts around each budget, not one cut (a deployment's allocator may
      choose a slightly different one).
    consolidate_cut_joint: w in [0, 1), with ``consolidate_cut_budgets``
      (one below 1 at least): instead of the steps alternating between the
      cuts, every step's loss is (1 - w) its loss at the whole L + S plus w
      its loss at one cut (drawn among the budgets below 1), as Matryoshka
      representation learning trains its nested sizes together.  The params
      stay the whole L + S; ``update`` then needs ``grad_fn=f``, f(params)
      -> the gradients of the step's loss at ``params`` (the same batch),
      called once per consolidation step at the cut: two forward and
      backward passes per step.  0: off.
"""
