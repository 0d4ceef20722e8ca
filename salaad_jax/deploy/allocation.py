"""Per-block ranks and sparse counts that meet a budget (SALAAD.md §6).

Two methods choose (r_i, nnz_i) for every block i of a ``Blocks``:

``hpa`` — the reference homomorphic parameter allocation:
  1. base rank r_i = smallest k with sum_{j<=k} sigma~_j >= e sum_j sigma~_j
     (unsquared, e = 0.999); base nnz_i = count(|S_i| > 1e-8 max |S_i|).
  2. P_L = sum_i r_i (m_i + n_i), P_S = sum_i nnz_i,
     P_total = P_rest + P_L + P_S.
  3. D = P_total - P_tgt; D_L = gamma D, D_S = (1 - gamma) D, the overflow of
     either part (D_L > P_L or D_S > P_S) moved to the other.
  4. r_i <- floor(r_i (1 - D_L / P_L)), nnz_i <- floor(nnz_i (1 - D_S / P_S))
     (exact rational arithmetic; flooring keeps P <= P_tgt).  With D <= 0
     the base allocation is kept.

``global`` — the budget spent where the marginal error per unit of cost is
largest.  Each triplet j of block i is an item of gain sigma~_ij^2 and cost
(m_i + n_i) (parameters) or (m_i + n_i) b_w (bytes); each sparse entry an
item of gain s^2 and cost 1 (or its bytes).  Gains fall along each block's
chain, so a greedy pass in decreasing gain/cost order keeps every block's
choice a prefix (top triplets, largest entries) and solves the continuous
relaxation exactly; items that no longer fit are skipped and smaller ones fill
the rest.  A per-block fixed cost (CSR row pointer, bitmap) is folded into the
first item of the sparse chain: the prefix of entries with the best average
gain per byte (the upper concave envelope of the chain).  Greedy is optimal up
to the one item that did not fit; the HPA allocation at the same budget (for
a byte budget: at the largest parameter budget whose bytes fit) is feasible
too, and the better of the two is returned (``solver`` says which), so the
global error never exceeds HPA's.

A byte budget is priced in one sparse format for every block ('coo', 'csr',
'bitmap'), or with fmt='auto' in each of them in turn: the allocation of the
smallest error wins (ties: fewer bytes) and its ``fmt`` says which format
the whole deployment is stored in.  No validation data is involved: the
choice depends only on the spectra and the budget.

The error of an allocation is the separable squared error
sum_i sum_{j > r_i} sigma~_ij^2 + sum_i sum_{k > nnz_i} s_(k)^2, weighted by
calibration when the ``Blocks`` are.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from salaad_jax import prox
from salaad_jax.deploy import accounting as acc
from salaad_jax.deploy.spectra import Blocks

METHODS = ("hpa", "global", "cut")
UNITS = ("params", "bytes")
AUTO_FORMAT = "auto"


@dataclasses.dataclass(frozen=True)
class BlockAllocation:
  """Kept rank and sparse entries of one block of matrix shape (m, n)."""

  path: str
  shape: tuple[int, ...]
  m: int
  n: int
  rank: int
  nnz: int


@dataclasses.dataclass(frozen=True)
class Allocation:
  """Per-block (rank, nnz) for one budget.

  Attributes:
    blocks: one ``BlockAllocation`` per block, in tree order.
    total_params: P_model of the dense model.
    budget: the resolved absolute budget, in ``unit``.
    unit: 'params' or 'bytes'.
    method: 'hpa' or 'global'.
    gamma: HPA's low-rank share of the cut (None when not used).
    weighted: whether the error is calibration-weighted.
    error: separable squared error of the kept part against L + S.
    energy: the error of keeping nothing (sum of all gains).
    solver: how the global allocation was reached ('greedy' or 'hpa').
    fmt, dtype: storage the byte budget was priced in (unit 'bytes').
  """

  blocks: tuple[BlockAllocation, ...]
  total_params: int
  budget: int
  unit: str
  method: str
  gamma: Optional[float]
  weighted: bool
  error: float
  energy: float
  solver: str = ""
  fmt: Optional[str] = None
  dtype: Optional[str] = None

  @property
  def ranks(self) -> dict[str, int]:
    return {b.path: b.rank for b in self.blocks}

  @property
  def nnz(self) -> dict[str, int]:
    return {b.path: b.nnz for b in self.blocks}

  @property
  def rest_params(self) -> int:
    return self.total_params - sum(b.m * b.n for b in self.blocks)

  @property
  def params(self) -> int:
    """P = P_rest + sum_i (m_i + n_i) r_i + nnz_i."""
    return self.rest_params + sum(acc.block_params(b.m, b.n, b.rank, b.nnz)
                                  for b in self.blocks)

  @property
  def relative_error(self) -> float:
    return self.error / self.energy if self.energy > 0 else 0.0

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready form (``from_dict`` inverts it)."""
    d = dataclasses.asdict(self)
    d["blocks"] = [dict(dataclasses.asdict(b), shape=list(b.shape)) for b in self.blocks]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Allocation":
    blocks = tuple(BlockAllocation(**dict(b, shape=tuple(b["shape"]))) for b in d["blocks"])
    return cls(**dict(d, blocks=blocks))


