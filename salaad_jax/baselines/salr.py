"""SALR: sparse frozen base, SVD residual adapter, LoRA, one fused GEMM.

For every target kernel W0 (m, n) of a dense pretrained model (y = x W):

  1. Magnitude-prune only the frozen base: M keeps the (1 - s) m n entries
     of largest |W0| (reference s = 0.5); W_s = M * W0.
  2. Recover the pruned residual R = W0 - W_s with a rank-r_res truncated
     SVD, R ~ A_res B_res, A_res = U_r diag(sqrt(sigma_r)),
     B_res = diag(sqrt(sigma_r)) V_r^T.  By Eckart-Young the error is the
     tail mass, ||R - A_res B_res||_F^2 = sum_{j > r_res} sigma_j(R)^2, and
     falls monotonically as r_res grows.  The residual adapter is frozen.
  3. Train LoRA (A, B, scale alpha / r) on top:
         W_eff = W_s + A_res B_res + (alpha / r) A B.
  4. Deploy with the two adapters fused into one concatenated pair,
         A_cat = [A_res | A]  (m, r_res + r),
         B_cat = [B_res ; (alpha / r) B]  (r_res + r, n),
         y = x W_s + (x A_cat) B_cat           (one GEMM pair, not two),
     (in the PyTorch layout: [B_res | B_lora] [A_res ; A_lora]), and W_s
     stored as a bitmap plus packed values (`bitmap`).

Training tree: {'base': pruned params, 'residual': residual adapters,
'adapters': LoRA adapters}; `lora.freeze(tx)` trains only 'adapters'.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from salaad_jax import structure
from salaad_jax.baselines import accounting, bitmap, lora, pruning
from salaad_jax.baselines.lowrank import balanced_factors


def prune_and_recover(w0: jax.Array, sparsity: float, residual_rank: int
                      ) -> tuple[jax.Array, jax.Array, lora.LoraPair]:
  """(W_s, M, residual adapter) of one kernel (steps 1-2 above)."""
  mask = pruning.magnitude_mask(w0, sparsity)
  w_sparse = jnp.where(mask, w0, jnp.zeros_like(w0))
  residual = jnp.asarray(w0, jnp.float32) - jnp.asarray(w_sparse, jnp.float32)
  a, b = balanced_factors(residual, residual_rank)
  return w_sparse, mask, lora.LoraPair(a, b)


def init(params: Mapping, key: jax.Array, *, lora_rank: int,
         residual_rank: int, sparsity: float = 0.5,
         targets: structure.Structure = None) -> dict:
  """The SALR training tree {'base', 'residual', 'adapters'} from dense
  pretrained `params`."""
  leaves = lora.flat(params)
  residual = {}
  for path in lora.target_paths(params, targets):
    leaves[path], _, residual[path] = prune_and_recover(
        leaves[path], sparsity, residual_rank)
  base = lora.nest(leaves)
  return {"base": base, "residual": lora.nest(residual),
          "adapters": lora.init(base, lora_rank, key, targets=targets)}


def effective_params(tree: Mapping, alpha: float) -> dict:
  """W_s + A_res B_res + (alpha / r) A B for every target (step 3); the
  base and residual adapters are behind stop_gradient."""
  base = jax.lax.stop_gradient(tree["base"])
  residual = jax.lax.stop_gradient(tree["residual"])
  # The residual adapter is unscaled: alpha = r_res gives scale 1.
  leaves = lora.flat(base)
  for path, pair in lora.flat(residual).items():
    w = leaves[path]
    leaves[path] = (jnp.asarray(w, jnp.float32) +
                    lora.delta(pair, pair.a.shape[1])).astype(w.dtype)
  return lora.merge(lora.nest(leaves), tree["adapters"], alpha)


def fuse(residual: lora.LoraPair, adapter: lora.LoraPair,
         alpha: float) -> lora.LoraPair:
  """([A_res | A], [B_res ; (alpha / r) B]): both adapters as one pair."""
  scale = alpha / adapter.a.shape[1]
  a = jnp.concatenate([jnp.asarray(residual.a, jnp.float32),
                       jnp.asarray(adapter.a, jnp.float32)], axis=1)
  b = jnp.concatenate([jnp.asarray(residual.b, jnp.float32),
                       scale * jnp.asarray(adapter.b, jnp.float32)], axis=0)
  return lora.LoraPair(a, b)


def fused_apply(x: jax.Array, w_sparse: jax.Array,
                fused: lora.LoraPair) -> jax.Array:
  """y = x W_s + (x A_cat) B_cat."""
  return x @ w_sparse + (x @ fused.a) @ fused.b


def export(tree: Mapping, alpha: float, value_dtype=jnp.bfloat16
           ) -> dict[str, tuple[bitmap.BitmapSparse, lora.LoraPair]]:
  """Deployment form: kernel path -> (bitmap-packed W_s with values in
  `value_dtype`, fused adapter pair)."""
  base = lora.flat(tree["base"])
  adapters = lora.flat(tree["adapters"])
  out = {}
  for path, res in lora.flat(tree["residual"]).items():
    packed = bitmap.pack(np.asarray(base[path], np.float32),
                         value_dtype=value_dtype)
    out[path] = (packed, fuse(res, adapters[path], alpha))
  return out


def footprint(tree: Mapping, costs: accounting.ByteCosts = accounting.ByteCosts()
              ) -> accounting.Footprint:
  """Deployed size: dense non-target leaves, and per target kernel a bitmap
  sparse base (ceil(m n / 8) + nnz b_w) plus the fused pair
  ((m + n)(r_res + r) values)."""
  base = lora.flat(tree["base"])
  adapters = lora.flat(tree["adapters"])
  residual = lora.flat(tree["residual"])
  parts = []
  for path, w in base.items():
    if path not in residual:
      parts.append(accounting.dense_footprint(int(np.size(w)), costs.b_w))
      continue
    m, n = w.shape
    nnz = int(jnp.count_nonzero(w))
    rank = residual[path].a.shape[1] + adapters[path].a.shape[1]
    parts.append(accounting.sparse_footprint(
        m, n, nnz, costs._replace(sparse_format="bitmap")))
    parts.append(accounting.lowrank_footprint(m, n, rank, costs.b_w))
  return accounting.total(*parts)
