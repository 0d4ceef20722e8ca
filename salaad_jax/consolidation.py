"""The consolidation phases of SALAAD: the projection onto the fixed
structure and training in factors, with cuts (``consolidate`` holds their
matrix math and the method; ``docs/consolidation.md`` the step timeline).

Every function here works on the flattened params (lists over the leaves, a
``layout.Layout`` saying which are blocks) and the per-block fields of the
state (``opt_state.fields_of``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from salaad_jax import compact
from salaad_jax import consolidate as cons
from salaad_jax import opt_state
from salaad_jax import prox
from salaad_jax import structure as st
from salaad_jax.admm import stack_hparams
from salaad_jax.hparams import _concrete_float
from salaad_jax.layout import Layout, groups
from salaad_jax.options import Options

_F32 = jnp.float32


# --------------------------------------------------------------------------
# The projection.
# --------------------------------------------------------------------------


def project_group(blocks: opt_state.Blocks, xs, us, hps, first, drop, cap, opts: Options,
                  idx: list[int]):
  """The projection (``consolidate.project_block``) of a group of blocks at
  the new X ``xs`` (g, m, n); returns their fields and X_next (L + S, or with
  nested dropout its truncation ``consolidate.truncated``).  ``us``: the
  steps X - X_old, needed with nested dropout only (the params then hold a
  truncation: the full L + S is stepped).  With a capacity, S is projected
  onto it (``compact.project``) and X_next uses that S.  ``idx``: the
  blocks' leaf indices (they seed a random support)."""
  c = opts.consolidation
  z = xs
  if c.dropout:
    z = jnp.where(first, xs, jax.vmap(prox.dense)(blocks.factors) + blocks.sparse + us)
  one = lambda x, f, s, r_t, d_t, key: cons.project_block(
      x, f, s, first, r_t, d_t, c.structure, opts.static.svt_iters, opts.static.svt == "exact",
      support_key=key)
  keys = (jnp.stack([cons.support_key(opts.seed, i) for i in idx])
          if c.support == "random" else jnp.full((len(idx),), jnp.nan))
  f, s, x_next = jax.vmap(one)(z, blocks.factors, blocks.sparse, hps.rank_target,
                               hps.density_target, keys)
  dens = jax.vmap(prox.density)(s)  # before the capacity: > cap / (m n) marks an overflow
  stored = s
  if cap is not None:
    stored, s_cap = jax.vmap(compact.project, in_axes=(0, None))(s, cap)
    x_next = x_next + (s_cap - s)  # exactly x_next when the capacity does not bind
    s = s_cap
  if c.dropout:
    x_next = jax.vmap(cons.truncated, in_axes=(0, 0, None))(f, s, drop)
  rank_rate = jnp.sum(f.s > 0, axis=-1).astype(_F32) / min(xs.shape[1:])
  return opt_state.Blocks(f, stored, jnp.zeros_like(blocks.dual), blocks.alpha, blocks.beta,
                          rank_rate, dens), x_next


def project_step(updates, new_x: list, fields: dict, count, layout: Layout, opts: Options):
  """Every block projected onto its fixed structure (chosen at the first
  step), the update becoming X_next - X_old; returns (updates, fields)."""
  first = opts.consolidation.first(count)
  drop = opts.consolidation.dropout * jax.random.uniform(
      jax.random.fold_in(jax.random.key(opts.seed + 1), count + 1))
  u = layout.flatten(updates)
  for idx in groups(layout):
    infos = [layout.infos[i] for i in idx]
    mat = lambda leaves, idx=idx, infos=infos: jnp.stack(
        [compact.as_dense(leaves[i], inf.matrix_shape) for i, inf in zip(idx, infos)])
    xs = mat(new_x)
    hps = stack_hparams([layout.hparams[i] for i in idx])
    blocks, x_next = project_group(opt_state.gather(fields, idx, infos), xs, mat(u), hps,
                                   first, drop, layout.caps[idx[0]], opts, idx)
    fields = opt_state.scatter(fields, idx, infos, blocks)
    for j, (i, inf) in enumerate(zip(idx, infos)):
      delta = st.from_matrix(x_next[j] - xs[j], inf)
      u[i] = (jnp.asarray(u[i], _F32) + delta).astype(u[i].dtype)
  return layout.unflatten(u), fields


# --------------------------------------------------------------------------
# Training in factors.
# --------------------------------------------------------------------------


