"""``train_and_evaluate``: the pretraining loop.

Per step: next batch -> jitted (or pmapped) train step.  Every ``log_every``
steps the losses of the interval are fetched, checked to be finite, and a
record (loss, perplexity, lr, throughput, the method's metrics) is printed and
written; every ``eval_every`` steps the held-out loss is measured; every
``checkpoint_every`` steps, at the end, and on SIGTERM/SIGINT (or
``stop_after``) a checkpoint (state + data-iterator state) is written.  A
resumed run continues from the latest checkpoint of the workdir and computes
the same steps an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from salaad_jax.train import config as cfg_lib
from salaad_jax.train import metrics as mt
from salaad_jax.train import multihost
from salaad_jax.train.checkpoint import Checkpointer, checkpoint_dir, saved_params
from salaad_jax.train.config import TrainConfig, TrainError
from salaad_jax.train.evaluation import evaluate
from salaad_jax.train.executors import make_executor
from salaad_jax.train.inputs import calibration_dataset, make_eval_dataset, make_train_dataset
from salaad_jax.train.preemption import StopRequest
from salaad_jax.train.state import build, split_constants
from salaad_jax.train.warm_start import calibration_batches, initial_params

class NonFiniteLossError(TrainError):
  """The loss (or the params) became NaN/inf; the run stopped."""


def _say(*args) -> None:
  if jax.process_index() == 0:
    print(*args, flush=True)


def maybe_initialize_distributed(config: TrainConfig) -> None:
  """``jax.distributed.initialize`` once, when ``config.distributed`` (see
  ``salaad_jax.train.multihost``)."""
  multihost.initialize_from_config(config)


def resolve(config: TrainConfig, vocab_size: int) -> TrainConfig:
  """Fills ``vocab_size`` from the tokenizer; checks an explicit one fits it."""
  if config.vocab_size == 0:
    return config.replace(vocab_size=int(vocab_size))
  if config.vocab_size < vocab_size:
    raise TrainError(f"--vocab_size={config.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({vocab_size})")
  return config


def prepare_workdir(workdir: str, config: TrainConfig) -> None:
  """Checks a workdir's saved config against ``config`` and writes config.json.

  Raises TrainError, before writing anything, when the workdir holds a run
  whose computation-shaping settings differ.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise TrainError(f"--workdir={workdir} exists and is not a directory")
  if os.path.exists(cfg_lib.config_path(workdir)):
    diffs = cfg_lib.config_differences(cfg_lib.read_config(workdir), config)
    if diffs:
      shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
      raise TrainError(f"--workdir={workdir} holds a run with a different configuration "
                       f"({shown}); resume it with its own settings or use a new workdir")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    cfg_lib.write_config(workdir, config)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@dataclasses.dataclass
class _Pending:
  """Step metrics not yet fetched from the device."""

  steps: list = dataclasses.field(default_factory=list)
  metrics: list = dataclasses.field(default_factory=list)

  def add(self, step: int, m) -> None:
    self.steps.append(step)
    self.metrics.append(m)

  def fetch(self) -> tuple[list, dict]:
    values = jax.device_get(self.metrics)
    return self.steps, {k: np.asarray([v[k] for v in values], np.float64) for k in values[0]}


def _check_losses(steps, losses, ckpt: Checkpointer, workdir: str) -> None:
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    ckpt.wait()
    raise NonFiniteLossError(
        f"non-finite loss ({losses[bad[0]]}) at step {steps[bad[0]]}; training stopped, the "
        f"last good checkpoint (step {ckpt.latest_step()}) in "
        f"{checkpoint_dir(workdir)} is intact (try a lower --lr)")


