"""Evaluation of deployed models on a fixed list of validation batches: the
batches (the first ones of a split, or spread over all of it), the weights
rounded to the dtype their bytes are priced in, the mean loss with its
standard error, and the paired standard error of two evaluations."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


class SpectrumError(ValueError):
  """A user-caused problem (bad budget, workdir, argument); one line of text."""


class _Batches:
  """A fixed list of batches with the ``eval_batches`` interface."""

  def __init__(self, batches):
    self._batches = list(batches)

  def eval_batches(self, num_batches=None):
    return iter(self._batches[:num_batches])


def spread_batches(dataset, num_batches: Optional[int]) -> list:
  """``num_batches`` batches of ``dataset.eval_batches()`` spread evenly over
  the whole split (the first and the last included), or every batch of the
  split for None / 0; a split without a known length (the synthetic
  corpus) gives its first ``num_batches``."""
  total = getattr(dataset, "num_eval_batches", None)
  if total is None:
    return list(dataset.eval_batches(num_batches or None))
  total = total()
  if not num_batches or num_batches >= total:
    return list(dataset.eval_batches())
  wanted = set(np.unique(np.round(np.linspace(0, total - 1, num_batches)).astype(int)).tolist())
  return [b for i, b in enumerate(dataset.eval_batches()) if i in wanted]


def rounded(params, dtype):
  """``params`` with every floating leaf rounded to ``dtype`` (e.g. the bf16
  the deployment bytes are priced in) and back to its own dtype; None:
  ``params`` as they are."""
  if dtype is None:
    return params
  def cast(x):
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      return x
    return jnp.asarray(x).astype(dtype).astype(jnp.asarray(x).dtype)

  return jax.tree.map(cast, params)


class BatchEvaluator:
  """Mean loss and its standard error over a fixed list of validation
  batches, the weights rounded to ``weight_dtype`` first (None: as they are)."""

  def __init__(self, batches, weight_dtype=None):
    self.batches = [jax.device_put(b) for b in batches]
    self.weight_dtype = weight_dtype
    if not self.batches:
      raise SpectrumError("the validation split yields no batch")

  def __call__(self, model, params) -> dict[str, Any]:
    from salaad_jax.train import evaluate  # pylint: disable=import-outside-toplevel
    params = rounded(params, self.weight_dtype)
    per = [evaluate(model, params, _Batches([b]), None) for b in self.batches]
    losses = np.array([r["loss"] for r in per], np.float64)
    tokens = np.array([r["tokens"] for r in per], np.float64)
    loss = float(np.sum(losses * tokens) / max(np.sum(tokens), 1.0))
    se = float(np.std(losses, ddof=1) / math.sqrt(losses.size)) if losses.size > 1 else None
    return dict(loss=loss, loss_se=se, perplexity=math.exp(min(loss, 700.0)),
                tokens=int(np.sum(tokens)), batch_losses=[float(x) for x in losses])


def paired_se(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
  """std_b(loss_b^a - loss_b^b) / sqrt(B): the standard error of the
  difference of two rows' losses, evaluated on the same B batches."""
  x, y = np.asarray(a["batch_losses"]), np.asarray(b["batch_losses"])
  if x.shape != y.shape or x.size < 2:
    raise ValueError("paired_se needs two rows evaluated on the same >= 2 batches")
  return float(np.std(x - y, ddof=1) / math.sqrt(x.size))
