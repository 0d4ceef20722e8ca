"""GaLore: dense model, Adam moments kept in a low-rank gradient subspace.

Uses `optax.contrib.galore`.  For each block gradient G (m, n) GaLore keeps a
projector P from the top-r singular vectors of G, refreshed every
`update_proj_gap` steps (on the side m >= n: P = U_r (m, r), R = P^T G;
otherwise P = V_r, R = G P), runs Adam on R, and applies
scale * P Adam(R) (resp. Adam(R) P^T) to the full weight.  Non-block leaves
(embedding, head, norms) get plain Adam.  Reference settings: rank 128 / 256 /
256 / 512 for 60M / 130M / 350M / 1B, update_proj_gap 200, scale 0.25, only
attention and MLP projections projected.

The model is the ordinary dense Llama; only the optimiser changes, so the
trained parameter count and deployment bytes are those of the dense model.
"""

from __future__ import annotations

import functools

import jax
import optax
from optax.contrib import GaLoreDimensionNumbers

from salaad_jax import structure
from salaad_jax.baselines import dense, spec


def projected_leaves(params, structure_arg: structure.Structure = None):
  """A params-shaped tree: GaLoreDimensionNumbers(0, 1) on the block kernels
  ((in, out) kernels: rows are the reduction axis), None elsewhere."""
  pred = structure.make_predicate(structure_arg)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: (GaLoreDimensionNumbers(0, 1)
                          if pred(structure.path_str(path), leaf) else None),
      params)


def galore_optimizer(learning_rate: optax.ScalarOrSchedule, *, rank: int = 128,
                     update_proj_gap: int = 200, scale: float = 0.25,
                     b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                     weight_decay: float = 0.0,
                     clip_norm: float | None = 1.0,
                     blocks: structure.Structure = None
                     ) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm) then optax.contrib.galore with Adam(b1, b2,
  eps) inside the subspace; `blocks` selects the projected leaves (regex or
  predicate on the parameter path; default: every 2-D kernel but the head)."""
  tx = optax.contrib.galore(
      learning_rate, rank=int(rank), update_proj_gap=int(update_proj_gap),
      scale=scale, base_optimizer=optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      weight_decay=weight_decay,
      weight_dimension_numbers=functools.partial(projected_leaves,
                                                 structure_arg=blocks))
  if clip_norm is None:
    return tx
  return optax.chain(optax.clip_by_global_norm(clip_norm), tx)


def method(rank: int = 128, update_proj_gap: int = 200,
           scale: float = 0.25) -> spec.MethodSpec:
  """GaLore on the dense Llama."""
  hparams = {"rank": int(rank), "update_proj_gap": int(update_proj_gap),
             "scale": float(scale)}
  base = dense.method()
  return spec.MethodSpec(
      name="galore",
      hparams=hparams,
      dense_cls=base.dense_cls,
      optimizer=lambda learning_rate, **kw: galore_optimizer(
          learning_rate, **{**hparams, **kw}),
      footprint=base.footprint,
      to_dense=base.to_dense,
  )
