"""LoSA: LoRA fine-tuning of a model pruned step by step to a target sparsity.

Over rounds t = 1..T (reference T = 5), with target sparsity s:

  1. Merge: W <- W + M * (alpha / r) A B (the masked LoRA of the previous
     round; the merge keeps the previous sparsity exactly).
  2. Schedule: s_t = s (1 - (1 - t / T)^3), cubic, s_T = s.
  3. Layer sparsities from layer similarity.  The redundancy of decoder
     layer l is rho_l = CKA(H_l, H_{l+1}), the linear CKA between the
     residual stream entering the layer and the one leaving it (= entering
     layer l + 1): a layer whose output is nearly its input adds little.
     More similar = more redundant = sparser:
         s_l = s_t + lambda (rho_l - mean rho) / max_j |rho_j - mean rho|,
     so mean_l s_l = s_t and |s_l - s_t| <= lambda (reference lambda in
     0.01..0.03); all layers get s_t when every rho_l is equal.
  4. Prune with Wanda, per output channel (`pruning.wanda_mask`), every
     kernel of layer l to s_l: W <- M * W.
  5. Ranks: the reconstruction error of layer l is estimated from the Wanda
     scores of what was pruned, e_l = sum_blocks sum_ij (1 - M_ij)
     W_ij^2 ||x_i||^2 (the diagonal estimate of ||X (W - M W)||_F^2), and the
     layer's LoRA rank is r_l = min_rank + a share of the rest proportional
     to e_l, with mean r-bar (largest remainders; capped at min(m, n)).
  6. New adapters (B = 0) at ranks r_l; fine-tune them with the mask:
         W_eff = W + M * (alpha / r_l) A B,
     so that every merge keeps the sparsity pattern of W.

Calibration statistics (Wanda norms, layer inputs) are those of the current
model, `calibration.collect(config, effective_params(state, alpha), tokens)`,
taken before each round.  A training loop alternates
`state = next_round(state, calib, ...)` with ordinary steps on the tree
{'base': state.base, 'adapters': state.adapters} (optimiser `lora.freeze(tx)`,
model params `effective_params`).
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from salaad_jax import structure
from salaad_jax.baselines import cka, lora, pruning
from salaad_jax.baselines.calibration import Calibration

_LAYER = re.compile(r"(?:^|/)layers_(\d+)/")


class LosaState(NamedTuple):
  """Where LoSA stands after `round` rounds.

  Attributes:
    base: params, the merged and pruned weights (frozen within a round).
    masks: boolean masks M of the target kernels (nested like adapters).
    adapters: LoRA adapters of this round (trained within the round).
    layer_sparsity: float32 [L], s_l of this round.
    layer_rank: int32 [L], r_l of this round.
    round: rounds done (0 before the first).
  """

  base: dict
  masks: dict
  adapters: dict
  layer_sparsity: np.ndarray
  layer_rank: np.ndarray
  round: int


def cubic_sparsity(target: float, t: int, rounds: int) -> float:
  """s_t = s (1 - (1 - t / T)^3): 0 at t = 0, s at t = T, increasing."""
  if rounds < 1 or not 0 <= t <= rounds:
    raise ValueError(f"round t={t} must lie in [0, T={rounds}], T >= 1.")
  return float(target) * (1.0 - (1.0 - t / rounds) ** 3)


def layer_redundancy(hidden: Sequence[jax.Array]) -> np.ndarray:
  """rho_l = CKA(H_l, H_{l+1}) for l < L, from [H_0, ..., H_L]."""
  return np.array([float(cka.linear_cka(hidden[i], hidden[i + 1]))
                   for i in range(len(hidden) - 1)], np.float64)


def layer_sparsities(redundancy: Sequence[float], mean: float,
                     max_deviation: float) -> np.ndarray:
  """s_l = mean + lambda (rho_l - mean rho) / max |rho - mean rho|, clipped
  to [0, 1]: mean held at `mean`, deviations within +-lambda."""
  rho = np.asarray(redundancy, np.float64)
  centred = rho - rho.mean()
  spread = np.max(np.abs(centred)) if rho.size else 0.0
  # Equal redundancies (up to rounding) give every layer the mean.
  unit = centred / spread if spread > 1e-9 else np.zeros_like(centred)
  return np.clip(mean + max_deviation * unit, 0.0, 1.0)


def allocate_ranks(errors: Sequence[float], total_rank: int,
                   min_rank: int = 1, max_rank: int | None = None
                   ) -> np.ndarray:
  """Integer ranks r_l = min_rank + (a share of total - L min_rank
  proportional to e_l, by largest remainders; equal shares when all errors
  are 0), so sum_l r_l = total_rank; then capped at max_rank.

  Raises:
    ValueError: if total_rank < L min_rank.
  """
  e = np.maximum(np.asarray(errors, np.float64), 0.0)
  spare = int(total_rank) - min_rank * e.size
  if spare < 0:
    raise ValueError(f"a total rank of {total_rank} cannot give {e.size} "
                     f"layers min_rank={min_rank} each.")
  share = e / e.sum() if e.sum() > 0 else np.full(e.shape, 1.0 / e.size)
  raw = share * spare
  ranks = np.floor(raw).astype(np.int64)
  leftover = spare - int(ranks.sum())
  ranks[np.argsort(-(raw - ranks), kind="stable")[:leftover]] += 1
  return np.minimum(ranks + min_rank,
                    np.iinfo(np.int32).max if max_rank is None else max_rank
                    ).astype(np.int32)


def layer_of(path: str) -> int:
  """The decoder layer index of a kernel path ('layers_3/...' -> 3)."""
  found = _LAYER.search(path)
  if found is None:
    raise ValueError(f"LoSA allocates per decoder layer, but '{path}' is not "
                     "inside a 'layers_<i>' module; restrict the targets.")
  return int(found.group(1))


def init(params: Mapping, targets: structure.Structure = None) -> LosaState:
  """Round 0: the dense model, all-True masks, no adapters."""
  leaves = lora.flat(params)
  paths = lora.target_paths(params, targets)
  masks = {p: jnp.ones(leaves[p].shape, bool) for p in paths}
  n_layers = 1 + max(layer_of(p) for p in paths)
  return LosaState(dict(params), lora.nest(masks), {},
                   np.zeros(n_layers, np.float32),
                   np.zeros(n_layers, np.int32), 0)


def effective_params(state: LosaState, alpha: float) -> dict:
  """W + M * (alpha / r) A B: the sparse model the round trains."""
  return lora.merge(state.base, state.adapters, alpha, state.masks)


def next_round(state: LosaState, calib: Calibration, key: jax.Array, *,
               target: float, alpha: float, mean_rank: int,
               rounds: int = 5, max_deviation: float = 0.02,
               min_rank: int = 1) -> LosaState:
  """Steps 1-6 of round t = state.round + 1 (see the module docstring)."""
  t = state.round + 1
  merged = lora.flat(effective_params(state, alpha))
  n_layers = state.layer_sparsity.shape[0]
  s_t = cubic_sparsity(target, t, rounds)
  s_layer = layer_sparsities(layer_redundancy(calib.hidden[:n_layers + 1]),
                             s_t, max_deviation)
  errors = np.zeros(n_layers)
  masks, max_rank = {}, np.full(n_layers, np.iinfo(np.int32).max)
  for path in lora.flat(state.masks):
    layer = layer_of(path)
    w, norms = merged[path], calib.sq_norms[path]
    mask = pruning.wanda_mask(w, norms, float(s_layer[layer]))
    pruned = jnp.where(mask, 0.0, pruning.wanda_scores(w, norms))
    errors[layer] += float(jnp.sum(pruned * pruned))
    merged[path] = jnp.where(mask, w, jnp.zeros_like(w))
    masks[path] = mask
    max_rank[layer] = min(max_rank[layer], *w.shape)
  ranks = allocate_ranks(errors, mean_rank * n_layers, min_rank, max_rank)
  base = lora.nest(merged)
  adapters = lora.init(base, {p: int(ranks[layer_of(p)]) for p in masks},
                       jax.random.fold_in(key, t),
                       targets=lambda p, _: p in masks)
  return LosaState(base, lora.nest(masks), adapters,
                   s_layer.astype(np.float32), ranks.astype(np.int32), t)
