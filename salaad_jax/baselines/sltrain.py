"""SLTrain: every block is W = (alpha / r) A B + S with S on a fixed random support.

For a block of shape (m, n) (y = x W):

    W = (alpha / r) A B + S,   A: (m, r),  B: (r, n),  S = P_Omega(s)

Omega is a set of nnz = floor(delta m n) positions drawn uniformly without
replacement, once, and never changed; only the nnz values s on Omega train,
together with A and B.  Reference initialisation: B = 0, A Kaiming-uniform
(U(-1/sqrt(m), 1/sqrt(m)), i.e. a = sqrt(5) on fan-in m), s ~ U(-1/sqrt(m),
1/sqrt(m)); reference hyperparameters delta = 0.03, alpha = 32, r = 128 / 256
/ 256 / 512 for 60M / 130M / 350M / 1B.  Embedding, head and norms stay dense.

Storage: Omega is kept as a sorted int32 array of flat (row-major) indices
into the (m, n) matrix, in the non-trainable variable collection 'sparsity'
(`variables['sparsity'][...]['index']`), not as a dense mask and not among the
params, so no optimiser can move it.  It depends only on `seed` and the
layer's path (e.g. 'layers_0/attn/q_proj'), not on the init rng, so the same
support is drawn again for the same (seed, path).
"""

from __future__ import annotations

import functools
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from salaad_jax.baselines import accounting, spec
from salaad_jax.baselines._projection import Projection, symmetric_uniform

COLLECTION = "sparsity"
LAYER_KEYS = frozenset({"lora_a", "lora_b", "sparse_values"})


def support_key(seed: int, path: str) -> jax.Array:
  """The PRNG key of a layer's support: fold_in(key(seed), crc32(path))."""
  return jax.random.fold_in(jax.random.key(seed),
                            zlib.crc32(path.encode()) & 0x7FFFFFFF)


def random_support(key: jax.Array, size: int, nnz: int) -> jax.Array:
  """nnz distinct flat indices in [0, size), sorted, int32."""
  if not 0 < nnz <= size:
    raise ValueError(f"cannot draw {nnz} support positions out of {size}.")
  idx = jax.random.permutation(key, size)[:nnz]
  return jnp.sort(idx).astype(jnp.int32)


def scatter(values: jax.Array, index: jax.Array,
            shape: tuple[int, int]) -> jax.Array:
  """The dense (m, n) matrix with `values` at flat positions `index`, 0 elsewhere."""
  flat = jnp.zeros((shape[0] * shape[1],), values.dtype)
  return flat.at[index].set(values, unique_indices=True).reshape(shape)


class SLTrainDense(Projection):
  """y = x ((alpha / rank) A B + S) (+ bias).

  Parameters 'lora_a' (m, rank), 'lora_b' (rank, n), 'sparse_values' (nnz,);
  constant 'sparsity'/'index' (nnz,) int32.
  """

  rank: int = 128
  alpha: float = 32.0
  density: float = 0.03
  seed: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    m, n, r = x.shape[-1], self.features, self.rank
    self.check_rank(r, m)
    nnz = accounting.kept_count(m * n, self.density)
    path = "/".join(self.scope.path)
    if nnz < 1:
      raise ValueError(
          f"density={self.density} keeps no entry of the ({m}, {n}) block "
          f"'{path}'; raise the density.")
    bound = 1.0 / m ** 0.5
    pd = self.param_dtype
    a = self.param("lora_a", symmetric_uniform(bound), (m, r), pd)
    b = self.param("lora_b", nn.initializers.zeros_init(), (r, n), pd)
    values = self.param("sparse_values", symmetric_uniform(bound), (nnz,), pd)
    index = self.variable(
        COLLECTION, "index",
        lambda: random_support(support_key(self.seed, path), m * n, nnz)).value
    w = kernel({"lora_a": a, "lora_b": b, "sparse_values": values},
               {"index": index}, self.alpha / r)
    x, w = nn.dtypes.promote_dtype(x, w, dtype=self.dtype)
    return self.add_bias(x @ w)


def kernel(layer_params, layer_constants, scale: float) -> jax.Array:
  """W = scale A B + S of one layer, in the parameters' dtype."""
  a, b = layer_params["lora_a"], layer_params["lora_b"]
  return scale * (a @ b) + sparse_part(layer_params, layer_constants)


def sparse_part(layer_params, layer_constants) -> jax.Array:
  """S = P_Omega(s) of one layer as a dense (m, n) matrix."""
  a, b = layer_params["lora_a"], layer_params["lora_b"]
  return scatter(layer_params["sparse_values"], layer_constants["index"],
                 (a.shape[0], b.shape[1]))


def footprint(config, costs: accounting.ByteCosts = accounting.ByteCosts(), *,
              rank: int, density: float) -> accounting.Footprint:
  """P = P_rest + sum_i [(m_i + n_i) r + nnz_i], nnz_i = floor(delta m_i n_i);
  bytes = P_rest b_w + sum_i [(m_i + n_i) r b_w + sparse bytes of nnz_i in
  costs.sparse_format]."""
  blocks = accounting.model_blocks(config)
  parts = [accounting.dense_footprint(blocks.rest, costs.b_w)]
  for m, n in blocks.shapes.values():
    parts.append(accounting.lowrank_footprint(m, n, rank, costs.b_w))
    parts.append(accounting.sparse_footprint(
        m, n, accounting.kept_count(m * n, density), costs))
  return accounting.total(*parts)


def method(rank: int = 128, alpha: float = 32.0, density: float = 0.03,
           seed: int = 0) -> spec.MethodSpec:
  """SLTrain with the reference AdamW; see the module docstring."""
  rank, alpha, density, seed = int(rank), float(alpha), float(density), int(seed)
  scale = alpha / rank
  return spec.MethodSpec(
      name="sltrain",
      hparams={"rank": rank, "alpha": alpha, "density": density, "seed": seed},
      dense_cls=lambda config: functools.partial(
          SLTrainDense, rank=rank, alpha=alpha, density=density, seed=seed),
      optimizer=spec.reference_adamw,
      footprint=functools.partial(footprint, rank=rank, density=density),
      to_dense=lambda variables: spec.dense_params(
          variables["params"], variables[COLLECTION], LAYER_KEYS,
          lambda p, c: kernel(p, c, scale)),
      constant_collections=(COLLECTION,),
  )
