"""Proximal operators against NumPy / exact-SVD oracles and properties."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, strategies as hst

from salaad_jax import prox

FLOATS = hst.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32)


def matrices(min_side=2, max_side=12):
  """Float32 matrices with sides in [min_side, max_side], of a few shapes: the
  corners (square, wide, tall) and one odd shape in between.  The operators
  run op by op, and every new shape compiles each op again, so the values
  vary from example to example and the shapes come from this small set."""
  mid = (min_side + max_side) // 2
  shapes = [(min_side, min_side), (min_side, max_side), (max_side, min_side),
            (mid | 1, mid - 1), (max_side, max_side)]
  return hst.sampled_from(shapes).flatmap(
      lambda s: hnp.arrays(np.float32, s, elements=FLOATS))


@given(matrices(), hst.floats(0, 5))
def test_soft_threshold_matches_numpy_and_is_prox(z, tau):
  out = np.asarray(prox.soft_threshold(z, tau))
  ref = np.sign(z) * np.maximum(np.abs(z) - np.float32(tau), 0)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # Prox optimality: out minimises tau*|s| + 0.5 (s - z)^2 entrywise.
  def obj(s):
    return tau * np.abs(s) + 0.5 * (s - z) ** 2
  for delta in (1e-2, -1e-2):
    assert np.all(obj(out) <= obj(out + delta) + 1e-5)


def test_soft_threshold_keeps_dtype_and_uses_float32():
  z = jnp.asarray([0.3, -1.5, 2.0], jnp.bfloat16)
  out = prox.soft_threshold(z, 0.5)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), [0.0, -1.0, 1.5], atol=1e-2)


@given(matrices(), hst.floats(0.01, 1.0))
def test_hard_topk_keeps_exactly_k_largest(z, frac):
  out = np.asarray(prox.hard_topk(z, frac))
  k = int(np.ceil(frac * z.size - 1e-6))
  kept = out != 0
  assert kept.sum() <= k
  assert kept.sum() == min(k, int((z != 0).sum()))
  np.testing.assert_array_equal(out[kept], z[kept])
  if kept.any() and (~kept).any():
    assert np.abs(z[~kept]).max() <= np.abs(z[kept]).min()
  thr = float(prox.topk_threshold(z, frac))
  assert np.isclose(thr, np.sort(np.abs(z).ravel())[::-1][k - 1])


@given(matrices(), hst.floats(0, 3), hst.sampled_from([0, 1]))
def test_group_soft_threshold_matches_numpy(z, tau, axis):
  out = np.asarray(prox.group_soft_threshold(z, tau, axis=axis))
  norms = np.linalg.norm(z, axis=axis, keepdims=True)
  scale = np.maximum(1 - tau / np.maximum(norms, 1e-30), 0)
  np.testing.assert_allclose(out, z * scale, rtol=1e-5, atol=1e-5)


@given(hnp.arrays(np.float32, (8, 3), elements=FLOATS))
def test_n_m_mask_keeps_n_of_every_m_along_input_axis(z):
  mask = np.asarray(prox.n_m_mask(z, 2, 4, axis=0))
  groups = mask.reshape(2, 4, 3)
  np.testing.assert_array_equal(groups.sum(axis=1), 2)
  zg = np.abs(z).reshape(2, 4, 3)
  kept_min = np.where(groups, zg, np.inf).min(axis=1)
  dropped_max = np.where(groups, -np.inf, zg).max(axis=1)
  assert np.all(kept_min >= dropped_max)


def test_n_m_mask_errors():
  with pytest.raises(ValueError, match="multiple of M"):
    prox.n_m_mask(jnp.ones((6, 2)), 2, 4)
  with pytest.raises(ValueError, match="0 < N <= M"):
    prox.n_m_mask(jnp.ones((8, 2)), 5, 4)


@given(hnp.arrays(np.float32, hst.sampled_from([1, 2, 7, 16, 30]),
                  elements=hst.floats(0, 10, allow_subnormal=False, width=32)),
       hst.floats(0.5, 1.0))
# The float32 running sum of these squares ends more than 4 ulps below their sum.
@example(np.array([9.0] + [1.9014835] * 29, np.float32), 1.0)
def test_effective_rank_matches_definition(sig, e):
  sig = np.sort(np.where(sig < 1e-6, 0, sig))[::-1]  # float32 squares of tinier underflow
  k = int(prox.effective_rank(sig, e))
  s2 = sig.astype(np.float64) ** 2
  if s2.sum() == 0:
    assert k == 0
    return
  c = np.cumsum(s2)
  ref = int(np.argmax(c >= e * s2.sum() * (1 - 1e-6))) + 1
  assert abs(k - ref) <= 1 and 1 <= k <= len(sig)
  # Energy condition holds at k up to float32 rounding.
  assert c[k - 1] >= e * s2.sum() * (1 - 1e-5)


def test_density():
  assert float(prox.density(jnp.array([[0.0, 1.0], [2.0, 0.0]]))) == 0.5


@given(matrices(3, 10), hst.floats(0, 3))
def test_svt_exact_is_the_nuclear_prox(z, tau):
  f = prox.svt_exact(z, tau)
  l = np.asarray(prox.dense(f))
  u, s, vt = np.linalg.svd(z.astype(np.float64), full_matrices=False)
  ref = (u * np.maximum(s - tau, 0)) @ vt
  np.testing.assert_allclose(l, ref, atol=2e-4 * max(1.0, np.abs(z).max()))


def _low_rank_plus_noise(m, n, r, noise, seed):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(m, r)))
  v, _ = np.linalg.qr(rng.normal(size=(n, r)))
  s = np.linspace(10, 2, r)
  return ((u * s) @ v.T + noise * rng.normal(size=(m, n))).astype(np.float32)


@pytest.mark.parametrize("m,n", [(64, 40), (40, 64)])
def test_fast_svt_agrees_with_exact_on_retained_spectrum(m, n):
  z = _low_rank_plus_noise(m, n, 6, 0.01, 0)
  r = 12
  tau = 1.0
  exact = prox.svt_exact(z, tau, r)
  v0 = prox.random_basis(jax.random.key(0), n, r)
  fast = prox.svt_subspace(z, tau, v0, num_iters=4)
  np.testing.assert_allclose(np.asarray(fast.s[:6]), np.asarray(exact.s[:6]), rtol=1e-4)
  assert np.all(np.asarray(fast.s[6:]) == 0) and np.all(np.asarray(exact.s[6:]) == 0)
  np.testing.assert_allclose(prox.dense(fast), prox.dense(exact), atol=1e-3)


def test_warm_started_single_iteration_tracks_a_drifting_matrix():
  z = _low_rank_plus_noise(80, 60, 5, 0.01, 1)
  rng = np.random.default_rng(2)
  f = prox.svt_exact(z, 0.0, 10)
  for _ in range(5):
    z = z + 0.01 * rng.normal(size=z.shape).astype(np.float32)
    f = prox.svt_subspace(z, 0.5, f.v, num_iters=1)
    ref = prox.svt_exact(z, 0.5, 10)
    np.testing.assert_allclose(np.asarray(f.s[:5]), np.asarray(ref.s[:5]), rtol=1e-3)


def test_orthonormalize_handles_rank_deficient_input():
  rng = np.random.default_rng(0)
  y = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 8))  # rank 3 of 8 columns
  q = np.asarray(prox.orthonormalize(jnp.asarray(y, jnp.float32)))
  assert np.all(np.isfinite(q))
  # The column space of y is inside span(q).
  proj = q @ np.linalg.pinv(q) @ y
  np.testing.assert_allclose(proj, y, atol=1e-3 * np.abs(y).max())
  # Full-rank input: orthonormal to working precision.
  q2 = np.asarray(prox.orthonormalize(jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)))
  np.testing.assert_allclose(q2.T @ q2, np.eye(8), atol=1e-5)


def test_svt_is_vmappable_over_blocks():
  zs = jnp.stack([_low_rank_plus_noise(20, 16, 3, 0.0, s) for s in range(4)])
  fs = jax.vmap(lambda z: prox.svt_exact(z, 0.5, 8))(zs)
  for i in range(4):
    np.testing.assert_allclose(fs.s[i], prox.svt_exact(zs[i], 0.5, 8).s, rtol=1e-5)