def factor_width(layout: Layout, i: int, opts: Options) -> int:
  """``consolidate.factor_width`` of block ``i``."""
  r_t = _concrete_float(layout.hparams[i].rank_target)
  if r_t is None and opts.consolidation.structure == "target":
    raise ValueError("consolidate_params='factors' needs a concrete rank_target")
  return cons.factor_width(opts.consolidation.structure, layout.ranks[i], r_t,
                           layout.infos[i].matrix_shape)


def init_factors(layout: Layout, opts: Options):
  """Zero factors (B (m, w), A (n, w)) at each block, the placeholder elsewhere."""
  leaves = [opt_state.placeholder()] * len(layout.infos)
  for i in layout.blocks:
    (m, n), w = layout.infos[i].matrix_shape, factor_width(layout, i, opts)
    leaves[i] = (jnp.zeros((m, w), _F32), jnp.zeros((n, w), _F32))
  return layout.unflatten(leaves)


def balanced_factors(fields: dict, layout: Layout, opts: Options):
  """The factors (B, A) of the projection's L (``consolidate.balanced``)."""
  leaves = [opt_state.placeholder()] * len(layout.infos)
  for i in layout.blocks:
    f = prox.Factors(fields["lr_u"][i], fields["lr_s"][i], fields["lr_v"][i])
    leaves[i] = cons.balanced(f, factor_width(layout, i, opts))
  return layout.unflatten(leaves)


def cuts(fields: dict, sparse: dict, count, x: list, layout: Layout, opts: Options):
  """{block: (kept triplets, kept entries)} of the cut the step taken from
  ``count`` steps trains (``cut_schedule.CutSchedule``), budgets relative to
  the model's parameter count (every leaf at full size); None when no cut is
  trained."""
  total = sum(math.prod(jnp.shape(v)) for v in x)
  outside = sum(math.prod(jnp.shape(v)) for v, info in zip(x, layout.infos) if info is None)
  return opts.consolidation.cuts.cuts(fields["lr_s"], sparse, count, total, outside,
                                      opts.consolidation.first(count))


def cut_params(fields: dict, sparse: dict, kept: dict, x: list, layout: Layout) -> list:
  """The params with every block at its cut ``kept`` of L + S."""
  leaves = list(x)
  for i, s_mat in sparse.items():
    f = prox.Factors(fields["lr_u"][i], fields["lr_s"][i], fields["lr_v"][i])
    cut = cons.cut_matrix(f, s_mat, *kept[i])
    leaves[i] = st.from_matrix(cut, layout.infos[i]).astype(x[i].dtype)
  return leaves


def block_factor_grads(grad, factors, f: prox.Factors, s, kept, w: float, grad_cut=None):
  """(dB, dA, dS) of one block from the dense gradient G (matrix view):
  the whole structure's (``kept`` None); the cut's (S's on the kept entries
  only); or with the joint loss (1 - w) the whole's plus w the cut's, from
  the gradient at the cut ``grad_cut``."""
  if kept is None:
    return cons.factor_grads(grad, *factors, s)
  if not w:  # the params are the cut: its gradients
    gb, ga = cons.cut_factor_grads(grad, *factors, f, kept[0])
    return gb, ga, jnp.where(kept[1], grad, 0.0)
  gb, ga, gs = cons.factor_grads(grad, *factors, s)
  cb, ca = cons.cut_factor_grads(grad_cut, *factors, f, kept[0])
  gs_cut = jnp.where(kept[1], grad_cut, 0.0)
  return (1 - w) * gb + w * cb, (1 - w) * ga + w * ca, (1 - w) * gs + w * gs_cut


def _mix(g, g_cut, w):
  return ((1 - w) * jnp.asarray(g, _F32) + w * jnp.asarray(g_cut, _F32)).astype(g.dtype)


def inner_inputs(g: list, g_cut, x: list, fac: list, fields: dict, sparse: dict, kept,
                 layout: Layout, w: float):
  """What the inner optimiser steps: (gradients, params) of the main inner
  state (S at the blocks, the leaves outside the blocks as they are, their
  gradients mixed with the cut's under the joint loss) and the factors'
  gradients."""
  g_in = [gi if g_cut is None or info is not None else _mix(gi, g_cut[n], w)
          for n, (gi, info) in enumerate(zip(g, layout.infos))]
  p_in, g_fac = list(x), list(fac)
  for i, s_mat in sparse.items():
    info = layout.infos[i]
    mat = lambda leaf, info=info: st.as_matrix(jnp.asarray(leaf, _F32), info)
    f = prox.Factors(fields["lr_u"][i], fields["lr_s"][i], fields["lr_v"][i])
    gb, ga, gs = block_factor_grads(mat(g[i]), fac[i], f, s_mat,
                                    None if kept is None else kept[i], w,
                                    None if g_cut is None else mat(g_cut[i]))
    g_fac[i] = (gb, ga)
    g_in[i] = st.from_matrix(gs, info).astype(g[i].dtype)
    p_in[i] = st.from_matrix(s_mat, info).astype(x[i].dtype)
  return g_in, p_in, g_fac