# --------------------------------------------------------------------------
# Budgets.
# --------------------------------------------------------------------------


def resolve_budget(budget, full: int, minimum: int, unit: str = "params") -> int:
  """An absolute budget from a fraction of ``full`` (a float in (0, 1]) or an
  absolute count (an int in [minimum, full]).

  Raises ValueError for a budget above 100 % or below ``minimum`` (what the
  parameters outside the blocks alone take).
  """
  if isinstance(budget, (bool, np.bool_)) or not isinstance(
      budget, (int, float, np.integer, np.floating)):
    raise ValueError(f"budget must be a fraction (float) or a count of {unit} (int), "
                     f"got {budget!r}")
  if isinstance(budget, (float, np.floating)):
    if not math.isfinite(budget) or budget <= 0 or budget > 1:
      raise ValueError(f"a fractional budget must lie in (0, 1] (a share of the dense "
                       f"model's {full} {unit}); got {budget}")
    value = math.floor(float(budget) * full + 1e-9)
  else:
    value = int(budget)
    if value > full:
      raise ValueError(f"budget {value} {unit} is above the dense model's {full} {unit} "
                       "(100 %)")
  if value < minimum:
    raise ValueError(
        f"budget {value} {unit} ({value / full:.2%}) is below the minimum representable "
        f"{minimum} {unit} ({minimum / full:.2%}): the parameters outside the blocks "
        "alone take that much")
  return value


# --------------------------------------------------------------------------
# Error of an allocation.
# --------------------------------------------------------------------------


def allocation_error(blocks: Blocks, ranks, nnz) -> float:
  """sum_i sum_{j > r_i} sigma~_ij^2 + sum_{k > nnz_i} g_ik (separable model)."""
  err = 0.0
  for b in blocks.blocks:
    err += float(np.sum(b.triplet_gain[ranks[b.path]:]))
    err += float(np.sum(b.sparse_gain[nnz[b.path]:]))
  return err


def _energy(blocks: Blocks) -> float:
  return float(sum(b.energy for b in blocks.blocks))


def _build(blocks: Blocks, ranks, nnz, *, budget, unit, method, gamma, solver="",
           fmt=None, dtype=None) -> Allocation:
  out = tuple(BlockAllocation(b.path, b.shape, b.m, b.n, int(ranks[b.path]),
                              int(nnz[b.path])) for b in blocks.blocks)
  return Allocation(out, blocks.total_params, int(budget), unit, method, gamma,
                    blocks.weighted, allocation_error(blocks, ranks, nnz), _energy(blocks),
                    solver, fmt, dtype)


