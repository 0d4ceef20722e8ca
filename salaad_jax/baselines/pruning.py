"""Pruning masks for fine-tuning baselines (boolean, True = kept).

Kernels are (m, n) = (in, out) with y = x W, so an output row of the
PyTorch (out, in) weight is a column here.

    magnitude:  keep the size - floor(s size) entries of largest |W|
    Wanda:      score_ij = |W_ij| ||x_i||_2 (x_i: input feature i over the
                calibration tokens); in every output channel j keep the
                m - floor(s m) inputs of largest score.

Ties are broken by position, so the kept count is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from salaad_jax.baselines.accounting import kept_count


def top_mask(scores: jax.Array, keep: int, axis: int | None = None) -> jax.Array:
  """True at the `keep` largest scores (over everything, or along `axis`
  independently for every other index)."""
  s = jnp.asarray(scores, jnp.float32)
  flat = axis is None
  if flat:
    s = s.reshape(-1)
    axis = 0
  order = jnp.argsort(-s, axis=axis, stable=True)
  ranks = jnp.argsort(order, axis=axis)
  mask = ranks < keep
  return mask.reshape(jnp.shape(scores)) if flat else mask


def magnitude_mask(w: jax.Array, sparsity: float) -> jax.Array:
  """Unstructured magnitude pruning of the whole matrix to `sparsity`."""
  size = int(jnp.size(w))
  return top_mask(jnp.abs(w), size - kept_count(size, sparsity))


def wanda_scores(w: jax.Array, input_sq_norm: jax.Array) -> jax.Array:
  """|W_ij| ||x_i||_2 for an (in, out) kernel; `input_sq_norm` (in,) holds
  sum over tokens of x_i^2."""
  norm = jnp.sqrt(jnp.asarray(input_sq_norm, jnp.float32))
  return jnp.abs(jnp.asarray(w, jnp.float32)) * norm[:, None]


def wanda_mask(w: jax.Array, input_sq_norm: jax.Array,
               sparsity: float) -> jax.Array:
  """Wanda pruning of an (in, out) kernel: per output channel (column) keep
  in - floor(s in) inputs of largest |W_ij| ||x_i||."""
  m = int(jnp.shape(w)[0])
  return top_mask(wanda_scores(w, input_sq_norm), m - kept_count(m, sparsity),
                  axis=0)
