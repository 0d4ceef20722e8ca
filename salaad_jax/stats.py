"""Public read-outs of a SALAAD optimizer state, for logging and deployment.

All functions accept either a ``SalaadState`` or any optimizer state that
contains one (e.g. inside ``optax.chain`` or ``optax.inject_hyperparams``),
and return dicts keyed by the '/'-joined parameter path of each block.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from salaad_jax import compact
from salaad_jax import prox
from salaad_jax import structure as st
from salaad_jax.opt_state import SalaadState, is_placeholder

_F32 = jnp.float32


def find_state(opt_state: Any) -> SalaadState:
  """The (first) SalaadState inside an optimizer state."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SalaadState))
           if isinstance(x, SalaadState)]
  if not found:
    raise ValueError("no SALAAD state found in this optimizer state; was the "
                     "optimizer built with salaad_jax.salaad / salaad_decoupled?")
  return found[0]


def _blocks(state: SalaadState):
  """[(path, index-free accessor dict)] for every block leaf; ``sparse`` is S
  dense in the parameter's shape (the shape of the dual U) whichever way the
  state stores it."""
  out = []
  fields = ("lr_u", "lr_s", "lr_v", "sparse", "dual", "alpha", "beta", "rank_rate", "density")
  flat_with_path, treedef = jax.tree_util.tree_flatten_with_path(state.lr_u)
  per_field = {f: treedef.flatten_up_to(getattr(state, f)) for f in fields}
  for i, (path, u) in enumerate(flat_with_path):
    if is_placeholder(u):
      continue
    b = {f: per_field[f][i] for f in fields}
    if isinstance(b["sparse"], compact.CompactSparse):
      b["sparse"] = compact.densify(b["sparse"], b["dual"].shape, b["sparse"].values.dtype)
    out.append((st.path_str(path), b))
  return out


def block_paths(opt_state) -> list[str]:
  """Parameter paths of the blocks, in tree order."""
  return [p for p, _ in _blocks(find_state(opt_state))]


def block_metrics(opt_state) -> dict[str, dict[str, jax.Array]]:
  """Per block: rank_rate (gamma_L), density (d_S), alpha, beta and the
  factored rank (nonzero singular values of L)."""
  out = {}
  for path, b in _blocks(find_state(opt_state)):
    out[path] = dict(rank_rate=b["rank_rate"], density=b["density"],
                     alpha=b["alpha"], beta=b["beta"],
                     rank=jnp.sum(b["lr_s"] > 0).astype(jnp.int32))
  return out


def low_rank_factors(opt_state) -> dict[str, prox.Factors]:
  """L of each block as Factors(u (m, r), s (r,), v (n, r)) of its matrix view."""
  return {p: prox.Factors(b["lr_u"], b["lr_s"], b["lr_v"])
          for p, b in _blocks(find_state(opt_state))}


def sparse_parts(opt_state) -> dict[str, jax.Array]:
  """S of each block, in the parameter's shape."""
  return {p: b["sparse"] for p, b in _blocks(find_state(opt_state))}


def surrogate_blocks(opt_state) -> dict[str, jax.Array]:
  """X_hat = L + S of each block, in the parameter's shape (float32)."""
  out = {}
  for p, b in _blocks(find_state(opt_state)):
    l = prox.dense(prox.Factors(b["lr_u"], b["lr_s"], b["lr_v"]))
    out[p] = l.reshape(b["sparse"].shape) + jnp.asarray(b["sparse"], _F32)
  return out


def surrogate_params(params, opt_state):
  """``params`` with every block replaced by X_hat = L + S (in its dtype)."""
  hats = surrogate_blocks(opt_state)

  def swap(path, x):
    h = hats.get(st.path_str(path))
    return x if h is None else h.astype(x.dtype)

  return jax.tree_util.tree_map_with_path(swap, params)


def primal_residual(params, opt_state) -> dict[str, jax.Array]:
  """||X - L - S||_F / ||X||_F per block; where X = 0 (a block its step's cut
  drops whole, training in factors) ||L + S|| / ||L + S||: 1, or 0 when L + S
  is 0 too."""
  hats = surrogate_blocks(opt_state)
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    p = st.path_str(path)
    if p in hats:
      xf = jnp.asarray(x, _F32)
      x_norm = jnp.linalg.norm(xf)
      scale = jnp.where(x_norm > 0, x_norm, jnp.linalg.norm(hats[p]))
      out[p] = jnp.linalg.norm(xf - hats[p]) / jnp.maximum(scale, 1e-30)
  return out


def summary(params, opt_state) -> dict[str, jax.Array]:
  """Means over blocks of rank_rate, density, alpha, beta and primal residual."""
  m = block_metrics(opt_state)
  if not m:
    return {}
  res = primal_residual(params, opt_state)
  out = {k: jnp.mean(jnp.stack([jnp.asarray(v[k], _F32) for v in m.values()]))
         for k in ("rank_rate", "density", "alpha", "beta")}
  out["primal_residual"] = jnp.mean(jnp.stack(list(res.values())))
  return out
