"""A one-minute demonstration of the SALAAD transform on a small Flax MLP.

    python -m experiments.demo

Trains a two-layer MLP on a synthetic regression task with
``salaad(clip + AdamW)`` and prints the loss together with each block's rank
rate, density and primal residual as the controller drives them to their
targets.
"""

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import salaad_jax as sj

FLAGS = flags.DEFINE_integer("steps", 600, "training steps")
_RANK = flags.DEFINE_float("rank_target", 0.25, "r*: target rank rate")
_DENS = flags.DEFINE_float("density_target", 0.05, "d*: target density")


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(128)(x))
    return nn.Dense(32)(x)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  # Targets from a teacher whose weights are low rank plus sparse.
  w1 = rng.normal(size=(64, 6)) @ rng.normal(size=(6, 128)) / 8
  w1 += np.where(rng.random(w1.shape) < 0.03, rng.normal(size=w1.shape), 0)
  w2 = rng.normal(size=(128, 4)) @ rng.normal(size=(4, 32)) / 12
  x = rng.normal(size=(2048, 64)).astype(np.float32)
  y = (np.tanh(x @ w1) @ w2).astype(np.float32)
  model = MLP()
  params = model.init(jax.random.key(0), x[:1])["params"]
  tx = sj.salaad(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3)),
                 every_k=5, rho=1e-2, rank_target=_RANK.value,
                 density_target=_DENS.value, k_alpha=1.0, k_beta=0.1)
  state = tx.init(params)

  @jax.jit
  def step(p, s, xb, yb):
    loss, g = jax.value_and_grad(
        lambda p: jnp.mean((model.apply({"params": p}, xb) - yb) ** 2))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  print(f"blocks: {sj.block_paths(state)}")
  for t in range(1, FLAGS.value + 1):
    idx = rng.integers(0, len(x), 128)
    params, state, loss = step(params, state, x[idx], y[idx])
    if t % 100 == 0 or t == 1:
      res = sj.primal_residual(params, state)
      parts = [f"{p.split('/')[0]}: rank {float(m['rank_rate']):.3f} "
               f"dens {float(m['density']):.3f} resid {float(res[p]):.3f}"
               for p, m in sj.block_metrics(state).items()]
      print(f"step {t:5d}  loss {float(loss):.4f}  " + "  ".join(parts), flush=True)
  hat = sj.surrogate_params(params, state)
  mse = lambda p: float(jnp.mean((model.apply({"params": p}, x) - y) ** 2))
  print(f"final loss: dense X {mse(params):.4f}   structured X_hat = L + S {mse(hat):.4f}")


if __name__ == "__main__":
  app.run(main)
