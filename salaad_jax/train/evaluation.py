"""Held-out loss and perplexity of a model."""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import numpy as np

from salaad_jax.train.steps import eval_sums


@functools.lru_cache(maxsize=16)
def _eval_fn(model):
  return jax.jit(functools.partial(eval_sums, model))


def evaluate(model, params, dataset, num_batches: Optional[int],
             place_batch: Optional[Callable] = None) -> dict:
  """Token-weighted mean cross-entropy over ``dataset.eval_batches(num_batches)``.

  Returns ``dict(loss=, perplexity=exp(loss), tokens=)``; ``place_batch`` maps
  a host batch to device arrays (default: the arrays as they are).
  """
  fn = _eval_fn(model)
  total, count = 0.0, 0.0
  for batch in dataset.eval_batches(num_batches):
    if place_batch is not None:
      batch = place_batch(batch)
    loss_sum, n = jax.device_get(fn(params, batch))
    total += float(np.asarray(loss_sum, np.float64))
    count += float(n)
  loss = total / max(count, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}
