"""Schedules of the ADMM round count n for SALAAD's targets and penalty.

Each is a pure function of n (a traced int32 is fine), in the style of
``optax.schedules``; the transform evaluates it inside its update, so the
only state is the round count already in ``SalaadState``.

* A *looseness* schedule w(n) in [0, 1] moves the controller's targets from
  fully loose to their final values:  r*_n = r* + w(n) (1 - r*),
  d*_n = d* + w(n) (1 - d*).  ``cubic_looseness`` is the gradual-magnitude-
  pruning law (Zhu & Gupta 2017, "To prune, or not to prune"; LoSA's s_t in
  SALAAD.md §8): w(n) = (1 - clip((n - n_0) / (n_1 - n_0), 0, 1))^3, so the
  targets tighten fast at first and settle smoothly at r*, d*.
* A *rho multiplier* schedule m(n) > 0 scales every block's rho:
  rho_i(n) = rho_i m(n).  ``tanh_rho_ramp`` is the reference's tanh mode
  (SALAAD.md §4): m(n) = 1 + (f - 1) (1 + tanh(2.944 (n - c) / w)) / 2, a
  smooth step from 1 to f around round c (reference f = 10, c = 2000,
  w = 100).  The transform rescales the scaled dual U by m(n) / m(n + 1)
  whenever rho moves, so Y = rho U is continuous.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

RoundSchedule = Callable[[object], object]


def cubic_looseness(end_round: float, begin_round: float = 0.0) -> RoundSchedule:
  """w(n) = (1 - clip((n - n_0) / (n_1 - n_0), 0, 1))^3: 1 until n_0, 0 from n_1."""
  if not end_round > begin_round >= 0:
    raise ValueError(f"cubic_looseness needs 0 <= begin_round < end_round, got "
                     f"begin_round={begin_round}, end_round={end_round}")

  def schedule(n):
    t = (jnp.asarray(n, jnp.float32) - begin_round) / (end_round - begin_round)
    return (1.0 - jnp.clip(t, 0.0, 1.0)) ** 3

  return schedule


def tanh_rho_ramp(center_round: float, width_rounds: float = 100.0,
                  factor: float = 10.0) -> RoundSchedule:
  """m(n) = 1 + (factor - 1) (1 + tanh(2.944 (n - c) / w)) / 2 (reference: 10, 2000, 100)."""
  if not (width_rounds > 0 and factor > 0):
    raise ValueError(f"tanh_rho_ramp needs width_rounds > 0 and factor > 0, got "
                     f"{width_rounds}, {factor}")

  def schedule(n):
    z = 2.944 * (jnp.asarray(n, jnp.float32) - center_round) / width_rounds
    return 1.0 + (factor - 1.0) * (1.0 + jnp.tanh(z)) / 2.0

  return schedule


def loosen(target, looseness):
  """The target after loosening: target + w (1 - target)."""
  target = jnp.asarray(target, jnp.float32)
  return target + jnp.asarray(looseness, jnp.float32) * (1.0 - target)
