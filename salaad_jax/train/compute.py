"""Training compute of a run: tokens, forward and backward passes, FLOPs.

Counted in matrix-multiply FLOPs (2 per multiply-add), the convention of
Kaplan et al. 2020 and PaLM (Chowdhery et al. 2022, appendix B); elementwise
work (norms, softmax, the prox's soft threshold, AdamW) is left out, for
every method alike.

One training *pass* (forward and backward over the step's batch) costs per
token three times its forward (the backward's two products per forward
product):

    pass FLOPs per token = 6 sum_i F_i + 6 d V + 12 L T d

where F_i is block i's forward multiply-adds per token (``block_macs``), the
d V term the output head (tied or not), and 12 L T d the attention scores
and their weighted sum (L layers, sequence length T, width d).  A block's
F_i depends on how the method computes it: m n for a kernel (dense, SALAAD,
GaLore, and SLTrain, whose forward materialises W = (a / r) A B + S and
multiplies by it), r (m + n) for the low-rank product x A B, plus the
sparse columns' m k for LOST.

``passes`` counts the passes of the whole run: one per step, and SALAAD's
joint cut loss (``consolidate_cut_joint``) a second one on every factor
step (the steps after the first consolidation projection; the gradient at
the cut, ``grad_fn``).  On top of the passes, per-step structure work
(``structure_flops``):

* SLTrain materialises each kernel: A B in the forward, dA, dB in the
  backward: 6 m n r per block per pass;
* SALAAD's ADMM round every K steps (fast SVT: ``svt_iters`` + 1 products by
  X and by X^T at the factor width w; exact: a thin SVD, 4 m n k + 22 k^3
  with k = min(m, n) (Golub & Van Loan's count));
* SALAAD's projection consolidation (an SVT-sized SVD every step) and
  consolidation in factors (X = B A^T + S: 2 m n w; the factor gradients
  G A, G^T B: 4 m n w; the SVD of the product: 6 (m + n) w^2 + 22 w^3),
  the cut's second gradient another 6 m n w.

``train_flops = passes x tokens per step x pass FLOPs per token + structure
FLOPs``; ``steps_for_flops`` inverts it, so that every method of a
comparison trains for the same FLOPs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from salaad_jax.baselines import accounting
from salaad_jax.models.configs import LlamaConfig
from salaad_jax.train.config import TrainConfig, cut_budgets

KERNEL_METHODS = ("dense", "salaad", "galore", "sltrain")
LOW_RANK_METHODS = ("lowrank", "lost")


class Compute(NamedTuple):
  """The training compute of one run."""

  steps: int
  tokens: int  # steps x batch x sequence length
  passes: int  # forward and backward passes over a step's batch, all steps
  pass_flops_per_token: float
  model_flops: float  # passes x tokens per step x pass FLOPs per token
  structure_flops: float  # per-step matrix work of the method (module docstring)
  train_flops: float  # model + structure

  def as_dict(self) -> dict:
    return dict(self._asdict())


def _option(config: TrainConfig, key: str, default: float) -> float:
  return float(config.method_options.get(key, default))


def _rank(config: TrainConfig, mcfg: LlamaConfig) -> int:
  rank = int(_option(config, "rank", 0))
  if rank <= 0:
    from salaad_jax.baselines.harness import default_rank  # pylint: disable=import-outside-toplevel
    rank = default_rank(config)
  return rank


def block_macs(config: TrainConfig, mcfg: LlamaConfig, m: int, n: int) -> float:
  """Forward multiply-adds per token of one (m, n) block under ``config.method``."""
  if config.method in LOW_RANK_METHODS:
    r = _rank(config, mcfg)
    macs = r * (m + n)
    if config.method == "lost":
      macs += m * accounting.kept_count(n, _option(config, "density", 0.03))
    return float(macs)
  return float(m * n)


def pass_flops_per_token(config: TrainConfig, mcfg: LlamaConfig) -> float:
  """One forward and backward pass, per token (module docstring)."""
  blocks = accounting.model_blocks(mcfg).shapes.values()
  macs = sum(block_macs(config, mcfg, m, n) for m, n in blocks)
  macs += mcfg.d_model * mcfg.vocab_size
  return 6.0 * macs + 12.0 * mcfg.n_layers * config.seq_len * mcfg.d_model


def consolidation_start(config: TrainConfig):
  """The step count c after which SALAAD consolidates (None: never)."""
  if config.method != "salaad" or config.consolidate_from <= 0:
    return None
  return int(round(config.consolidate_from * config.steps))


def factor_steps(config: TrainConfig) -> int:
  """Steps trained in factors: those after the first consolidation
  projection (counts c + 1 ... steps - 1)."""
  c = consolidation_start(config)
  if c is None or config.consolidate_params != "factors":
    return 0
  return max(0, config.steps - 1 - c)


def joint_cut(config: TrainConfig) -> bool:
  """Whether the run's factor steps take a second pass (the joint cut loss)."""
  return (factor_steps(config) > 0 and config.consolidate_cut_joint > 0
          and any(b < 1.0 for b in cut_budgets(config)))


