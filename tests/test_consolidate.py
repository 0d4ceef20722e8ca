"""consolidate: the matrix math of consolidation (the first projection, the
truncation nested dropout trains, the SVD of a product of factors, the global
cut and the cut's factor gradients), against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st_

from helpers import cut_oracle, cut_prefixes
from salaad_jax import consolidate as cons
from salaad_jax import prox


def test_first_projection_is_the_truncated_svd_and_top_residual():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(20, 12)), jnp.float32)
  f0 = prox.svd_exact(x + 0.1, 12)
  g, s, x_proj = cons.project_block(x, f0, jnp.zeros_like(x), jnp.asarray(True), 0.25, 0.1,
                                    "target", 1, True)
  u, sig, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  l_ref = (u[:, :3] * sig[:3]) @ vt[:3]
  np.testing.assert_allclose(np.asarray(prox.dense(g)), l_ref, atol=1e-4)
  rest = np.asarray(x) - l_ref
  keep = np.abs(rest) >= np.sort(np.abs(rest).ravel())[::-1][23]  # ceil(0.1 * 240) = 24
  np.testing.assert_allclose(np.asarray(s), np.where(keep, rest, 0.0), atol=1e-4)
  np.testing.assert_allclose(np.asarray(x_proj), l_ref + np.where(keep, rest, 0.0), atol=1e-4)


def test_truncation_drops_trailing_triplets_and_smallest_entries():
  rng = np.random.default_rng(3)
  f = prox.svd_exact(jnp.asarray(rng.normal(size=(10, 8)), jnp.float32), 8)
  f = prox.Factors(f.u, jnp.where(jnp.arange(8) < 5, f.s, 0.0), f.v)
  s = jnp.asarray(np.where(rng.random((10, 8)) < 0.2, rng.normal(size=(10, 8)), 0.0), jnp.float32)
  nnz = int(np.sum(np.asarray(s) != 0))
  got = np.asarray(cons.truncated(f, s, 0.4))
  l3 = np.asarray(prox.dense(prox.Factors(f.u, jnp.where(jnp.arange(8) < 3, f.s, 0.0), f.v)))
  keep = int(np.ceil(0.6 * nnz))
  thr = np.sort(np.abs(np.asarray(s)).ravel())[::-1][keep - 1]
  np.testing.assert_allclose(got, l3 + np.where(np.abs(np.asarray(s)) >= thr, s, 0.0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(cons.truncated(f, s, 0.0)),
                             np.asarray(prox.dense(f) + s), atol=1e-5)


def test_product_svd_matches_numpy():
  rng = np.random.default_rng(7)
  b, a = rng.normal(size=(12, 3)), rng.normal(size=(9, 3))
  f = cons.svd_of_product(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32), 5)
  assert f.u.shape == (12, 5) and f.s.shape == (5,) and f.v.shape == (9, 5)
  np.testing.assert_allclose(np.asarray(f.s)[:3], np.linalg.svd(b @ a.T, compute_uv=False)[:3],
                             rtol=1e-5)
  assert not np.any(np.asarray(f.s)[3:])
  np.testing.assert_allclose(np.asarray(prox.dense(f)), b @ a.T, atol=1e-4)


def _cut_problem(seed):
  """(sigmas, sparses) of three blocks: 80 % of the triplets and 30 % of the
  entries live."""
  rng = np.random.default_rng(seed)
  shapes = [(4, 8), (4, 4), (8, 8)]  # m n overhead: whole parameters
  sigmas = [np.sort(np.where(rng.random(min(s)) < 0.8, rng.gamma(2.0, size=min(s)), 0.0))[::-1]
            for s in shapes]
  sparses = [np.where(rng.random(s) < 0.3, rng.normal(size=s), 0.0) for s in shapes]
  return sigmas, sparses


# The cut compiled once per overhead and form of the budget (a share or a
# count): called op by op, its bisection loop compiles anew at every call.
_global_cut = jax.jit(cons.global_cut, static_argnames=("overhead",))


def _kept_items(got) -> set:
  """``global_cut``'s masks as ``cut_oracle``'s items."""
  items = set()
  for i, (kt, ks) in enumerate(got):
    items |= {(i, "t", int(j)) for j in np.flatnonzero(np.asarray(kt))}
    items |= {(i, "e", int(j)) for j in np.flatnonzero(np.asarray(ks).ravel())}
  return items


@settings(max_examples=30, deadline=None)
@given(st_.integers(0, 10_000), st_.floats(0.0, 1.0), st_.booleans(),
       st_.sampled_from([0.0, 1 / 16, 1 / 4]))
def test_global_cut_keeps_the_best_gain_per_cost_within_the_share(seed, drop, by_count,
                                                                  overhead):
  sigmas, sparses = _cut_problem(seed)
  # by_count: the budget as a parameter count (up to past the total) instead of a share
  keep = float(np.floor(drop * 160)) if by_count else None
  got = _global_cut([jnp.asarray(x, jnp.float32) for x in sigmas],
                    [jnp.asarray(x, jnp.float32) for x in sparses], drop, keep=keep,
                    overhead=overhead)
  want = cut_oracle(sigmas, sparses, drop, keep, overhead)
  if keep is None:
    # A share's budget (1 - drop) x total is rounded to float32 in the cut:
    # within 1e-5 of a boundary of the greedy's running cost (drop 1e-6, say)
    # it may fall either side of it, so such draws are not a test of the cut.
    # A count is exact, its exact fits included (and the next test checks
    # every one of them).
    near = [cut_oracle(sigmas, sparses, min(max(drop + e, 0.0), 1.0), None, overhead)
            for e in (-1e-5, 1e-5)]
    assume(near[0] == near[1] == want)
  for i, (kt, ks) in enumerate(got):
    kt, ks = np.asarray(kt), np.asarray(ks).ravel()
    assert {j for j in range(kt.size) if kt[j]} == {j for (b, k, j) in want if b == i and k == "t"}
    assert {j for j in range(ks.size) if ks[j]} == {j for (b, k, j) in want if b == i and k == "e"}
    # a prefix of the triplets (sigma descending)
    assert not np.any(kt[1:] & ~kt[:-1])


@pytest.mark.parametrize("seed, overhead", [(0, 0.0), (1, 1 / 16), (2, 1 / 4)])
def test_global_cut_keeps_the_item_that_fits_its_budget_exactly(seed, overhead):
  """At a count equal to the running cost of the first k items of the
  greedy's order the cut keeps those k (the k-th fits with nothing to spare),
  one parameter less keeps k - 1; a share of 0 drops nothing, of 1 all."""
  sigmas, sparses = _cut_problem(seed)
  sigmas32 = [jnp.asarray(x, jnp.float32) for x in sigmas]
  sparses32 = [jnp.asarray(x, jnp.float32) for x in sparses]
  cut = jax.jit(lambda keep: cons.global_cut(sigmas32, sparses32, keep=keep, overhead=overhead))
  prefixes = cut_prefixes(sigmas, sparses, overhead)
  assert len(prefixes) > 20 and len({len(kept) for _, kept in prefixes}) == len(prefixes)
  before = set()
  for cost, kept in prefixes:
    assert _kept_items(cut(jnp.float32(cost))) == kept, cost
    assert _kept_items(cut(jnp.float32(cost - 1))) == before, cost - 1
    before = kept
  everything = _global_cut(sigmas32, sparses32, 0.0, overhead=overhead)
  assert _kept_items(everything) == prefixes[-1][1]
  assert not _kept_items(_global_cut(sigmas32, sparses32, 1.0, overhead=overhead))


def test_cut_factor_grads_are_the_cut_models_and_plain_uncut():
  rng = np.random.default_rng(3)
  b, a, g = rng.normal(size=(10, 4)), rng.normal(size=(8, 4)), rng.normal(size=(10, 8))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  f = cons.svd_of_product(f32(b), f32(a), 6)
  everything = jnp.ones(6, bool)
  gb, ga = cons.cut_factor_grads(f32(g), f32(b), f32(a), f, everything)
  np.testing.assert_allclose(gb, g @ a, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ga, g.T @ b, rtol=1e-4, atol=1e-4)
  kept = jnp.arange(6) < 2
  gb, ga = cons.cut_factor_grads(f32(g), f32(b), f32(a), f, kept)
  u, sig, vt = np.linalg.svd(b @ a.T)
  l2 = (u[:, :2] * sig[:2]) @ vt[:2]
  m = np.linalg.pinv(b) @ l2 @ np.linalg.pinv(a).T  # B M A^T = the top-2 triplets
  np.testing.assert_allclose(b @ m @ a.T, l2, atol=1e-8)
  np.testing.assert_allclose(gb, g @ a @ m.T, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(ga, g.T @ b @ m, rtol=1e-3, atol=1e-4)
