"""The reference base optimiser (SALAAD.md §7): learning-rate schedule, then
clip-by-global-norm and AdamW."""

from __future__ import annotations

import optax

from salaad_jax.train.config import TrainConfig


def make_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then either a cosine
  decay to ``min_lr_ratio * lr`` at ``steps`` or a constant ``lr``.

  ``config.lr`` may be a traced value (a compiled program's input: see
  ``salaad_jax.train.programs``): the schedule is optax's
  ``warmup_cosine_decay_schedule`` written with the ratio itself as the
  cosine's floor, which needs no Python test of the peak value."""
  warm = optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1)
                               if config.schedule == "constant" else config.warmup_steps)
  if config.schedule == "constant":
    rest = optax.constant_schedule(config.lr)
  else:
    decay_steps = max(config.steps, config.warmup_steps + 1) - config.warmup_steps
    rest = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.min_lr_ratio)
  return optax.join_schedules([warm, rest], [config.warmup_steps])


def base_optimizer(config: TrainConfig, schedule: optax.Schedule,
                   weight_decay_mask=None) -> optax.GradientTransformation:
  """``clip_by_global_norm(clip_norm)`` (when > 0) followed by AdamW."""
  adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay, mask=weight_decay_mask)
  if config.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
  return adamw