def passes(config: TrainConfig) -> int:
  """Forward and backward passes of the whole run."""
  return config.steps + (factor_steps(config) if joint_cut(config) else 0)


def _svd_flops(m: int, n: int) -> float:
  k = min(m, n)
  return 4.0 * m * n * k + 22.0 * k ** 3


def _factor_width(config: TrainConfig, m: int, n: int) -> int:
  """The width SALAAD keeps L's factors at (the fast SVT's rank ceiling)."""
  k = min(m, n)
  if config.max_rank:
    return min(k, int(config.max_rank))
  return min(k, math.ceil(2 * config.rank_target * k) + 8)


def _salaad_structure_flops(config: TrainConfig, mcfg: LlamaConfig) -> float:
  c = consolidation_start(config)
  admm_steps = config.steps if c is None else min(config.steps, c + 1)
  rounds = admm_steps // max(1, config.every_k)
  fac = factor_steps(config)
  projected = 0 if c is None or fac else config.steps - admm_steps
  total = 0.0
  for m, n in accounting.model_blocks(mcfg).shapes.values():
    w = _factor_width(config, m, n)
    svt = (_svd_flops(m, n) if config.svt == "exact"
           else 2.0 * (config.svt_iters + 1) * 2.0 * m * n * w)
    total += (rounds + projected) * svt
    if fac:
      r = min(w, max(1, math.ceil(config.rank_target * min(m, n) - 1e-6)))
      step = 6.0 * m * n * r + 6.0 * (m + n) * r * r + 22.0 * r ** 3
      if joint_cut(config):
        step += 6.0 * m * n * r
      total += fac * step
  return total


def structure_flops(config: TrainConfig, mcfg: LlamaConfig) -> float:
  """The method's per-step matrix work over the run (module docstring)."""
  if config.method == "salaad":
    return _salaad_structure_flops(config, mcfg)
  if config.method == "sltrain":
    r = _rank(config, mcfg)
    per_pass = sum(6.0 * m * n * r for m, n in accounting.model_blocks(mcfg).shapes.values())
    return per_pass * config.steps
  return 0.0


def train_compute(config: TrainConfig, mcfg: LlamaConfig) -> Compute:
  """Tokens, passes and FLOPs of training ``config`` (``mcfg``: its model,
  ``train.state.model_config(config)``)."""
  per_step = config.batch_size * config.seq_len
  per_token = pass_flops_per_token(config, mcfg)
  n = passes(config)
  model = float(n) * per_step * per_token
  extra = structure_flops(config, mcfg)
  return Compute(config.steps, config.steps * per_step, n, per_token, model, extra,
                 model + extra)


def steps_for_flops(config: TrainConfig, mcfg: LlamaConfig, flops: float) -> int:
  """The step count (at least 1) whose training FLOPs come closest to
  ``flops``, every schedule fraction of ``config`` (warm-up, consolidation)
  scaled with it."""
  if not flops > 0:
    raise ValueError(f"flops must be positive, got {flops}")

  def at(steps):
    return train_compute(config.replace(steps=steps), mcfg).train_flops

  lo, hi = 1, max(2, config.steps)
  while at(hi) < flops:
    hi *= 2
  while hi - lo > 1:  # at(lo) < flops <= at(hi), FLOPs increase with steps
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if at(mid) < flops else (lo, mid)
  return lo if abs(at(lo) - flops) <= abs(at(hi) - flops) else hi
