"""The ADMM phase of SALAAD (SALAAD.md §2, §4, §5): the initial state of the
blocks, the penalty rho_i (X_i - L_i - S_i + U_i) that couples the params to
L + S, and every K steps one round per block (``block.round_block``),
vmapped over the blocks of one shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from salaad_jax import block as blk
from salaad_jax import compact
from salaad_jax import opt_state
from salaad_jax import prox
from salaad_jax import schedules as sched
from salaad_jax import structure as st
from salaad_jax.hparams import _BlockHparams
from salaad_jax.layout import Layout, groups, work_units
from salaad_jax.options import Options

_F32 = jnp.float32


def stack_hparams(hps: list[_BlockHparams]) -> _BlockHparams:
  return _BlockHparams(*(jnp.stack([jnp.asarray(v, _F32) for v in vals])
                         for vals in zip(*hps)))


def _storage_dtype(x, dtype):
  return jnp.dtype(x.dtype) if dtype is None else jnp.dtype(dtype)


def init_fields(leaves: list, layout: Layout, opts: Options) -> dict[str, list]:
  """The per-block fields at step 0 (SALAAD.md §5): L_0 a truncated SVD of
  X_0, S = U = 0, alpha_0 by ``alpha_init``, beta_0 = ``beta_init``."""
  fields = {k: [opt_state.placeholder() for _ in leaves] for k in opt_state.PER_BLOCK_FIELDS}
  key = jax.random.key(opts.seed)
  for idx in groups(layout):
    xs = jnp.stack([st.as_matrix(jnp.asarray(leaves[i], _F32), layout.infos[i]) for i in idx])
    hps = stack_hparams([layout.hparams[i] for i in idx])
    keys = jax.random.split(jax.random.fold_in(key, idx[0]), len(idx))
    init_one = lambda x, k, r_t, rho: blk.init_block(x, k, r_t, rho, layout.ranks[idx[0]],
                                                     opts.static)
    f, alpha0, rate0 = jax.vmap(init_one)(xs, keys, hps.rank_target, hps.rho)
    for j, i in enumerate(idx):
      fields["lr_u"][i], fields["lr_s"][i], fields["lr_v"][i] = f.u[j], f.s[j], f.v[j]
      info, cap = layout.infos[i], layout.caps[i]
      dt = _storage_dtype(leaves[i], opts.state_dtype)
      fields["sparse"][i] = jnp.zeros(info.shape, dt) if cap is None else compact.empty(cap, dt)
      fields["dual"][i] = jnp.zeros(info.shape, _storage_dtype(leaves[i], opts.dual_dtype))
      fields["alpha"][i] = alpha0[j]
      fields["beta"][i] = jnp.asarray(opts.beta_init, _F32)
      fields["rank_rate"][i] = rate0[j]
      fields["density"][i] = jnp.zeros((), _F32)
  return fields


def rho_scale(opts: Options, n):
  """m(n), the rho multiplier of round n (1 without a rho schedule)."""
  if opts.rho_schedule is None:
    return jnp.ones((), _F32)
  return jnp.asarray(opts.rho_schedule(n), _F32)


def scheduled(hps: _BlockHparams, num_rounds, opts: Options):
  """The round's hyperparameters (rho_i m(n), loosened targets) and the
  dual rescaling m(n) / m(n + 1)."""
  now, nxt = rho_scale(opts, num_rounds), rho_scale(opts, num_rounds + 1)
  hps = hps._replace(rho=hps.rho * now)
  if opts.target_schedule is not None:
    w = jnp.asarray(opts.target_schedule(num_rounds), _F32)
    hps = hps._replace(rank_target=sched.loosen(hps.rank_target, w),
                       density_target=sched.loosen(hps.density_target, w))
  return hps, now / nxt


def penalties(state, params, layout: Layout, opts: Options) -> list:
  """Per leaf the float32 rho_i m(n) (X_i - L_i - S_i + U_i) of a block, None
  elsewhere (S stored either way)."""
  fields = opt_state.fields_of(state, layout.treedef)
  x = layout.flatten(params)
  scale = rho_scale(opts, state.count // jnp.asarray(opts.every_k, jnp.int32))
  out = [None] * len(x)
  for i in layout.blocks:
    info = layout.infos[i]
    f = prox.Factors(fields["lr_u"][i], fields["lr_s"][i], fields["lr_v"][i])
    l_dense = st.from_matrix(prox.dense(f), info)
    rho = jnp.asarray(layout.hparams[i].rho, _F32) * scale
    out[i] = rho * (jnp.asarray(x[i], _F32) - l_dense
                    - compact.as_dense(fields["sparse"][i], info.shape)
                    + jnp.asarray(fields["dual"][i], _F32))
  return out


def new_params(params, updates, layout: Layout) -> list:
  """X + u in float32 at the blocks (None elsewhere)."""
  return [None if info is None else jnp.asarray(x, _F32) + jnp.asarray(u, _F32)
          for x, u, info in zip(layout.flatten(params), layout.flatten(updates), layout.infos)]


def round_group(blocks: opt_state.Blocks, xs, hps: _BlockHparams, num_rounds, cap,
                opts: Options) -> opt_state.Blocks:
  """One ADMM round of a group of blocks at the new X ``xs`` (g, m, n)."""
  hps, dual_scale = scheduled(hps, num_rounds, opts)

  def one(x, b: opt_state.Blocks, h):
    f, s, dual, alpha, beta, rate, dens = blk.round_block(
        x, b.factors, b.sparse, b.dual, b.alpha, b.beta, b.rank_rate, b.density, num_rounds,
        h, opts.deriv_start, opts.static, dual_scale, cap)
    return opt_state.Blocks(f, s, dual, alpha, beta, rate, dens)

  return jax.vmap(one)(xs, blocks, hps)


def rounds(fields: dict, new_x: list, count, layout: Layout, opts: Options) -> dict:
  """``fields`` after the step taken from ``count`` steps: every work unit
  whose round is due runs it (each under its own ``lax.cond``, on its own
  blocks' fields)."""
  k = jnp.asarray(opts.every_k, jnp.int32)
  step = count + 1  # the step's number
  for idx, offset in work_units(layout, opts):
    num_rounds = (step + offset) // k - 1  # rounds this unit has done before

    def run(sub, idx=idx, n=num_rounds):
      infos, local = [layout.infos[i] for i in idx], list(range(len(idx)))
      xs = jnp.stack([st.as_matrix(new_x[i], inf) for i, inf in zip(idx, infos)])
      hps = stack_hparams([layout.hparams[i] for i in idx])
      blocks = round_group(opt_state.gather(sub, local, infos), xs, hps, n,
                           layout.caps[idx[0]], opts)
      return opt_state.scatter(sub, local, infos, blocks)

    sub = jax.lax.cond(((step + offset) % k) == 0, run, lambda s: s,
                       opt_state.select(fields, idx))
    fields = opt_state.put(fields, idx, sub)
  return fields
