"""SALAAD as an optax GradientTransformation (SALAAD.md §2, §4, §5).

Two forms share one state and one ADMM round:

* ``salaad(inner, ...)`` — coupled: the gradient of every block becomes
  g_i + rho_i (X_i - L_i - S_i + U_i) before ``inner`` (e.g. clip + AdamW)
  turns it into the update.
* ``salaad_decoupled(learning_rate, ...)`` — an element appended to an
  existing chain: the incoming update u_i (already scaled by the base
  optimiser) becomes u_i - lr * rho_i (X_i - L_i - S_i + U_i).

Every ``every_k`` steps, on the new X = params + update, each block runs one
ADMM round in float32 (L-step by singular value thresholding, controller on
alpha, S-step by a sparse prox, controller on beta, dual ascent on the scaled
dual U = Y / rho).  The round runs under ``lax.cond`` and is vmapped over the
blocks that share a matrix shape.  L is kept factored at a bounded rank, and
S compactly at a bounded number of entries (``compact``; ``sparse_capacity``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

from absl import logging
import jax
import jax.numpy as jnp
import optax

from salaad_jax import block as blk
from salaad_jax import compact
from salaad_jax import consolidate as cons
from salaad_jax import controller as ctl
from salaad_jax import cut_schedule as cut_lib
from salaad_jax.hparams import (_HPARAM_RULES, _BlockHparams, _block_hparams,
                                 _check_value, _concrete_float, _parse_sparse_mode,
                                 _static_float, _static_int)
from salaad_jax import prox
from salaad_jax.opt_state import FactorState, PER_BLOCK_FIELDS, SalaadState, placeholder
from salaad_jax import schedules as sched
from salaad_jax import structure as st

_F32 = jnp.float32
ScalarOrPerBlock = Union[float, jax.Array, Any, Callable[[str], float]]

SVT_METHODS = ("fast", "exact")


# --------------------------------------------------------------------------
# The transform.
# --------------------------------------------------------------------------


class _Layout(NamedTuple):
  treedef: Any
  paths: list
  infos: list  # BlockInfo or None per leaf
  hparams: list  # _BlockHparams or None per leaf
  ranks: list  # int or None per leaf
  caps: list  # entries S may hold (int), or None (dense S / not a block), per leaf


def _groups(layout: _Layout):
  """Leaf indices of blocks grouped by (matrix shape, factor rank, S capacity)."""
  groups: dict[tuple, list[int]] = {}
  for i, info in enumerate(layout.infos):
    if info is not None:
      groups.setdefault((info.matrix_shape, layout.ranks[i], layout.caps[i]), []).append(i)
  return list(groups.values())


def _holds_multisteps(tree) -> bool:
  is_ms = lambda x: isinstance(x, optax.MultiStepsState)
  return any(is_ms(x) for x in jax.tree.leaves(tree, is_leaf=is_ms))


def _stack_hparams(hps: list[_BlockHparams]) -> _BlockHparams:
  return _BlockHparams(*(jnp.stack([jnp.asarray(v, _F32) for v in vals])
                         for vals in zip(*hps)))


def _penalty_term(x, l_u, l_s, l_v, s, dual, info, rho):
  """rho (X - L - S + U) in float32, in the param's shape (S stored either way)."""
  l_dense = st.from_matrix(prox.dense(prox.Factors(l_u, l_s, l_v)), info)
  return jnp.asarray(rho, _F32) * (
      jnp.asarray(x, _F32) - l_dense - compact.as_dense(s, info.shape)
      + jnp.asarray(dual, _F32))


