"""The adaptive threshold controller (SALAAD.md §4), as pure functions.

After each L (resp. S) update a block's rank rate gamma_L (resp. density d_S)
is measured and its penalty weight moves by an integral law

    w <- w + rho * k * (rate - target)
         [ + rho * k_d * max(0, rate - rate_prev)   once n >= n_d ]

so that, with the threshold being w / rho, the controller integrates the
tracking error directly on the threshold.  Unlike the reference, weights are
clamped at zero.
"""

from __future__ import annotations

import jax.numpy as jnp

MODES = ("adaptive", "fixed", "hard_cut")


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"controller mode must be one of {MODES}, got {mode!r}")
  return mode


def integral_update(weight, rate, prev_rate, target, rho, gain, deriv_gain,
                    num_updates, deriv_start):
  """One step of the clamped integral (+ one-sided derivative) law.

  Args:
    weight: current alpha or beta (float32 scalar or array).
    rate: measured rank rate or density after the update.
    prev_rate: the measurement of the previous round.
    target: r* or d*.
    rho: the block's ADMM penalty.
    gain: k_alpha or k_beta.
    deriv_gain: k_d.
    num_updates: controller updates so far (n, before this one).
    deriv_start: n_d; the derivative term acts once n >= n_d.
  Returns the new weight, >= 0.
  """
  f32 = jnp.float32
  rho = jnp.asarray(rho, f32)
  step = rho * jnp.asarray(gain, f32) * (jnp.asarray(rate, f32) - jnp.asarray(target, f32))
  rise = jnp.maximum(0.0, jnp.asarray(rate, f32) - jnp.asarray(prev_rate, f32))
  deriv = jnp.where(jnp.asarray(num_updates) >= deriv_start,
                    rho * jnp.asarray(deriv_gain, f32) * rise, 0.0)
  return jnp.maximum(jnp.asarray(weight, f32) + step + deriv, 0.0)


def next_weight(mode, weight, rate, prev_rate, target, rho, gain, deriv_gain,
                num_updates, deriv_start):
  """Dispatches on the (static) controller mode.  'fixed' keeps the weight."""
  if mode == "fixed":
    return jnp.asarray(weight, jnp.float32)
  return integral_update(weight, rate, prev_rate, target, rho, gain, deriv_gain,
                         num_updates, deriv_start)
