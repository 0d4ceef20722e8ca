r"""What the global cut of consolidation with cut budgets costs per call.

    python -m benchmarks.cut_time --models=tiny,small,60m --repeats=20

``consolidate.global_cut`` (bisection on the ratios' float32 bit patterns: 32
masked sums) against the baseline it replaced, the same cut by one stable sort
of every item and a running sum (``sorted_cut`` below), on random singular
values and sparse parts of every block of each model (r* 0.12, d* 0.08, the
tiny recommended preset's structure), at a budget of 40 % of the structure's
parameters.  Both are jit-compiled; the table gives the median wall time per
call over ``--repeats`` calls after one warm-up, and the ratio sorted / bisection
measured in the same run, and checks that both keep the same items.  The
consolidation step computes two cuts per step (the params' cut and the next
one).
"""

from __future__ import annotations

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from salaad_jax import consolidate as cons
from salaad_jax.baselines import accounting
from salaad_jax.models import get_config

_MODELS = flags.DEFINE_list("models", ["tiny", "small", "60m"], "model presets")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed calls per variant", lower_bound=1)
_RANK = flags.DEFINE_float("rank_target", 0.12, "r* of the structure", lower_bound=0.0)
_DENSITY = flags.DEFINE_float("density_target", 0.08, "d* of the structure", lower_bound=0.0)
_KEEP = flags.DEFINE_float("keep", 0.4, "share of the structure's parameters the cut keeps",
                           lower_bound=0.0, upper_bound=1.0)


def sorted_cut(sigmas, sparses, keep):
  """The baseline: every item sorted by gain per cost, the prefix that fits."""
  ratios, costs = [], []
  for sig, sp in zip(sigmas, sparses):
    m, n = sp.shape
    ratios += [jnp.where(sig > 0, sig * sig / (m + n), -1.0), jnp.where(sp != 0, sp * sp, -1.0)
               .ravel()]
    costs += [jnp.where(sig > 0, float(m + n), 0.0), jnp.where(sp != 0, 1.0, 0.0).ravel()]
  ratio, cost = jnp.concatenate(ratios), jnp.concatenate(costs)
  order = jnp.argsort(-ratio, stable=True)
  fits = (jnp.cumsum(cost[order]) <= keep * (1 + 1e-6) + 1e-6) & (ratio[order] >= 0)
  kept = jnp.zeros(ratio.shape, bool).at[order].set(fits)
  out, at = [], 0
  for sig, sp in zip(sigmas, sparses):
    r, k = sig.shape[0], sp.size
    out.append((kept[at:at + r], kept[at + r:at + r + k].reshape(sp.shape)))
    at += r + k
  return out


def _problem(model: str, seed: int = 0):
  blocks = accounting.model_blocks(get_config(model, vocab_size=256, max_len=64))
  rng = np.random.default_rng(seed)
  sigmas, sparses, params = [], [], 0
  for m, n in blocks.shapes.values():
    r = max(1, int(np.ceil(_RANK.value * min(m, n))))
    sig = np.zeros(min(m, n), np.float32)
    sig[:r] = np.sort(rng.gamma(2.0, size=r))[::-1]
    sp = np.where(rng.random((m, n)) < _DENSITY.value, rng.normal(size=(m, n)), 0.0)
    sigmas.append(jnp.asarray(sig))
    sparses.append(jnp.asarray(sp, jnp.float32))
    params += r * (m + n) + int(np.count_nonzero(sp))
  return sigmas, sparses, params


def _median_time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{_REPEATS.value} calls, keep {_KEEP.value:.0%} of the structure")
  print("| model | blocks | structure params | items | sorted (ms) | bisection (ms) | "
        "sorted / bisection | same cut |")
  print("|---|---:|---:|---:|---:|---:|---:|---|")
  for model in _MODELS.value:
    sigmas, sparses, params = _problem(model)
    keep = jnp.float32(_KEEP.value * params)
    new = jax.jit(lambda s, p, k: cons.global_cut(s, p, keep=k))
    old = jax.jit(sorted_cut)
    same = all(bool(jnp.array_equal(a[0], b[0]) and jnp.array_equal(a[1], b[1]))
               for a, b in zip(new(sigmas, sparses, keep), old(sigmas, sparses, keep)))
    t_new, t_old = _median_time(new, sigmas, sparses, keep), _median_time(old, sigmas, sparses, keep)
    items = sum(s.size for s in sigmas) + sum(p.size for p in sparses)
    print(f"| {model} | {len(sigmas)} | {params:,} | {items:,} | {t_old * 1e3:.2f} | "
          f"{t_new * 1e3:.2f} | {t_old / t_new:.1f}x | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
  app.run(main)