def _make(inner: Optional[optax.GradientTransformation], learning_rate, *,
          structure, include_embedding, include_head, row_axes, every_k, rho,
          rank_target, density_target, k_alpha, k_beta, k_d, deriv_start,
          energy, mode, sparse_mode, svt, svt_iters, init_iters, max_rank,
          alpha_init, beta_init, state_dtype, dual_dtype, spread_rounds, seed,
          sparse_capacity="auto", target_schedule=None, rho_schedule=None,
          consolidate_from=None, consolidate_structure="target", consolidate_dropout=0.0,
          consolidate_support="largest", consolidate_params="projection", consolidate_factor_lr=1.0,
          consolidate_global_dropout=0.0, consolidate_cut_budgets=(),
          consolidate_cut_overhead=0.0, consolidate_cut_jitter=0.0,
          consolidate_cut_joint=0.0):
  ctl.check_mode(mode)
  if consolidate_structure not in cons.STRUCTURES:
    raise ValueError(f"consolidate_structure must be one of {cons.STRUCTURES}, "
                     f"got {consolidate_structure!r}")
  if consolidate_support not in cons.SUPPORTS:
    raise ValueError(f"consolidate_support must be one of {cons.SUPPORTS}, "
                     f"got {consolidate_support!r}")
  if consolidate_support != "largest" and consolidate_structure != "target":
    raise ValueError("consolidate_support chooses the support of structure 'target': it "
                     "needs consolidate_structure='target'")
  if consolidate_params not in cons.PARAMETERISATIONS:
    raise ValueError(f"consolidate_params must be one of {cons.PARAMETERISATIONS}, "
                     f"got {consolidate_params!r}")
  for name, fn in (("target_schedule", target_schedule), ("rho_schedule", rho_schedule)):
    if fn is not None and not callable(fn):
      raise ValueError(f"{name} must be a callable of the round count or None, got {fn!r}")
  shape_rho = isinstance(rho, str)
  if shape_rho and rho != "shape_dependent":
    raise ValueError(f"rho must be positive, per block, or 'shape_dependent', got {rho!r}")
  sparse_kind, n_m = _parse_sparse_mode(sparse_mode)
  if svt not in SVT_METHODS:
    raise ValueError(f"svt must be one of {SVT_METHODS}, got {svt!r}")
  if isinstance(alpha_init, str):
    if alpha_init not in ("zero", "sigma_k"):
      raise ValueError(f"alpha_init must be 'zero', 'sigma_k' or a number, got {alpha_init!r}")
  else:
    _check_value("alpha_init", alpha_init, "", 0.0, None, low_open=False)
  _check_value("beta_init", beta_init, "", 0.0, None, low_open=False)
  k_val = _concrete_float(every_k)
  if k_val is not None and (k_val < 1 or k_val != int(k_val)):
    raise ValueError(f"every_k (K) must be an integer >= 1, got {every_k}")
  _check_value("energy", energy, "", 0.0, 1.0)
  svt_iters, init_iters = _static_int("svt_iters", svt_iters), _static_int("init_iters", init_iters)
  if max_rank is not None:
    max_rank = _static_int("max_rank", max_rank)
  if svt_iters < 1 or init_iters < 1:
    raise ValueError("svt_iters and init_iters must be >= 1")
  if consolidate_from is not None:
    consolidate_from = _static_int("consolidate_from", consolidate_from)
    if consolidate_from < 0:
      raise ValueError(f"consolidate_from must be a step >= 0 or None, got {consolidate_from}")
  consolidate_dropout = _static_float("consolidate_dropout", consolidate_dropout)
  _check_value("consolidate_dropout", consolidate_dropout, "", 0.0, 1.0, low_open=False)
  factored = consolidate_params == "factors"
  if factored and (inner is None or consolidate_from is None or consolidate_dropout):
    raise ValueError(
        "consolidate_params='factors' trains the factors with the inner optimiser: it needs "
        "the coupled salaad(inner, ...), a consolidate_from step and no consolidate_dropout")
  consolidate_factor_lr = _static_float("consolidate_factor_lr", consolidate_factor_lr)
  _check_value("consolidate_factor_lr", consolidate_factor_lr, "", 0.0, None)
  if consolidate_factor_lr != 1.0 and not factored:
    raise ValueError("consolidate_factor_lr scales the factors' steps: it needs "
                     "consolidate_params='factors'")
  schedule = cut_lib.CutSchedule.from_options(
      factored=factored, seed=seed, consolidate_from=consolidate_from,
      global_dropout=consolidate_global_dropout, budgets=consolidate_cut_budgets,
      overhead=consolidate_cut_overhead, jitter=consolidate_cut_jitter,
      joint=consolidate_cut_joint)
  if sparse_capacity is not None and not (isinstance(sparse_capacity, str)
                                         and sparse_capacity == "auto"):
    if isinstance(sparse_capacity, str):
      raise ValueError(f"sparse_capacity must be 'auto', a fraction in (0, 1] or None, "
                       f"got {sparse_capacity!r}")
    sparse_capacity = _static_float("sparse_capacity", sparse_capacity)
    _check_value("sparse_capacity", sparse_capacity, "", 0.0, 1.0)
  if spread_rounds and k_val is None:
    raise ValueError("spread_rounds needs a concrete every_k (not an injected hyperparameter)")
  if max_rank is not None and int(max_rank) < 1:
    raise ValueError(f"max_rank must be >= 1 or None, got {max_rank}")
  cfg = blk.Static(mode, sparse_kind, n_m, svt, int(svt_iters), int(init_iters),
                float(energy) if _concrete_float(energy) is not None else energy,
                alpha_init, None if max_rank is None else int(max_rank))
  hp_in = dict(rho=rho, rank_target=rank_target, density_target=density_target,
               k_alpha=k_alpha, k_beta=k_beta, k_d=k_d)
  # Validate scalar hyperparameters now rather than at the first init.
  for name, value in hp_in.items():
    if not callable(value) and len(jax.tree.leaves(value)) == 1:
      _check_value(name, jax.tree.leaves(value)[0], "", *_HPARAM_RULES[name])
  inner = None if inner is None else optax.with_extra_args_support(inner)

  def layout_of(params, sparse=None) -> _Layout:
    """Blocks, hyperparameters, factor ranks and S capacities of ``params``;
    with ``sparse`` (the state's S) the capacities are read off its storage,
    so an update needs no concrete d* (only init sizes S)."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [st.path_str(p) for p, _ in leaves_with_path]
    # The default selection may find no block (vectors, scalars): then the
    # transform passes through.  An explicit structure= must select one.
    info_tree = st.select_blocks(params, structure, include_embedding=include_embedding,
                                 include_head=include_head, row_axes=row_axes,
                                 allow_empty=structure is None)
    infos = treedef.flatten_up_to(info_tree)
    hps = _block_hparams(hp_in, treedef, paths, infos)
    if shape_rho:  # the reference's shape-dependent mode: rho_i = 1 / (n_blocks sqrt(m n))
      n_blocks = sum(i is not None for i in infos)
      hps = [None if h is None else h._replace(
          rho=1.0 / (n_blocks * math.sqrt(math.prod(i.matrix_shape))))
             for h, i in zip(hps, infos)]
    ranks = [None if i is None else blk.rank_for(i, cfg, h.rank_target)
             for i, h in zip(infos, hps)]
    if sparse is not None:
      caps = [c.values.shape[0] if isinstance(c, compact.CompactSparse) else None
              for c in treedef.flatten_up_to(sparse)]
    else:
      caps = [None if i is None else blk.capacity(sparse_capacity, i, h.density_target, cfg)
              for i, h in zip(infos, hps)]
    return _Layout(treedef, paths, infos, hps, ranks, caps)

  def storage_dtype(x, dtype=state_dtype):
    return jnp.dtype(x.dtype) if dtype is None else jnp.dtype(dtype)

  def init_fn(params):
    inner_state = optax.EmptyState() if inner is None else inner.init(params)
    if _holds_multisteps(inner_state):
      raise ValueError(
          "salaad(inner): inner contains optax.MultiSteps, so SALAAD would count "
          "micro-steps and run its rounds on updates that are not applied; nest it "
          "the other way: optax.MultiSteps(salaad(inner, ...), every_k_schedule=k)")
    layout = layout_of(params)
    leaves = layout.treedef.flatten_up_to(params)
    if all(info is None for info in layout.infos):
      logging.warning(
          "salaad: no parameter is a block under the default structure (2-D+ "
          "'kernel' leaves); the transform passes through (coupled: the inner "
          "optimiser alone, decoupled: the identity). Paths: %s",
          layout.paths[:8])
    fields = {k: [placeholder() for _ in leaves] for k in PER_BLOCK_FIELDS}
    key = jax.random.key(seed)
    for idx in _groups(layout):
      xs = jnp.stack([st.as_matrix(jnp.asarray(leaves[i], _F32), layout.infos[i])
                      for i in idx])
      hps = _stack_hparams([layout.hparams[i] for i in idx])
      keys = jax.random.split(jax.random.fold_in(key, idx[0]), len(idx))
      init_one = lambda x, k, r_t, rho_: blk.init_block(x, k, r_t, rho_, layout.ranks[idx[0]], cfg)
      f, alpha0, rate0 = jax.vmap(init_one)(xs, keys, hps.rank_target, hps.rho)
      for j, i in enumerate(idx):
        fields["lr_u"][i], fields["lr_s"][i], fields["lr_v"][i] = f.u[j], f.s[j], f.v[j]
        dt = storage_dtype(leaves[i])
        cap = layout.caps[i]
        fields["sparse"][i] = (jnp.zeros(layout.infos[i].shape, dt) if cap is None
                               else compact.empty(cap, dt))
        fields["dual"][i] = jnp.zeros(layout.infos[i].shape, storage_dtype(leaves[i], dual_dtype))
        fields["alpha"][i] = alpha0[j]
        fields["beta"][i] = jnp.asarray(beta_init, _F32)
        fields["rank_rate"][i] = rate0[j]
        fields["density"][i] = jnp.zeros((), _F32)
    trees = {k: jax.tree_util.tree_unflatten(layout.treedef, v) for k, v in fields.items()}
    return SalaadState(count=jnp.zeros([], jnp.int32), num_rounds=jnp.zeros([], jnp.int32),
                       inner_state=inner_state, factored=init_factored(layout), **trees)

  def factor_width(layout: _Layout, i: int) -> int:
    """``consolidate.factor_width`` of block ``i``."""
    r_t = _concrete_float(layout.hparams[i].rank_target)
    if r_t is None and consolidate_structure == "target":
      raise ValueError("consolidate_params='factors' needs a concrete rank_target")
    return cons.factor_width(consolidate_structure, layout.ranks[i], r_t,
                             layout.infos[i].matrix_shape)

  def init_factored(layout: _Layout):
    """``()``, or with consolidation in factors zero factors (B, A) per block
    and the inner optimiser's state for them."""
    if not factored:
      return ()
    leaves = []
    for i, info in enumerate(layout.infos):
      if info is None:
        leaves.append(placeholder())
      else:
        (m, n), w = info.matrix_shape, factor_width(layout, i)
        leaves.append((jnp.zeros((m, w), _F32), jnp.zeros((n, w), _F32)))
    factors = jax.tree_util.tree_unflatten(layout.treedef, leaves)
    return FactorState(factors, inner.init(factors))

  def penalties(params, state, layout):
    """Per-leaf float32 rho (X - L - S + U) for blocks, None otherwise."""
    flat = {k: layout.treedef.flatten_up_to(getattr(state, k)) for k in
            ("lr_u", "lr_s", "lr_v", "sparse", "dual")}
    leaves = layout.treedef.flatten_up_to(params)
    scale = rho_scale(state.count // jnp.asarray(every_k, jnp.int32))
    out = []
    for i, info in enumerate(layout.infos):
      if info is None:
        out.append(None)
      else:
        out.append(_penalty_term(leaves[i], flat["lr_u"][i], flat["lr_s"][i],
                                 flat["lr_v"][i], flat["sparse"][i], flat["dual"][i],
                                 info, jnp.asarray(layout.hparams[i].rho, _F32) * scale))
    return out

  def rho_scale(n):
    """m(n), the rho multiplier of round n (1 without a rho schedule)."""
    return jnp.ones((), _F32) if rho_schedule is None else jnp.asarray(rho_schedule(n), _F32)

  def scheduled(hps: _BlockHparams, num_rounds) -> tuple[_BlockHparams, jax.Array]:
    """The round's hyperparameters (rho_i m(n), loosened targets) and the
    dual rescaling m(n) / m(n + 1)."""
    now, nxt = rho_scale(num_rounds), rho_scale(num_rounds + 1)
    hps = hps._replace(rho=hps.rho * now)
    if target_schedule is not None:
      w = jnp.asarray(target_schedule(num_rounds), _F32)
      hps = hps._replace(rank_target=sched.loosen(hps.rank_target, w),
                         density_target=sched.loosen(hps.density_target, w))
    return hps, now / nxt

  def work_units(layout: _Layout):
    """Lists of leaf indices (one shape group or a chunk of one) with the
    phase in [0, K) at which each unit runs its round."""
    groups = _groups(layout)
    if not spread_rounds:
      return [(idx, 0) for idx in groups]
    k = int(_concrete_float(every_k))
    total = sum(len(g) for g in groups)
    chunk = max(1, math.ceil(total / k))
    units = [g[a:a + chunk] for g in groups for a in range(0, len(g), chunk)]
    return [(u, (n * k) // len(units)) for n, u in enumerate(units)]

  def round_unit(idx, new_x_leaves, sub, num_rounds, layout: _Layout):
    """One ADMM round for the blocks ``idx`` (one shape), vmapped.  ``sub``
    maps each per-block field name to the list of those blocks' values."""
    infos = [layout.infos[i] for i in idx]
    cap = layout.caps[idx[0]]  # one per work unit (part of the group key)

    def stack(name, as_mat=False):
      if name == "sparse":
        return jnp.stack([compact.as_dense(v, inf.matrix_shape)
                          for v, inf in zip(sub[name], infos)])
      vals = [jnp.asarray(v, _F32) for v in sub[name]]
      if as_mat:
        vals = [st.as_matrix(v, inf) for v, inf in zip(vals, infos)]
      return jnp.stack(vals)

    xs = jnp.stack([st.as_matrix(jnp.asarray(new_x_leaves[i], _F32), inf)
                    for i, inf in zip(idx, infos)])
    f = prox.Factors(stack("lr_u"), stack("lr_s"), stack("lr_v"))
    hps, dual_scale = scheduled(_stack_hparams([layout.hparams[i] for i in idx]), num_rounds)
    one = lambda x, f_, s_, u_, a_, b_, rp, dp, h: blk.round_block(
        x, f_, s_, u_, a_, b_, rp, dp, num_rounds, h, deriv_start, cfg, dual_scale, cap)
    f, s, dual, alpha, beta, rate, dens = jax.vmap(one)(
        xs, f, stack("sparse"), stack("dual", True), stack("alpha"),
        stack("beta"), stack("rank_rate"), stack("density"), hps)
    out = {k: list(v) for k, v in sub.items()}
    for j, inf in enumerate(infos):
      out["lr_u"][j], out["lr_s"][j], out["lr_v"][j] = f.u[j], f.s[j], f.v[j]
      out["sparse"][j] = store_sparse(jax.tree.map(lambda a, j=j: a[j], s), inf,
                                      sub["sparse"][j])
      out["dual"][j] = st.from_matrix(dual[j], inf).astype(sub["dual"][j].dtype)
      out["alpha"][j], out["beta"][j] = alpha[j], beta[j]
      out["rank_rate"][j], out["density"][j] = rate[j], dens[j]
    return out

  def store_sparse(s, info, old):
    """S_i as stored: compact (``s`` already a ``CompactSparse``) or dense in
    the param's shape, in the storage dtype of ``old``."""
    if isinstance(old, compact.CompactSparse):
      return compact.CompactSparse(s.values.astype(old.values.dtype), s.index)
    return st.from_matrix(s, info).astype(old.dtype)

  def consolidate_unit(idx, new_x_leaves, u_leaves, sub, first, drop, layout: _Layout):
    """The consolidation projection (``consolidate.project_block``) of the
    blocks ``idx``; returns their fields and X_next - X_new per block (X_next:
    L + S, or with nested dropout its truncation ``consolidate.truncated``).
    With a capacity, S is projected onto it (``compact.compactify``) and X_next
    uses that S."""
    infos = [layout.infos[i] for i in idx]
    cap = layout.caps[idx[0]]
    mat = lambda vals: jnp.stack([compact.as_dense(v, inf.matrix_shape)
                                  for v, inf in zip(vals, infos)])
    xs = mat([new_x_leaves[i] for i in idx])
    f = prox.Factors(*(jnp.stack([jnp.asarray(v, _F32) for v in sub[k]])
                       for k in ("lr_u", "lr_s", "lr_v")))
    hps = _stack_hparams([layout.hparams[i] for i in idx])
    z = xs
    if consolidate_dropout:  # the params hold a truncation: step the full L + S
      full = jax.vmap(prox.dense)(f) + mat(sub["sparse"]) + mat([u_leaves[i] for i in idx])
      z = jnp.where(first, xs, full)
    one = lambda x, f_, s_, rt, dt, key: cons.project_block(
        x, f_, s_, first, rt, dt, consolidate_structure, cfg.svt_iters, cfg.svt == "exact",
        support_key=key)
    keys = (jnp.stack([cons.support_key(seed, i) for i in idx])
            if consolidate_support == "random" else jnp.full((len(idx),), jnp.nan))
    f, s, x_proj = jax.vmap(one)(z, f, mat(sub["sparse"]), hps.rank_target,
                                 hps.density_target, keys)
    dens = jax.vmap(prox.density)(s)  # before the capacity: > cap / (m n) marks an overflow
    stored = s
    if cap is not None:
      stored, s_cap = jax.vmap(compact.project, in_axes=(0, None))(s, cap)
      x_proj = x_proj + (s_cap - s)  # exactly x_proj when the capacity does not bind
      s = s_cap
    if consolidate_dropout:
      x_proj = jax.vmap(cons.truncated, in_axes=(0, 0, None))(f, s, drop)
    out = {k: list(v) for k, v in sub.items()}
    deltas = []
    for j, inf in enumerate(infos):
      out["lr_u"][j], out["lr_s"][j], out["lr_v"][j] = f.u[j], f.s[j], f.v[j]
      out["sparse"][j] = store_sparse(jax.tree.map(lambda a, j=j: a[j], stored), inf,
                                      sub["sparse"][j])
      out["dual"][j] = jnp.zeros_like(sub["dual"][j])
      out["rank_rate"][j] = jnp.sum(f.s[j] > 0).astype(_F32) / min(inf.matrix_shape)
      out["density"][j] = dens[j]
      deltas.append(st.from_matrix(x_proj[j] - xs[j], inf))
    return out, deltas

  def consolidate(updates, new_x_leaves, flat, count, layout: _Layout):
    """From step ``consolidate_from`` on: every block projected onto its
    fixed structure each step, the update becoming X_proj - X_old."""
    active = count > consolidate_from
    first = count == consolidate_from + 1
    u_leaves = list(layout.treedef.flatten_up_to(updates))
    drop = consolidate_dropout * jax.random.uniform(
        jax.random.fold_in(jax.random.key(seed + 1), count))
    for idx, _ in work_units(layout):
      sub = {f: [flat[f][i] for i in idx] for f in PER_BLOCK_FIELDS}
      zeros = [jnp.zeros(layout.infos[i].shape, _F32) for i in idx]
      sub, deltas = jax.lax.cond(
          active, lambda s_, idx=idx: consolidate_unit(idx, new_x_leaves, u_leaves, s_, first,
                                                       drop, layout),
          lambda s_, z=zeros: (s_, z), sub)
      for j, i in enumerate(idx):
        for f in PER_BLOCK_FIELDS:
          flat[f][i] = sub[f][j]
        u_leaves[i] = (jnp.asarray(u_leaves[i], _F32) + deltas[j]).astype(u_leaves[i].dtype)
    return jax.tree_util.tree_unflatten(layout.treedef, u_leaves)

  def finish(updates, new_x_leaves, inner_state, state, layout):
    """Counts the step and runs every work unit's round when its phase is due
    (each under its own ``lax.cond``; without spreading there is one phase);
    from ``consolidate_from`` on, the consolidation projection instead."""
    count = optax.safe_increment(state.count)
    k = jnp.asarray(every_k, jnp.int32)
    flat = {f: list(layout.treedef.flatten_up_to(getattr(state, f)))
            for f in PER_BLOCK_FIELDS}
    for idx, phase in work_units(layout):
      due = ((count + phase) % k) == 0
      if consolidate_from is not None:
        due = due & (count <= consolidate_from)
      num_rounds = (count + phase) // k - 1  # rounds this unit has done before
      sub = {f: [flat[f][i] for i in idx] for f in PER_BLOCK_FIELDS}
      sub = jax.lax.cond(
          due, lambda s_, idx=idx, n=num_rounds: round_unit(idx, new_x_leaves, s_, n, layout),
          lambda s_: s_, sub)
      for f in PER_BLOCK_FIELDS:
        for j, i in enumerate(idx):
          flat[f][i] = sub[f][j]
    if consolidate_from is not None:
      updates = consolidate(updates, new_x_leaves, flat, count, layout)
    trees = {f: jax.tree_util.tree_unflatten(layout.treedef, v) for f, v in flat.items()}
    state = state._replace(count=count, num_rounds=count // k, inner_state=inner_state,
                           **trees)
    return updates, state

  def check_params(params):
    if params is None:
      raise ValueError("salaad needs the current params: call update(grads, state, params)")

  def update_coupled(updates, state, params=None, **extra_args):
    check_params(params)
    grad_fn = extra_args.pop("grad_fn", None)  # ours: not passed to inner
    if schedule.joint and grad_fn is None:
      raise ValueError("consolidate_cut_joint needs the gradient at the cut: call "
                       "update(grads, state, params, grad_fn=f), f(params) -> the gradients "
                       "of this step's loss at params (salaad_jax.train.train_step does)")
    if not factored:
      return admm_coupled(updates, state, params, extra_args)
    return jax.lax.cond(state.count > consolidate_from,
                        lambda: factor_step(updates, state, params, extra_args, grad_fn),
                        lambda: admm_with_factors(updates, state, params, extra_args))

  def admm_with_factors(updates, state, params, extra_args):
    """The ADMM step (to and including the first consolidation projection)
    with consolidation in factors: the factors' optimiser steps on zero
    gradients, so its counts keep pace, and the projection's L becomes the
    balanced factors (B, A)."""
    new_updates, new_state = admm_coupled(updates, state, params, extra_args)
    fac = state.factored
    zeros = jax.tree.map(jnp.zeros_like, fac.factors)
    _, f_inner = inner.update(zeros, fac.inner_state, fac.factors, **extra_args)
    layout = layout_of(params, state.sparse)

    def from_projection():
      flat = {k: layout.treedef.flatten_up_to(getattr(new_state, k))
              for k in ("lr_u", "lr_s", "lr_v")}
      leaves = [placeholder() if info is None else
                cons.balanced(prox.Factors(flat["lr_u"][i], flat["lr_s"][i], flat["lr_v"][i]),
                              factor_width(layout, i))
                for i, info in enumerate(layout.infos)]
      return jax.tree_util.tree_unflatten(layout.treedef, leaves)

    factors = jax.lax.cond(new_state.count == consolidate_from + 1, from_projection,
                           lambda: fac.factors)
    return new_updates, new_state._replace(factored=FactorState(factors, f_inner))

  def cuts(sigmas, sparse, count, layout: _Layout, leaves):
    """{block: (kept triplets, kept entries)} of the step ``count``'s cut
    (``cut_schedule.CutSchedule``), budgets relative to the model's parameter count
    (every leaf at full size); None when no cut is trained."""
    total = sum(math.prod(jnp.shape(v)) for v in leaves)
    outside = sum(math.prod(jnp.shape(v)) for v, info in zip(leaves, layout.infos)
                  if info is None)
    return schedule.cuts(sigmas, sparse, count, total, outside)

  def cut_of(flat, sparse, kept, layout: _Layout, x):
    """The params with every block at its cut ``kept`` of L + S."""
    leaves = list(x)
    for i, s_mat in sparse.items():
      f = prox.Factors(flat["lr_u"][i], flat["lr_s"][i], flat["lr_v"][i])
      cut = cons.cut_matrix(f, s_mat, *kept[i])
      leaves[i] = st.from_matrix(cut, layout.infos[i]).astype(x[i].dtype)
    return leaves

  def factor_step(updates, state, params, extra_args, grad_fn=None):
    """A consolidation step in factors (``consolidate`` module docstring):
    the inner optimiser steps S_i on P_Omega(G_i) (in the main inner state,
    whose params are then S at the blocks) and (B_i, A_i) on (G_i A_i,
    G_i^T B_i) (in the factors' own state); the update is B' A'^T + S' - X,
    or with cut budgets (alternating) the next step's cut of it minus X.
    With the joint cut loss the params stay L + S and every gradient is
    (1 - w) the one at them plus w the one at the step's cut (``grad_fn``)."""
    layout = layout_of(params, state.sparse)
    tdef = layout.treedef
    unflat = lambda leaves: jax.tree_util.tree_unflatten(tdef, leaves)
    g, x = tdef.flatten_up_to(updates), tdef.flatten_up_to(params)
    fac = tdef.flatten_up_to(state.factored.factors)
    flat = {f: list(tdef.flatten_up_to(getattr(state, f))) for f in PER_BLOCK_FIELDS}
    g_in, p_in, g_fac = list(g), list(x), list(fac)
    sparse = {i: compact.as_dense(flat["sparse"][i], info.matrix_shape).astype(_F32)
              for i, info in enumerate(layout.infos) if info is not None}
    kept = cuts(flat["lr_s"], sparse, state.count, layout, x)
    w = schedule.joint
    if w:  # the gradient at the cut; the leaves outside the blocks mix here
      g_cut = tdef.flatten_up_to(grad_fn(unflat(cut_of(flat, sparse, kept, layout, x))))
      g_in = [gi if info is not None else
              ((1 - w) * jnp.asarray(gi, _F32) + w * jnp.asarray(gc, _F32)).astype(gi.dtype)
              for gi, gc, info in zip(g, g_cut, layout.infos)]
    for i, s_mat in sparse.items():
      info = layout.infos[i]
      grad = st.as_matrix(jnp.asarray(g[i], _F32), info)
      f = prox.Factors(flat["lr_u"][i], flat["lr_s"][i], flat["lr_v"][i])
      if kept is None:
        gb, ga, gs = cons.factor_grads(grad, *fac[i], s_mat)
      elif not w:  # the params are the cut: its gradients, S's on the kept entries
        gb, ga = cons.cut_factor_grads(grad, *fac[i], f, kept[i][0])
        gs = jnp.where(kept[i][1], grad, 0.0)
      else:  # the whole structure's gradients and the cut's, mixed
        gc = st.as_matrix(jnp.asarray(g_cut[i], _F32), info)
        gb, ga, gs = cons.factor_grads(grad, *fac[i], s_mat)
        cb, ca = cons.cut_factor_grads(gc, *fac[i], f, kept[i][0])
        gb, ga = (1 - w) * gb + w * cb, (1 - w) * ga + w * ca
        gs = (1 - w) * gs + w * jnp.where(kept[i][1], gc, 0.0)
      g_fac[i] = (gb, ga)
      g_in[i] = st.from_matrix(gs, info).astype(g[i].dtype)
      p_in[i] = st.from_matrix(s_mat, info).astype(x[i].dtype)
    u, inner_state = inner.update(unflat(g_in), state.inner_state, unflat(p_in), **extra_args)
    fu, f_inner = inner.update(unflat(g_fac), state.factored.inner_state,
                               state.factored.factors, **extra_args)
    if consolidate_factor_lr != 1.0:
      fu = jax.tree.map(lambda t: t * consolidate_factor_lr, fu)
    u, fu = list(tdef.flatten_up_to(u)), tdef.flatten_up_to(fu)
    new_f, new_s, new_x = {}, {}, {}
    for i, s_mat in sparse.items():
      info = layout.infos[i]
      b, a, new_s[i], new_x[i] = cons.factor_apply(*fac[i], s_mat, *fu[i],
                                                   st.as_matrix(jnp.asarray(u[i], _F32), info))
      fac[i] = (b, a)
      new_f[i] = f = cons.svd_of_product(b, a, layout.ranks[i])
      flat["lr_u"][i], flat["lr_s"][i], flat["lr_v"][i] = f.u, f.s, f.v
      cap = layout.caps[i]
      stored = new_s[i] if cap is None else compact.project(new_s[i], cap)[0]
      flat["sparse"][i] = store_sparse(stored, info, flat["sparse"][i])
      flat["rank_rate"][i] = jnp.sum(f.s > 0).astype(_F32) / min(info.matrix_shape)
      flat["density"][i] = prox.density(new_s[i])
    kept = None if w else cuts(flat["lr_s"], new_s, state.count + 1, layout, x)
    for i, x_new in new_x.items():
      if kept is not None:  # the next step's params: its cut of L' + S'
        x_new = cons.cut_matrix(new_f[i], new_s[i], *kept[i])
      u[i] = (st.from_matrix(x_new, layout.infos[i])
              - jnp.asarray(x[i], _F32)).astype(u[i].dtype)
    count = optax.safe_increment(state.count)
    trees = {f: unflat(v) for f, v in flat.items()}
    state = state._replace(count=count, num_rounds=count // jnp.asarray(every_k, jnp.int32),
                           inner_state=inner_state,
                           factored=FactorState(unflat(fac), f_inner), **trees)
    return unflat(u), state

  def admm_coupled(updates, state, params, extra_args):
    layout = layout_of(params, state.sparse)
    pen = penalties(params, state, layout)
    g = layout.treedef.flatten_up_to(updates)
    g = [gi if p is None else (jnp.asarray(gi, _F32) + p).astype(gi.dtype)
         for gi, p in zip(g, pen)]
    g = jax.tree_util.tree_unflatten(layout.treedef, g)
    new_updates, inner_state = inner.update(g, state.inner_state, params, **extra_args)
    u_leaves = layout.treedef.flatten_up_to(new_updates)
    x_leaves = layout.treedef.flatten_up_to(params)
    new_x = [None if inf is None else jnp.asarray(x, _F32) + jnp.asarray(u, _F32)
             for x, u, inf in zip(x_leaves, u_leaves, layout.infos)]
    return finish(new_updates, new_x, inner_state, state, layout)

  def update_decoupled(updates, state, params=None, **extra_args):
    del extra_args
    check_params(params)
    layout = layout_of(params, state.sparse)
    pen = penalties(params, state, layout)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    lr = jnp.asarray(lr, _F32)
    u_leaves = layout.treedef.flatten_up_to(updates)
    u_leaves = [u if p is None else (jnp.asarray(u, _F32) - lr * p).astype(u.dtype)
                for u, p in zip(u_leaves, pen)]
    x_leaves = layout.treedef.flatten_up_to(params)
    new_x = [None if inf is None else jnp.asarray(x, _F32) + jnp.asarray(u, _F32)
             for x, u, inf in zip(x_leaves, u_leaves, layout.infos)]
    new_updates = jax.tree_util.tree_unflatten(layout.treedef, u_leaves)
    return finish(new_updates, new_x, state.inner_state, state, layout)

  update = update_coupled if inner is not None else update_decoupled
  # init is compiled as one program: run eagerly, each of its operations (the
  # initial SVD's, every leaf's zeros) would be dispatched and compiled on its
  # own, which takes many times longer on the first call for a given model.
  return optax.GradientTransformationExtraArgs(jax.jit(init_fn), update)


_DOC_ARGS = """
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


salaad.__doc__ += _DOC_ARGS
salaad_decoupled.__doc__ += _DOC_ARGS
