"""Evaluation of ``benchmarks.compare``: every trained model and every
deployment measured the same way.

An :class:`Evaluation` is a split, a number of batches spread over it (or
all of it) and the dtype the weights are rounded to (the one the bytes are
priced in).  A trained run's perplexity under it is cached in
``<workdir>/evaluations.json`` (keyed by the evaluation and the run's
step), so a rerun of the command re-evaluates nothing it has; deployments
go through ``deploy.capacity_spectrum`` with the same evaluation.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence

from salaad_jax.deploy import spectrum as sp
from salaad_jax.train.run import load_run

CACHE_FILE = "evaluations.json"


class Evaluation:
  """How models are evaluated: ``split`` on ``batches`` batches spread over
  it (``spread``; 0: the whole split) with weights rounded to
  ``weight_dtype`` (None: as trained)."""

  def __init__(self, split: str, batches: int, spread: bool = True,
               weight_dtype: Optional[str] = None):
    self.split, self.batches, self.spread, self.weight_dtype = split, batches, spread, weight_dtype
    self._evaluators: dict[Any, sp.BatchEvaluator] = {}

  @property
  def key(self) -> str:
    return (f"{self.split}|{self.batches or 'all'}|{'spread' if self.spread else 'first'}|"
            f"{self.weight_dtype or 'as-trained'}")

  def describe(self) -> str:
    where = ("all batches" if not self.batches else
             f"{self.batches} batches {'spread over it' if self.spread else 'from its start'}")
    dtype = f"weights rounded to {self.weight_dtype}" if self.weight_dtype else "weights as trained"
    return f"split `{self.split}`, {where}, {dtype}"

  def evaluator(self, config) -> sp.BatchEvaluator:
    """The evaluator of this evaluation on ``config``'s data (one per data
    and shape settings)."""
    data = (config.source, config.tokenizer, config.seq_len,
            config.eval_batch_size or config.batch_size, config.data_seed)
    if data not in self._evaluators:
      self._evaluators[data] = sp.make_evaluator(config, self.split, self.batches or None,
                                                 spread=self.spread,
                                                 weight_dtype=self.weight_dtype)
    return self._evaluators[data]

  def spectrum_kwargs(self) -> dict:
    """The evaluation as ``capacity_spectrum`` keyword arguments."""
    return dict(eval_split=self.split, eval_batches=self.batches or 10 ** 9,
                eval_spread=self.spread, eval_weight_dtype=self.weight_dtype)


def _read_cache(workdir: str) -> dict:
  path = os.path.join(workdir, CACHE_FILE)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as fh:
      out = json.load(fh)
    return out if isinstance(out, dict) else {}
  except (OSError, json.JSONDecodeError):
    return {}


def _write_cache(workdir: str, cache: dict) -> None:
  path = os.path.join(workdir, CACHE_FILE)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as fh:
    json.dump(cache, fh, indent=1, sort_keys=True)
  os.replace(tmp, path)


def run_perplexity(workdir: str, evaluation: Evaluation, step: int) -> float:
  """The perplexity of the trained run in ``workdir`` (its params as the
  model applies them) under ``evaluation``, cached per step."""
  cache = _read_cache(workdir)
  key = f"{evaluation.key}|step {step}"
  if key not in cache:
    run = load_run(workdir)
    cache[key] = float(evaluation.evaluator(run.config)(run.model, run.params)["perplexity"])
    _write_cache(workdir, cache)
  return cache[key]


def deployments(workdir: str, fractions: Sequence[float], allocations: Sequence[str],
                evaluation: Evaluation, *, unit: str, fmt: str,
                dense_workdir: Optional[str] = None,
                progress: Optional[Callable[[str], None]] = print) -> list[dict[str, Any]]:
  """The SALAAD run of ``workdir`` deployed at ``fractions`` (of the dense
  model in ``unit``) by each of ``allocations``, with the post-hoc split of
  ``dense_workdir`` (global allocation) when given; ``capacity_spectrum``'s
  rows of those series."""
  rows = sp.capacity_spectrum(workdir, list(fractions),
                              methods=tuple(dict.fromkeys(allocations)),
                              dense_workdir=dense_workdir, posthoc=dense_workdir is not None,
                              unit=unit, fmt=fmt, progress=progress,
                              **evaluation.spectrum_kwargs())
  return [r for r in rows if r["source"] in ("salaad", "posthoc")
          and (r["source"] == "salaad" or r["allocation"] == "global")]