# --------------------------------------------------------------------------
# HPA.
# --------------------------------------------------------------------------


def base_rank(sigma, energy: float = 0.999) -> int:
  """Smallest k with sum_{j<=k} sigma_j >= energy * sum_j sigma_j (unsquared)."""
  s = np.asarray(sigma, np.float64)
  if s.size == 0:
    return 0
  # prox.effective_rank measures squared mass: feed it sqrt(sigma).
  return int(prox.effective_rank(jnp.sqrt(jnp.asarray(s, jnp.float32)), energy))


def base_nnz(sparse_gain, tol: float = 1e-8) -> int:
  """count(|s| > tol * max |s|), from the gains s^2 sorted non-increasing."""
  g = np.asarray(sparse_gain)
  if g.size == 0:
    return 0
  return int(np.sum(np.sqrt(g) > tol * math.sqrt(g[0])))


def hpa(blocks: Blocks, budget, gamma: float = 0.5, *, energy: float = 0.999,
        nnz_tol: float = 1e-8) -> Allocation:
  """The reference uniform-scaling allocation (see the module docstring).

  ``budget`` is a fraction of P_model or an absolute parameter count.
  """
  return _hpa_at(blocks, _hpa_bases(blocks, gamma, energy, nnz_tol),
                 resolve_budget(budget, blocks.total_params, blocks.rest_params), gamma)


def _hpa_bases(blocks: Blocks, gamma: float, energy: float, nnz_tol: float):
  """HPA's starting point (r0, k0) per block, which does not depend on the budget."""
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
  r0 = {b.path: min(base_rank(b.sigma, energy), b.max_rank) for b in blocks.blocks}
  k0 = {b.path: base_nnz(b.sparse_gain, nnz_tol) for b in blocks.blocks}
  return r0, k0


def _hpa_at(blocks: Blocks, bases, target: int, gamma: float) -> Allocation:
  """HPA at the absolute parameter budget ``target`` from ``_hpa_bases``."""
  r0, k0 = bases
  p_l = sum(r0[b.path] * (b.m + b.n) for b in blocks.blocks)
  p_s = sum(k0.values())
  cut = blocks.rest_params + p_l + p_s - target
  if cut <= 0:
    return _build(blocks, r0, k0, budget=target, unit="params", method="hpa", gamma=gamma)
  g = Fraction(gamma)
  d_l, d_s = g * cut, (1 - g) * cut
  if d_l > p_l:
    d_l, d_s = Fraction(p_l), d_s + d_l - p_l
  if d_s > p_s:
    d_l, d_s = d_l + d_s - p_s, Fraction(p_s)
  keep_l = (p_l - d_l) / p_l if p_l else Fraction(0)
  keep_s = (p_s - d_s) / p_s if p_s else Fraction(0)
  ranks = {p: math.floor(r * keep_l) for p, r in r0.items()}
  nnz = {p: math.floor(k * keep_s) for p, k in k0.items()}
  return _build(blocks, ranks, nnz, budget=target, unit="params", method="hpa", gamma=gamma)


def allocation_bytes(alloc: Allocation, fmt: str, dtype) -> int:
  """Deployment bytes of ``alloc`` stored in ``fmt`` with ``dtype`` values."""
  b_w = acc.value_bytes(dtype)
  return alloc.rest_params * b_w + sum(acc.block_bytes(fmt, b.m, b.n, b.rank, b.nnz, b_w)
                                       for b in alloc.blocks)


