"""Quality guard: the fast SVT path trains like the exact (full SVD) path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import salaad_jax as sj
from salaad_jax import data, models

pytestmark = pytest.mark.slow


@functools.cache
def _setup(svt: str):
  """(initial params, transform, jitted step) of a run with ``svt``:
  built once per path, so the two exact runs share one compiled step."""
  cfg = models.get_config("tiny", dtype=jnp.float32, max_len=32)
  model = models.Llama(cfg)
  params = models.init_params(cfg, jax.random.key(0), seq=32)
  base = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, b2=0.95))
  tx = sj.salaad(base, every_k=5, rho=1.0, rank_target=0.15, density_target=0.05,
                 k_alpha=0.2, k_beta=0.02, svt=svt, alpha_init="sigma_k",
                 max_rank=32 if svt == "fast" else None)

  @jax.jit
  def step(p, s, b):
    def loss_fn(p):
      return models.cross_entropy_loss(model.apply({"params": p}, b["inputs"]), b["targets"])[0]
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  return params, tx, step


def _train(svt: str, steps: int = 120, data_seed: int = 0):
  params, tx, step = _setup(svt)
  state = tx.init(params)
  ds = data.make_dataset("synthetic", seq_len=32, batch_size=8, seed=data_seed)
  losses = []
  for _ in range(steps):
    b = next(ds)
    params, state, loss = step(params, state, {k: jnp.asarray(b[k]) for k in ("inputs", "targets")})
    losses.append(float(loss))
  return np.array(losses), state


def _spectrum_gap(fa, fb):
  """Mean over blocks of the relative l2 gap of the top retained spectra."""
  gaps = []
  for path in fa:
    k = max(1, min(int(jnp.sum(fa[path].s > 0)), int(jnp.sum(fb[path].s > 0))))
    a, b = np.asarray(fa[path].s[:k]), np.asarray(fb[path].s[:k])
    gaps.append(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
  return float(np.mean(gaps))


def test_fast_svt_matches_exact_training_curve_and_spectrum():
  """Fast and exact SVT runs agree within the run-to-run noise of the exact
  path itself (measured by changing the data order)."""
  loss_exact, st_exact = _train("exact")
  loss_fast, st_fast = _train("fast")
  loss_noise, st_noise = _train("exact", data_seed=1)
  # Loss curves: same trajectory within noise (window means within 2%).
  w = 20
  me = loss_exact.reshape(-1, w).mean(1)
  mf = loss_fast.reshape(-1, w).mean(1)
  np.testing.assert_allclose(mf, me, rtol=0.02)
  assert me[-1] < me[0] - 0.5  # it actually learned
  fe, ff = sj.low_rank_factors(st_exact), sj.low_rank_factors(st_fast)
  noise = _spectrum_gap(fe, sj.low_rank_factors(st_noise))
  assert _spectrum_gap(fe, ff) <= max(1.5 * noise, 0.02), (_spectrum_gap(fe, ff), noise)
  fn = sj.low_rank_factors(st_noise)
  rank = lambda f: np.array([int(jnp.sum(f[p].s > 0)) for p in sorted(f)])
  assert rank(fe).max() < 32  # the fast path's rank bound did not bind
  rank_gap = np.abs(rank(ff) - rank(fe)).mean()
  rank_noise = np.abs(rank(fn) - rank(fe)).mean()
  assert rank_gap <= 1.5 * rank_noise + 1.0, (rank_gap, rank_noise)
  me_, mf_ = sj.block_metrics(st_exact), sj.block_metrics(st_fast)
  for path in fe:
    assert abs(float(me_[path]["density"]) - float(mf_[path]["density"])) < 0.02
