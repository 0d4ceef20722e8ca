"""Forward time of a deployed model against the dense model.

The deployed model is an artifact in its runtime form (``export.runtime_model``:
indices decoded once by ``models.runtime.prepare`` with a ``product``, then
``Llama(config, dense_cls=structured_dense(layouts))``); the dense model is
``Llama(config)`` with its weights stored in the same dtype.  Each is
applied jitted to one batch of tokens of shape (batch, seq), all logits (the
prefill of ``benchmarks.inference``), and the two are timed in the same
rounds (``models.timing``: one untimed warm-up call each, then ``repeats``
rounds of one call of each):

    forward_ms        the deployed model's median time over the rounds
    forward_vs_dense  the median over rounds of its time / the dense
                      model's time in that round (< 1: faster than dense)
    dense_forward_ms  the dense model's median time over the same rounds

Wall-clock numbers of the device it runs on: they compare within one
process, not across machines.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from salaad_jax.models import timing
from salaad_jax.models.runtime import PRODUCTS

DEFAULT_BATCH = 8
DEFAULT_SEQ = 256


@dataclasses.dataclass(frozen=True)
class ForwardTiming:
  """How a forward is timed.

  Attributes:
    batch, seq: the token batch's shape; None: the evaluation batch's (the
      spectrum) or ``DEFAULT_BATCH`` x min(``DEFAULT_SEQ``, max_len) (an
      artifact).
    repeats: timed rounds after the warm-up.
    warmup: untimed calls of each model first (the first one compiles).
    product: the runtime form of the structured blocks, one of
      ``models.runtime.PRODUCTS`` ('adaptive', 'ell', 'coo', 'dense',
      'auto').
  """

  batch: Optional[int] = None
  seq: Optional[int] = None
  repeats: int = 5
  warmup: int = 1
  product: str = "adaptive"

  def __post_init__(self):
    for name in ("batch", "seq"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
        raise ValueError(f"forward timing: {name} must be a positive integer or None, got {v!r}")
    if self.repeats < 1 or self.warmup < 1:
      raise ValueError(f"forward timing: repeats and warmup must be >= 1, got {self.repeats}, "
                       f"{self.warmup}")
    if self.product not in PRODUCTS:
      raise ValueError(f"forward timing: product must be one of {PRODUCTS}, got "
                       f"{self.product!r}")

  def tokens(self, vocab_size: int, max_len: int, like=None, seed: int = 0):
    """The timed token batch: the first rows of ``like`` (tiled to ``batch``
    rows, cut to ``seq`` columns) or random tokens; int32."""
    if like is not None:
      like = np.asarray(like, np.int32)
      batch, seq = self.batch or like.shape[0], self.seq or like.shape[1]
      rows = np.resize(like, (batch, like.shape[1]))
      if seq <= like.shape[1]:
        return jnp.asarray(rows[:, :seq])
    else:
      batch, seq = self.batch or DEFAULT_BATCH, self.seq or min(DEFAULT_SEQ, max_len)
    if seq > max_len:
      raise ValueError(f"forward timing: seq {seq} exceeds the model's max_len {max_len}")
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, vocab_size, (batch, seq)), jnp.int32)

  def setup(self, tokens) -> dict[str, Any]:
    """What a measurement was: product, token shape, rounds, device."""
    return dict(product=self.product, batch=int(tokens.shape[0]), seq=int(tokens.shape[1]),
                repeats=self.repeats, warmup=self.warmup, device=jax.devices()[0].device_kind,
                backend=jax.default_backend())


def stored_as(params, dtype):
  """``params`` with every floating leaf cast to ``dtype`` (the dense model
  as stored at b_w bytes a value)."""
  dt = jnp.dtype(dtype)
  return jax.tree.map(lambda x: jnp.asarray(x, dt) if jnp.issubdtype(jnp.asarray(x).dtype,
                                                                      jnp.floating)
                      else x, params)


def _forward(model, params, tokens):
  apply = jax.jit(model.apply)
  variables = {"params": params}
  return lambda: apply(variables, tokens)


class ForwardTimer:
  """Times models against one dense reference on one token batch.

  ``dense_model``/``dense_params``: the reference (``stored_as`` the
  deployment dtype); ``tokens``: the batch (``ForwardTiming.tokens``).
  """

  def __init__(self, dense_model, dense_params, tokens, settings: ForwardTiming):
    self.settings, self.tokens = settings, tokens
    self._dense = _forward(dense_model, dense_params, tokens)

  def setup(self) -> dict[str, Any]:
    return self.settings.setup(self.tokens)

  def dense(self) -> dict[str, float]:
    """The reference alone: forward_ms, forward_vs_dense = 1, dense_forward_ms."""
    (t,) = timing.time_rounds([self._dense], self.settings.repeats, self.settings.warmup)
    ms = timing.median_ms(t)
    return dict(forward_ms=ms, forward_vs_dense=1.0, dense_forward_ms=ms)

  def __call__(self, model, params) -> dict[str, float]:
    """forward_ms, forward_vs_dense and dense_forward_ms of ``model``
    applying ``params``, timed in the same rounds as the reference."""
    ref, t = timing.time_rounds([self._dense, _forward(model, params, self.tokens)],
                                self.settings.repeats, self.settings.warmup)
    return dict(forward_ms=timing.median_ms(t), forward_vs_dense=timing.median_ratio(t, ref),
                dense_forward_ms=timing.median_ms(ref))
