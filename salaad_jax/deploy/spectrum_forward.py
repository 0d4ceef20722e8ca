"""The forward timing of ``deploy.spectrum.capacity_spectrum``
(``time_forward``): every deployment built as the model that serves it
(stored compactly, decoded into its runtime form) and its jitted forward
timed against the dense model in the same rounds (``deploy.forward_time``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from salaad_jax.deploy.allocation import allocate
from salaad_jax.deploy.compress import compress
from salaad_jax.deploy.evaluation import BatchEvaluator, SpectrumError
from salaad_jax.deploy.export import _check_fits, model_for, runtime_model
from salaad_jax.deploy.forward_time import ForwardTimer, ForwardTiming, stored_as
from salaad_jax.deploy.spectra import Blocks

# With forward timing (``time_forward``), every row has these too (None for baselines).
TIME_COLUMNS = ("forward_ms", "forward_vs_dense")


class SpectrumForward:
  """The forward timing of ``capacity_spectrum``: the dense reference (the
  SALAAD run's X stored in ``dtype``) and the deployed models' runtime form."""

  def __init__(self, run, blocks: Blocks, tokens, settings: ForwardTiming, dtype: str):
    self.run, self.settings, self.dtype = run, settings, dtype
    # Blocks the structured Llama cannot hold are refused before any evaluation.
    probe = compress(run.params, blocks, allocate(blocks, blocks.rest_params, "hpa"), "coo",
                     dtype)
    try:
      _check_fits(probe, model_for(run.model_config, probe.layouts, probe.fmt, dtype))
    except ValueError as e:
      raise SpectrumError(f"forward timing: {e} (time_forward=None / --notime_forward times "
                          "nothing)") from None
    self.timer = ForwardTimer(model_for(run.model_config, {}, "dense", dtype),
                              stored_as(run.params, dtype), tokens, settings)

  def describe(self) -> str:
    s = self.timer.setup()
    return (f"forward time: {s['product']} runtime form against dense in {self.dtype}, "
            f"{s['batch']}x{s['seq']} tokens, median of {s['repeats']} rounds after "
            f"{s['warmup']} warm-up, on {s['device']}")

  def dense(self, owner) -> dict[str, Any]:
    """The dense model of ``owner``: the reference itself (the SALAAD run),
    or timed against it."""
    t = (self.timer.dense() if owner is self.run else
         self.timer(model_for(owner.model_config, {}, "dense", self.dtype),
                    stored_as(owner.params, self.dtype)))
    return self._fields(t)

  def deployed(self, owner, blocks: Blocks, alloc) -> dict[str, Any]:
    """The deployment of ``alloc`` in its runtime form, timed against dense."""
    art = compress(owner.params, blocks, alloc, alloc.fmt, self.dtype)
    model, params = runtime_model(owner.model_config, art.params, art.layouts, art.fmt,
                                  art.dtype, self.settings.product)
    return self._fields(self.timer(model, params))

  def _fields(self, t: Mapping[str, float]) -> dict[str, Any]:
    return dict({k: t[k] for k in TIME_COLUMNS}, forward_setup=self.timer.setup())


def forward_of(run, blocks: Blocks, evaluator: BatchEvaluator,
                settings: Optional[ForwardTiming], dtype: str, say) -> Optional[SpectrumForward]:
  """The forward timing of the spectrum (None without ``settings``); its
  tokens: the first evaluation batch's inputs, in ``settings``' shape."""
  if settings is None:
    return None
  if not isinstance(settings, ForwardTiming):
    raise SpectrumError(f"time_forward must be a ForwardTiming or None, got {settings!r}")
  cfg = run.model_config
  try:
    tokens = settings.tokens(cfg.vocab_size, cfg.max_len, like=evaluator.batches[0]["inputs"])
  except ValueError as e:
    raise SpectrumError(str(e)) from None
  forward = SpectrumForward(run, blocks, tokens, settings, dtype)
  say(forward.describe())
  return forward
