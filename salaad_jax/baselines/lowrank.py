"""Plain low-rank factorised training: every block is W = A B at a fixed rank.

For a block of shape (m, n) (m input, n output features; y = x W) the layer
keeps A: (m, r) and B: (r, n) and computes y = (x A) B, two thin matmuls; the
(m, n) matrix is never formed.  In the PyTorch (out, in) convention this is
W^T = B^T A^T, the usual "W = B A".

Initialisation ("spectral"): draw the dense kernel W0 from the model's own
`kernel_init`, take its best rank-r approximation W0 ~ U_r diag(sigma_r) V_r^T
and split it evenly, A = U_r diag(sqrt(sigma_r)), B = diag(sqrt(sigma_r)) V_r^T,
so A B is the closest rank-r matrix to a legitimate dense init and both
factors have the same scale.  Embedding, head and norms stay dense.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from salaad_jax import prox
from salaad_jax.baselines import accounting, spec
from salaad_jax.baselines._projection import Projection, precomputed

LAYER_KEYS = frozenset({"lowrank_a", "lowrank_b"})


def balanced_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """(A, B) with A B the best rank-r approximation of w (float32).

  A = U_r diag(sqrt(sigma_r)) (m, r), B = diag(sqrt(sigma_r)) V_r^T (r, n).
  """
  f = prox.svd_exact(w, rank)
  root = jnp.sqrt(f.s)
  return f.u * root, (f.v * root).T


class LowRankDense(Projection):
  """y = (x A) B (+ bias), A: (m, rank), B: (rank, features).

  Parameters: 'lowrank_a', 'lowrank_b' (and 'bias').
  """

  rank: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    m = x.shape[-1]
    self.check_rank(self.rank, m)
    factors = None
    if self.is_initializing():
      w0 = self.kernel_init(self.make_rng("params"), (m, self.features),
                            self.param_dtype)
      factors = balanced_factors(w0, self.rank)
    a0, b0 = factors if factors is not None else (None, None)
    pd, r = self.param_dtype, self.rank
    a = self.param("lowrank_a", precomputed(a0, (m, r), pd))
    b = self.param("lowrank_b", precomputed(b0, (r, self.features), pd))
    x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=self.dtype)
    return self.add_bias((x @ a) @ b)


def kernel(layer_params) -> jax.Array:
  """The dense kernel W = A B of one layer (float32)."""
  a = jnp.asarray(layer_params["lowrank_a"], jnp.float32)
  return a @ jnp.asarray(layer_params["lowrank_b"], jnp.float32)


def footprint(config, costs: accounting.ByteCosts = accounting.ByteCosts(), *,
              rank: int) -> accounting.Footprint:
  """P = P_rest + sum_i (m_i + n_i) r; bytes = P b_w."""
  blocks = accounting.model_blocks(config)
  return accounting.total(
      accounting.dense_footprint(blocks.rest, costs.b_w),
      *(accounting.lowrank_footprint(m, n, rank, costs.b_w)
        for m, n in blocks.shapes.values()))


def method(rank: int = 128) -> spec.MethodSpec:
  """Low-rank training at a global rank (trained with the reference AdamW)."""
  rank = int(rank)
  return spec.MethodSpec(
      name="lowrank",
      hparams={"rank": rank},
      dense_cls=lambda config: functools.partial(LowRankDense, rank=rank),
      optimizer=spec.reference_adamw,
      footprint=functools.partial(footprint, rank=rank),
      to_dense=lambda variables: spec.dense_params(
          variables["params"], None, LAYER_KEYS, lambda p, _: kernel(p)),
  )