def hpa_within_bytes(blocks: Blocks, max_bytes: int, gamma: float = 0.5, *,
                     fmt: str = "coo", dtype="bfloat16") -> Optional[Allocation]:
  """HPA(gamma) at the largest parameter budget whose allocation takes at
  most ``max_bytes`` in ``fmt``/``dtype`` (HPA's ranks and nnz grow with the
  parameter budget, so its bytes do: bisection); None when even the
  smallest does not fit.  fmt='auto': the smallest-error result over the
  sparse formats (``best_format``)."""
  if fmt == AUTO_FORMAT:
    return best_format(lambda f: hpa_within_bytes(blocks, max_bytes, gamma, fmt=f, dtype=dtype),
                       dtype)
  bases = _hpa_bases(blocks, gamma, 0.999, 1e-8)
  lo, hi, best = blocks.rest_params, blocks.total_params, None
  while lo <= hi:
    mid = (lo + hi) // 2
    alloc = _hpa_at(blocks, bases, mid, gamma)
    if allocation_bytes(alloc, fmt, dtype) <= max_bytes:
      best, lo = alloc, mid + 1
    else:
      hi = mid - 1
  return best


def best_format(allocate_in, dtype) -> Optional[Allocation]:
  """The allocation of the smallest error among ``allocate_in(fmt)`` for
  every sparse format (ties: the fewest bytes; None results skipped), its
  ``fmt`` set to the winning format; None when no format fits."""
  found = [(a.error, allocation_bytes(a, f, dtype), i, dataclasses.replace(a, fmt=f))
           for i, f in enumerate(acc.SPARSE_FORMATS)
           if (a := allocate_in(f)) is not None]
  return min(found)[-1] if found else None


# --------------------------------------------------------------------------
# Global greedy allocation.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Prices:
  """Cost of a triplet, of a sparse entry and of a sparse part, per block."""

  triplet: list[int]
  entry: list[int]
  overhead: list[int]
  rest: int  # cost of everything outside the blocks


def _prices(blocks: Blocks, unit: str, fmt: Optional[str], dtype) -> _Prices:
  bs = blocks.blocks
  if unit == "params":
    return _Prices([b.m + b.n for b in bs], [1] * len(bs), [0] * len(bs), blocks.rest_params)
  b_w = acc.value_bytes(dtype)
  return _Prices([(b.m + b.n) * b_w for b in bs],
                 [acc.sparse_entry_bytes(fmt, b_w)] * len(bs),
                 [acc.sparse_overhead_bytes(fmt, b.m, b.n) for b in bs],
                 blocks.rest_params * b_w)


def _sparse_chain(gain: np.ndarray, entry: int, overhead: int):
  """Items (gain, cost, count) of one sparse chain; the first item is the
  prefix of entries with the best gain per cost including the overhead."""
  if gain.size == 0:
    return gain, np.zeros(0, np.int64), np.zeros(0, np.int64)
  csum = np.cumsum(gain)
  j = int(np.argmax(csum / (overhead + entry * np.arange(1, gain.size + 1)))) + 1
  g = np.concatenate([[csum[j - 1]], gain[j:]])
  c = np.concatenate([[overhead + entry * j], np.full(gain.size - j, entry)])
  cnt = np.concatenate([[j], np.ones(gain.size - j, np.int64)])
  return g, c.astype(np.int64), cnt.astype(np.int64)


def _items(blocks: Blocks, prices: _Prices):
  """Flat item table of every chain: ratio (gain per cost, made
  non-increasing along each chain), cost, count, chain id, position in the
  chain.  Chain 2i holds block i's triplets, 2i + 1 its sparse entries."""
  cols = {k: [] for k in ("ratio", "cost", "count", "chain", "pos")}
  for i, b in enumerate(blocks.blocks):
    tg = b.triplet_gain
    chains = [(tg, np.full(tg.size, prices.triplet[i], np.int64), np.ones(tg.size, np.int64)),
              _sparse_chain(b.sparse_gain, prices.entry[i], prices.overhead[i])]
    for k, (gain, cost, count) in enumerate(chains):
      ratio = np.minimum.accumulate(gain / np.maximum(cost, 1)) if gain.size else gain
      cols["ratio"].append(ratio)
      cols["cost"].append(cost)
      cols["count"].append(count)
      cols["chain"].append(np.full(gain.size, 2 * i + k, np.int64))
      cols["pos"].append(np.arange(gain.size))
  return {k: np.concatenate(v) for k, v in cols.items()}


