"""Calibration row weights: input second moments of every Dense and Embed.

For a kernel X of shape (in, out) applied as y = x X, the output error of a
replacement X_hat is E||x (X - X_hat)||^2; with the features of x taken as
uncorrelated it is ||diag(d) (X - X_hat)||_F^2 with d_k = sqrt(E[x_k^2]).
An embedding table E (V, d) is a kernel applied to one-hot inputs, so
E[x_v^2] is the frequency of token v.  ``activation_weights`` measures d on
a few batches; ``spectra(..., row_weights=d)`` then ranks triplets and
sparse entries by their weighted error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _moments(model: nn.Module, params, batch) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{param path: (sum of x^2 per input feature, count)} of one batch."""
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Embed)):
      x = args[0]
      if isinstance(module, nn.Embed):
        ids = jnp.asarray(x).reshape(-1)
        sq = jnp.zeros((module.num_embeddings,), jnp.float32).at[ids].add(1.0)
        path = "/".join(module.path + ("embedding",))
        count = jnp.asarray(ids.size, jnp.float32)
      else:
        xf = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
        sq = jnp.sum(xf * xf, axis=0)
        path = "/".join(module.path + ("kernel",))
        count = jnp.asarray(xf.shape[0], jnp.float32)
      prev = found.get(path)
      found[path] = (sq, count) if prev is None else (prev[0] + sq, prev[1] + count)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, batch)
  return found


def activation_weights(model: nn.Module, params, batches: Iterable[Any], *,
                       floor: float = 1e-6) -> dict[str, np.ndarray]:
  """d = sqrt(E[x^2]) per input row of every ``nn.Dense`` kernel and
  ``nn.Embed`` table that ``model`` calls, keyed by parameter path.

  Each batch is passed as ``model.apply({'params': params}, batch)``.  Rows
  never excited get ``floor * max(d)`` so every weight stays positive.
  """
  step = jax.jit(lambda p, b: _moments(model, p, b))
  totals: dict[str, list] = {}
  for batch in batches:
    for path, (sq, count) in step(params, batch).items():
      sq, count = np.asarray(sq, np.float64), float(count)
      if path in totals:
        totals[path][0] += sq
        totals[path][1] += count
      else:
        totals[path] = [sq, count]
  if not totals:
    raise ValueError("activation_weights saw no batch, or the model calls no nn.Dense / "
                     "nn.Embed")
  out = {}
  for path, (sq, count) in totals.items():
    d = np.sqrt(sq / max(count, 1.0))
    out[path] = np.maximum(d, floor * max(float(d.max()), 1e-30))
  return out