def apply_factor_steps(fac: list, fields: dict, sparse: dict, u: list, fu: list,
                       layout: Layout):
  """The blocks after the inner optimiser's steps (``consolidate.factor_apply``):
  the factors, the fields (L as the exact SVD of B A^T, S stored) and per
  block (L's factors, S, X = B A^T + S)."""
  fac, fields = list(fac), {k: list(v) for k, v in fields.items()}
  new = {}
  for i, s_mat in sparse.items():
    info, cap = layout.infos[i], layout.caps[i]
    b, a, s_new, x_new = cons.factor_apply(*fac[i], s_mat, *fu[i],
                                           st.as_matrix(jnp.asarray(u[i], _F32), info))
    fac[i] = (b, a)
    f = cons.svd_of_product(b, a, layout.ranks[i])
    fields["lr_u"][i], fields["lr_s"][i], fields["lr_v"][i] = f.u, f.s, f.v
    stored = s_new if cap is None else compact.project(s_new, cap)[0]
    fields["sparse"][i] = opt_state.store_sparse(stored, info, fields["sparse"][i])
    fields["rank_rate"][i] = jnp.sum(f.s > 0).astype(_F32) / min(info.matrix_shape)
    fields["density"][i] = prox.density(s_new)
    new[i] = (f, s_new, x_new)
  return fac, fields, new


def factor_step(updates, state, params, *, layout: Layout, opts: Options, inner, extra_args,
                grad_fn=None):
  """A consolidation step in factors (``consolidate`` module docstring):
  the inner optimiser steps S_i on P_Omega(G_i) (in the main inner state,
  whose params are then S at the blocks) and (B_i, A_i) on (G_i A_i,
  G_i^T B_i) (in the factors' own state); the update is B' A'^T + S' - X,
  or with cut budgets (alternating) the next step's cut of it minus X.
  With the joint cut loss the params stay L + S and every gradient is
  (1 - w) the one at them plus w the one at the step's cut (``grad_fn``)."""
  g, x = layout.flatten(updates), layout.flatten(params)
  fac = layout.flatten(state.factored.factors)
  fields = opt_state.fields_of(state, layout.treedef)
  sparse = {i: compact.as_dense(fields["sparse"][i], layout.infos[i].matrix_shape).astype(_F32)
            for i in layout.blocks}
  kept = cuts(fields, sparse, state.count, x, layout, opts)
  w = opts.consolidation.cuts.joint
  g_cut = None
  if w:  # the gradient at the cut
    g_cut = layout.flatten(grad_fn(layout.unflatten(cut_params(fields, sparse, kept, x,
                                                               layout))))
  g_in, p_in, g_fac = inner_inputs(g, g_cut, x, fac, fields, sparse, kept, layout, w)
  u, inner_state = inner.update(layout.unflatten(g_in), state.inner_state,
                                layout.unflatten(p_in), **extra_args)
  fu, f_inner = inner.update(layout.unflatten(g_fac), state.factored.inner_state,
                             state.factored.factors, **extra_args)
  if opts.consolidation.factor_lr != 1.0:
    fu = jax.tree.map(lambda t: t * opts.consolidation.factor_lr, fu)
  u = layout.flatten(u)
  fac, fields, new = apply_factor_steps(fac, fields, sparse, u, layout.flatten(fu), layout)
  kept = None if w else cuts(fields, {i: s for i, (_, s, _) in new.items()}, state.count + 1,
                             x, layout, opts)
  for i, (f, s_new, x_new) in new.items():
    if kept is not None:  # the next step's params: its cut of L' + S'
      x_new = cons.cut_matrix(f, s_new, *kept[i])
    u[i] = (st.from_matrix(x_new, layout.infos[i]) - jnp.asarray(x[i], _F32)).astype(u[i].dtype)
  state = opt_state.advance(state, layout.treedef, fields, inner_state, opts.every_k)
  return layout.unflatten(u), state._replace(
      factored=opt_state.FactorState(layout.unflatten(fac), f_inner))
