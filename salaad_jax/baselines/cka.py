"""Linear centred kernel alignment (CKA) between representations.

For X (t, p) and Y (t, q) holding the same t samples (tokens) in rows,
centre the columns (Xc = X - mean_rows X) and

    CKA(X, Y) = ||Yc^T Xc||_F^2 / ( ||Xc^T Xc||_F  ||Yc^T Yc||_F )

which lies in [0, 1], equals 1 for Y = X, and is invariant to X -> c X Q
for any orthogonal Q and scalar c != 0 (and likewise for Y).  Computed in
float32 through the feature-space Grams, O(t p q) work and O(p q) memory.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _centred(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32).reshape(-1, jnp.shape(x)[-1])
  return x - jnp.mean(x, axis=0, keepdims=True)


@jax.jit
def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
  """CKA(X, Y) for X (..., p), Y (..., q) with the same leading shape
  (flattened to samples).  Returns 0 when either side is constant."""
  xc, yc = _centred(x), _centred(y)
  if xc.shape[0] != yc.shape[0]:
    raise ValueError(f"CKA needs the same samples on both sides, got "
                     f"{xc.shape[0]} and {yc.shape[0]} rows.")
  # Rescaling does not change CKA and keeps the fourth powers in range.
  xc = xc / jnp.maximum(jnp.linalg.norm(xc), 1e-30)
  yc = yc / jnp.maximum(jnp.linalg.norm(yc), 1e-30)
  cross = jnp.sum(jnp.square(yc.T @ xc))
  norm_x = jnp.linalg.norm(xc.T @ xc)
  norm_y = jnp.linalg.norm(yc.T @ yc)
  denom = norm_x * norm_y
  return jnp.where(denom > 0, cross / jnp.where(denom > 0, denom, 1.0), 0.0)


def cka_matrix(reps: Sequence[jax.Array]) -> jax.Array:
  """The symmetric (L, L) matrix C[i, j] = CKA(reps[i], reps[j]), C[i, i] = 1
  for non-constant reps."""
  count = len(reps)
  rows = [[None] * count for _ in range(count)]
  for i in range(count):
    for j in range(i, count):
      rows[i][j] = rows[j][i] = linear_cka(reps[i], reps[j])
  return jnp.stack([jnp.stack(r) for r in rows])