class _Trainer:
  """The state of one call of train_and_evaluate (setup, then ``run``)."""

  def __init__(self, config: TrainConfig, workdir: str, devices=None):
    cfg_lib.validate(config)
    maybe_initialize_distributed(config)
    self.workdir = workdir
    self.train_ds = make_train_dataset(config)
    self.eval_ds = make_eval_dataset(config, config.eval_split)
    self.config = config = resolve(config, self.train_ds.vocab_size)
    self.parts = build(config)
    initial = initial_params(config, self.parts.method, self.parts.model_config,
                             calibration_batches(lambda: calibration_dataset(config)),
                             saved_params(checkpoint_dir(workdir))
                             if cfg_lib.starts_pretrained(config) else None)
    self.executor = make_executor(config, self.parts.model, self.parts.method,
                                  devices=devices, initial=initial)
    del initial
    prepare_workdir(workdir, config)
    self.ckpt = Checkpointer(checkpoint_dir(workdir),
                             keep=config.keep_checkpoints, async_save=config.async_checkpoint)
    method = self.parts.method
    self._metrics_fn = None if method.metrics is None else jax.jit(method.metrics)
    self._variants_fn = None if method.eval_params is None else jax.jit(method.eval_params)
    self._finite_fn = jax.jit(_all_finite)

  def restore_or_init(self):
    """(state, step): the newest checkpoint that restores (see
    ``Checkpointer.restore_latest``), else the initial state at step 0."""
    restored = self.ckpt.restore_latest(self.executor.abstract, check=self._set_data_state)
    if restored is None:
      return self.executor.init(), 0
    start, state, _ = restored
    _say(f"resumed from {self.ckpt.directory} at step {start}")
    return self.executor.from_global(state), start

  def _set_data_state(self, data_state: dict) -> None:
    try:
      self.train_ds.set_state(data_state)
    except (ValueError, KeyError) as e:
      raise TrainError(f"data state does not fit --source={self.config.source}: {e}") from None

  # -- pieces of a step ----------------------------------------------------
  def method_metrics(self, state) -> dict:
    if self._metrics_fn is None:
      return {}
    g = self.executor.to_global(state)
    return {k: float(v) for k, v in jax.device_get(self._metrics_fn(g.params, g.opt_state)).items()}

  def train_record(self, step: int, pending: _Pending, state, meter: mt.Throughput) -> dict:
    steps, values = pending.fetch()
    _check_losses(steps, values["loss"], self.ckpt, self.workdir)
    loss = float(np.mean(values["loss"]))
    record = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
              "grad_norm": float(values["grad_norm"][-1]),
              "lr": float(self.parts.schedule(step - 1))}
    floor = getattr(self.train_ds, "loss_floor", None)
    if floor is not None:
      record["loss_floor"] = float(floor)
    record.update(self.method_metrics(state))
    record.update(meter.update(step))
    return record

  def evaluate(self, state) -> dict:
    g = self.executor.to_global(state)
    place = self.executor.put_eval_batch
    n = self.config.eval_batches
    out = evaluate(self.parts.model, g.params, self.eval_ds, n, place)
    if self._variants_fn is not None:
      for name, params in self._variants_fn(g.params, g.opt_state).items():
        res = evaluate(self.parts.model, params, self.eval_ds, n, place)
        out[f"{name}/loss"], out[f"{name}/perplexity"] = res["loss"], res["perplexity"]
    return out

  def save(self, step: int, state, pending: _Pending) -> None:
    if pending.metrics:
      steps, values = pending.fetch()
      _check_losses(steps, values["loss"], self.ckpt, self.workdir)
    g = self.executor.to_global(state)
    if not bool(self._finite_fn(g.params)):
      self.ckpt.wait()
      raise NonFiniteLossError(
          f"non-finite parameters after step {step}; training stopped, the last good "
          f"checkpoint (step {self.ckpt.latest_step()}) in {self.ckpt.directory} is intact")
    self.ckpt.save(step, g, self.train_ds.get_state())

  # -- the loop --------------------------------------------------------------
  def run(self) -> dict:
    c = self.config
    state, step = self.restore_or_init()
    log = mt.MetricsLog(self.workdir, resume_step=step, tensorboard=c.tensorboard,
                        enabled=jax.process_index() == 0)
    floor = getattr(self.train_ds, "loss_floor", None)
    _say(f"{c.method} | model {c.model} ({self._params_line(state)}) | "
         f"{c.steps} steps of {c.batch_size}x{c.seq_len} tokens | devices "
         f"{self.executor.num_devices} ({c.parallelism}) | workdir {self.workdir}")
    meter = mt.Throughput(c.batch_size * c.seq_len, c.steps, step)
    pending, last_train, last_eval, stopped = _Pending(), {}, {}, ""
    several, first = jax.process_count() > 1, True
    t0 = time.perf_counter()
    try:
      with StopRequest(collective=several) as stop:
        while step < c.steps:
          state, m = self.executor.step(state, self.executor.put_batch(next(self.train_ds)))
          step += 1
          pending.add(step, m)
          if first:
            jax.block_until_ready(m)
            _say(f"first step (with compilation): {time.perf_counter() - t0:.1f} s")
            meter.reset(step)
            first = False
          if several:
            stopped = "preemption" if multihost_utils.reached_preemption_sync_point(step) else ""
          else:
            stopped = stop.name
          if c.stop_after and step >= c.stop_after and not stopped:
            stopped = "stop_after"
          final = step == c.steps
          if step % c.log_every == 0 or final or stopped:
            last_train = log.write(step, "train", self.train_record(step, pending, state, meter))
            pending = _Pending()
            _say(mt.train_line(last_train, c.steps, floor))
          if (c.eval_every and step % c.eval_every == 0) or final:
            last_eval = log.write(step, "eval", self.evaluate(state))
            _say(mt.eval_line(last_eval))
            meter.reset(step)
          if (c.checkpoint_every and step % c.checkpoint_every == 0) or final or stopped:
            self.save(step, state, pending)
          if stopped:
            break
        if step >= c.steps and not last_eval:
          last_eval = {"step": step, **self.evaluate(state)}
    finally:
      self.ckpt.wait()
      log.close()
    if stopped:
      _say(f"stopped at step {step} ({stopped}); checkpoint saved in {self.ckpt.directory}; "
           "run the same command again to resume")
    return self._result(step, last_train, last_eval, stopped, time.perf_counter() - t0)

  def _params_line(self, state) -> str:
    """'N params', or 'T trained of N' when constants (a frozen base) are carried."""
    params = self.executor.to_global(state).params
    count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
    trained = count(split_constants(params)[0])
    if (cfg_lib.starts_pretrained(self.config)
        and self.parts.method.from_pretrained is not None):
      return f"{trained:,} trained on a frozen base, {count(params):,} values in all"
    return f"{count(params):,} params"

  def _result(self, step, train, evaluation, stopped, wall) -> dict:
    out: dict[str, Any] = {"step": step, "interrupted": stopped or None, "wall_time_sec": wall}
    for k, v in train.items():
      if k not in ("step", "kind") and not k.startswith("blocks/"):
        out[k] = v
    for k, v in evaluation.items():
      if k not in ("step", "kind"):
        out[f"eval_{k}"] = v
    return out


def train_and_evaluate(config: TrainConfig, workdir: str, devices=None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming its latest checkpoint) and
  returns the final metrics (``devices``: the devices to use, default all):
  step, loss, perplexity, lr, the method's means
  (e.g. rank_rate, density, alpha, beta, primal_residual), eval_loss,
  eval_perplexity (and eval_<variant>/loss), interrupted (None, a signal name,
  'preemption' or 'stop_after') and wall_time_sec.

  Raises:
    TrainError: a user-caused problem (bad setting, data, workdir), with a
      one-line message; NonFiniteLossError when the loss diverges.
  """
  return _Trainer(config, workdir, devices).run()