def _greedy_take(items, avail: int, fill: bool = True) -> np.ndarray:
  """Boolean mask of the items the greedy pass takes with ``avail`` cost;
  ``fill=False``: only the longest fitting prefix (no skip-and-fill)."""
  cost, chain = items["cost"], items["chain"]
  order = np.lexsort((items["pos"], chain, -items["ratio"]))
  taken = np.zeros(cost.size, bool)
  slack = int(avail)
  # Take the longest fitting prefix of the remaining order.  The first item
  # that does not fit closes its chain, and so does every chain whose next
  # item no longer fits (a chain's later items are never cheaper); the pass
  # goes on with the other chains.
  while order.size:
    csum = np.cumsum(cost[order])
    t = int(np.searchsorted(csum, slack, side="right"))
    taken[order[:t]] = True
    if t:
      slack -= int(csum[t - 1])
    rest = order[t:]
    if not rest.size or not fill:
      break
    closed = np.unique(np.concatenate([chain[rest[:1]], chain[rest[cost[rest] > slack]]]))
    order = rest[~np.isin(chain[rest], closed)]
  return taken


def _kept_counts(blocks: Blocks, items, taken) -> tuple[dict[str, int], dict[str, int]]:
  """({path: kept rank}, {path: kept nnz}) of the ``taken`` items."""
  per_chain = np.bincount(items["chain"][taken], weights=items["count"][taken],
                          minlength=2 * len(blocks.blocks)).astype(np.int64)
  return ({b.path: int(per_chain[2 * i]) for i, b in enumerate(blocks.blocks)},
          {b.path: int(per_chain[2 * i + 1]) for i, b in enumerate(blocks.blocks)})


def greedy(blocks: Blocks, budget, *, unit: str = "params", fmt: Optional[str] = None,
           dtype=None) -> Allocation:
  """The greedy marginal-error-per-cost allocation alone (no HPA candidate)."""
  prices = _prices(blocks, unit, fmt, dtype)
  full = blocks.total_params * (1 if unit == "params" else acc.value_bytes(dtype))
  target = resolve_budget(budget, full, prices.rest, unit)
  items = _items(blocks, prices)
  ranks, nnz = _kept_counts(blocks, items, _greedy_take(items, target - prices.rest))
  return _build(blocks, ranks, nnz, budget=target, unit=unit, method="global", gamma=None,
                solver="greedy", fmt=fmt if unit == "bytes" else None,
                dtype=acc.dtype_name(dtype) if unit == "bytes" else None)


def cut_allocation(blocks: Blocks, budget, *, unit: str = "params", fmt: Optional[str] = None,
                   dtype=None) -> Allocation:
  """The cut SALAAD's consolidation trains (``consolidate.global_cut``, no
  fixed cost; ``--consolidate_cut_budgets``): the greedy pass in parameters,
  items taken in decreasing gain per cost while their running cost fits (no
  skip-and-fill, no HPA candidate).  A byte budget needs fmt='bitmap': the
  parameters are what the budget holds once every block's bitmap is counted
  as stored, (budget - sum_i ceil(m_i n_i / 8)) // b_w, so a run deploys at
  exactly the cuts it trained (a block left without S stores no bitmap, so
  the bytes can only be fewer)."""
  prices = _prices(blocks, "params", None, None)
  if unit == "bytes":
    if fmt != "bitmap":
      raise ValueError("method='cut' prices a byte budget with S stored as a bitmap "
                       f"(fmt='bitmap'), got fmt={fmt!r}")
    b_w = acc.value_bytes(dtype)
    target = resolve_budget(budget, blocks.total_params * b_w, prices.rest * b_w, unit)
    bitmaps = sum(acc.sparse_overhead_bytes("bitmap", b.m, b.n) for b in blocks.blocks)
    avail = (target - bitmaps) // b_w - prices.rest
  else:
    target = resolve_budget(budget, blocks.total_params, prices.rest, unit)
    avail = target - prices.rest
  items = _items(blocks, prices)
  ranks, nnz = _kept_counts(blocks, items, _greedy_take(items, max(avail, 0), fill=False))
  return _build(blocks, ranks, nnz, budget=target, unit=unit, method="cut", gamma=None,
                solver="prefix", fmt=fmt if unit == "bytes" else None,
                dtype=acc.dtype_name(dtype) if unit == "bytes" else None)


