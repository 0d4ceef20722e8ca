"""LOST: an SVD-initialised low-rank part plus a channel-wise sparse complement.

Reading of the method implemented here.  For a block of shape (m, n)
(y = x W; the n columns are the output channels):

  1. Draw a dense W0 from the model's own `kernel_init` and take its SVD,
     W0 = U diag(sigma) V^T.
  2. Low-rank part from the top r singular triplets,
     L0 = U_r diag(sigma_r) V_r^T, stored as balanced factors
     A = U_r diag(sqrt(sigma_r)) (m, r), B = diag(sqrt(sigma_r)) V_r^T (r, n).
  3. The complement C = W0 - L0 (the remaining singular directions,
     sum_{j>r} sigma_j u_j v_j^T) is pruned channel-wise: keep the
     k = floor(delta n) columns of largest norm ||C[:, j]||_2 and drop the
     rest.  S0 = C on those columns, 0 elsewhere.  Hence L0 + S0 = W0 on the
     kept channels and L0 elsewhere.
  4. Train A, B and the kept columns' values; the channel set is fixed.

    W = A B + S,   S[:, J] = V (m, k),  S[:, not J] = 0

The kept channel ids J are a sorted int32 array in the non-trainable
collection 'sparsity' (`variables['sparsity'][...]['columns']`).  The forward
pass never forms W: y = (x A) B, then y[..., J] += x V.  Deployment stores S
as k dense columns plus k column ids (`column_sparse_footprint`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from salaad_jax.baselines import accounting, spec
from salaad_jax.baselines._projection import Projection, precomputed
from salaad_jax.baselines.lowrank import balanced_factors

COLLECTION = "sparsity"
LAYER_KEYS = frozenset({"lowrank_a", "lowrank_b", "sparse_columns"})


class LostInit(NamedTuple):
  """Initial LOST parts of one block (float32)."""

  a: jax.Array        # (m, r)
  b: jax.Array        # (r, n)
  values: jax.Array   # (m, k): the kept columns of the complement
  columns: jax.Array  # (k,) int32, sorted


def decompose(w0: jax.Array, rank: int, num_columns: int) -> LostInit:
  """Splits w0 into balanced rank-r factors and the top-k columns of
  the complement W0 - L0 by l2 norm (see the module docstring)."""
  w0 = jnp.asarray(w0, jnp.float32)
  a, b = balanced_factors(w0, rank)
  complement = w0 - a @ b
  norms = jnp.sum(complement * complement, axis=0)
  _, top = jax.lax.top_k(norms, num_columns)
  columns = jnp.sort(top).astype(jnp.int32)
  return LostInit(a, b, complement[:, columns], columns)


def scatter_columns(values: jax.Array, columns: jax.Array,
                    n: int) -> jax.Array:
  """The (m, n) matrix with `values` (m, k) in `columns`, 0 elsewhere."""
  out = jnp.zeros((values.shape[0], n), values.dtype)
  return out.at[:, columns].set(values, unique_indices=True)


class LostDense(Projection):
  """y = (x A) B + x S (+ bias) with S non-zero on k fixed columns.

  Parameters 'lowrank_a' (m, rank), 'lowrank_b' (rank, n), 'sparse_columns'
  (m, k); constant 'sparsity'/'columns' (k,) int32.
  """

  rank: int = 128
  density: float = 0.03

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    m, n = x.shape[-1], self.features
    self.check_rank(self.rank, m)
    k = accounting.kept_count(n, self.density)
    if k < 1:
      raise ValueError(
          f"density={self.density} keeps no column of the ({m}, {n}) block "
          f"'{'/'.join(self.scope.path)}'; raise the density.")
    init = LostInit(None, None, None, None)
    if self.is_initializing():
      w0 = self.kernel_init(self.make_rng("params"), (m, n), self.param_dtype)
      init = decompose(w0, self.rank, k)
    pd, r = self.param_dtype, self.rank
    a = self.param("lowrank_a", precomputed(init.a, (m, r), pd))
    b = self.param("lowrank_b", precomputed(init.b, (r, n), pd))
    values = self.param("sparse_columns", precomputed(init.values, (m, k), pd))
    columns = self.variable(COLLECTION, "columns",
                            precomputed(init.columns, (k,), jnp.int32),
                            None).value
    x, a, b, values = nn.dtypes.promote_dtype(x, a, b, values,
                                              dtype=self.dtype)
    y = (x @ a) @ b
    y = y.at[..., columns].add(x @ values, unique_indices=True)
    return self.add_bias(y)


def kernel(layer_params, layer_constants) -> jax.Array:
  """W = A B + S of one layer (float32)."""
  a = jnp.asarray(layer_params["lowrank_a"], jnp.float32)
  b = jnp.asarray(layer_params["lowrank_b"], jnp.float32)
  return a @ b + sparse_part(layer_params, layer_constants)


def sparse_part(layer_params, layer_constants) -> jax.Array:
  """S of one layer as a dense (m, n) float32 matrix."""
  values = jnp.asarray(layer_params["sparse_columns"], jnp.float32)
  n = layer_params["lowrank_b"].shape[1]
  return scatter_columns(values, layer_constants["columns"], n)


def footprint(config, costs: accounting.ByteCosts = accounting.ByteCosts(), *,
              rank: int, density: float) -> accounting.Footprint:
  """P = P_rest + sum_i [(m_i + n_i) r + m_i k_i], k_i = floor(delta n_i);
  bytes = P b_w + sum_i k_i b_idx (one id per kept column)."""
  blocks = accounting.model_blocks(config)
  parts = [accounting.dense_footprint(blocks.rest, costs.b_w)]
  for m, n in blocks.shapes.values():
    parts.append(accounting.lowrank_footprint(m, n, rank, costs.b_w))
    parts.append(accounting.column_sparse_footprint(
        m, accounting.kept_count(n, density), costs.b_w, costs.b_idx))
  return accounting.total(*parts)


def method(rank: int = 128, density: float = 0.03) -> spec.MethodSpec:
  """LOST with the reference AdamW; see the module docstring."""
  rank, density = int(rank), float(density)
  return spec.MethodSpec(
      name="lost",
      hparams={"rank": rank, "density": density},
      dense_cls=lambda config: functools.partial(
          LostDense, rank=rank, density=density),
      optimizer=spec.reference_adamw,
      footprint=functools.partial(footprint, rank=rank, density=density),
      to_dense=lambda variables: spec.dense_params(
          variables["params"], variables[COLLECTION], LAYER_KEYS, kernel),
      constant_collections=(COLLECTION,),
  )