def global_allocation(blocks: Blocks, budget, *, gamma: float = 0.5, unit: str = "params",
                      fmt: Optional[str] = None, dtype=None) -> Allocation:
  """The better of the greedy allocation and HPA(gamma): at the parameter
  budget, or for a byte budget at the largest parameter budget whose bytes
  fit (:func:`hpa_within_bytes`)."""
  best = greedy(blocks, budget, unit=unit, fmt=fmt, dtype=dtype)
  if unit == "params":
    ref = hpa(blocks, budget, gamma)
  else:
    ref = hpa_within_bytes(blocks, best.budget, gamma, fmt=fmt, dtype=dtype)
  if ref is not None and ref.error < best.error:
    best = dataclasses.replace(ref, method="global", gamma=None, solver="hpa", unit=best.unit,
                               budget=best.budget, fmt=best.fmt, dtype=best.dtype)
  return best


def allocate(blocks: Blocks, budget, method: str = "global", *, gamma: float = 0.5,
             unit: str = "params", fmt: str = "coo", dtype="bfloat16") -> Allocation:
  """Per-block (rank, nnz) meeting ``budget``.

  Args:
    blocks: the canonical spectra (``spectra``).
    budget: a float in (0, 1] (share of the dense model's parameters, or of
      its dense bytes b_w P_model when unit='bytes') or an int (absolute
      count of parameters or bytes).
    method: 'global' (greedy on marginal error per cost), 'hpa' (the
      reference uniform scaling; parameters only) or 'cut' (the cut
      consolidation with ``consolidate_cut_budgets`` trains,
      :func:`cut_allocation`; bytes in fmt 'bitmap', which 'auto' means).
    gamma: HPA's share of the cut taken from the low-rank part.
    unit: 'params' or 'bytes'.
    fmt, dtype: storage format and value dtype pricing a byte budget;
      fmt='auto' (bytes only): the format whose allocation has the smallest
      error (``best_format``), recorded in the result's ``fmt``.

  Raises:
    ValueError: unknown method/unit/format, or a budget above 100 % or below
      what the parameters outside the blocks take.
  """
  if method not in METHODS:
    raise ValueError(f"allocation method must be one of {METHODS}, got {method!r}")
  if unit not in UNITS:
    raise ValueError(f"budget unit must be one of {UNITS}, got {unit!r}")
  if method == "cut":
    if unit == "bytes" and fmt == AUTO_FORMAT:
      fmt = "bitmap"
    return cut_allocation(blocks, budget, unit=unit, fmt=fmt, dtype=dtype)
  if unit == "bytes" and fmt == AUTO_FORMAT:
    if method == "hpa":
      raise ValueError("method='hpa' allocates parameters (SALAAD.md §6); use "
                       "unit='params' or method='global'")
    return best_format(lambda f: allocate(blocks, budget, method, gamma=gamma, unit=unit,
                                          fmt=f, dtype=dtype), dtype)
  if unit == "bytes":
    acc.check_format(fmt)
    if fmt == "dense":
      raise ValueError("a byte budget needs a structured format ('coo', 'csr', 'bitmap'); "
                       "'dense' stores every block whole whatever the allocation")
    if method == "hpa":
      raise ValueError("method='hpa' allocates parameters (SALAAD.md §6); use "
                       "unit='params' or method='global'")
  if method == "hpa":
    return hpa(blocks, budget, gamma)
  return global_allocation(blocks, budget, gamma=gamma, unit=unit, fmt=fmt, dtype=dtype)
