"""Parameter counts and deployment bytes of structured LLaMA models.

The accounting of SALAAD.md §6, so that every row of a comparison table is
measured the same way.  A model is a set of weight blocks (the attention and
MLP projection kernels, each an (m, n) matrix) plus "the rest" (embedding,
head, norms), which stays dense:

    P     = P_rest + sum_i P_i
    bytes = P_rest * b_w + sum_i bytes_i

with, per block and its storage,

    dense          P_i = m n               bytes_i = m n b_w
    low rank r     P_i = (m + n) r         bytes_i = (m + n) r b_w
    sparse (nnz)   P_i = nnz               bytes_i = nnz (b_w + 2 b_idx)            COO
                                                   = nnz (b_w + b_idx) + (m + 1) b_idx  CSR
                                                   = nnz b_w + ceil(m n / 8)        bitmap
    k columns      P_i = m k               bytes_i = m k b_w + k b_idx

b_w = 2 (bf16 values), b_idx = 4 (int32 indices); a sparse part with nnz = 0
costs nothing.  Parts add: a block stored as low rank plus sparse costs the
sum of both.  The sparse formats and their byte counts are those of
`salaad_jax.deploy.accounting` (CSR includes its row pointer), so a baseline
and a SALAAD deployment stored in the same format are counted alike; these
helpers stay self-contained so the baselines do not depend on the
deployment package.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax

from salaad_jax import structure
from salaad_jax.models.configs import LlamaConfig
from salaad_jax.models.llama import init_params

BF16_BYTES = 2
INT32_BYTES = 4


SPARSE_FORMATS = ("coo", "csr", "bitmap")


class ByteCosts(NamedTuple):
  """Storage costs: b_w bytes per value, b_idx per index, and the storage
  format of unstructured sparse parts ('coo', 'csr' or 'bitmap')."""

  b_w: int = BF16_BYTES
  b_idx: int = INT32_BYTES
  sparse_format: str = "coo"


class Footprint(NamedTuple):
  """Parameter count and deployment bytes of a model or of one part of it."""

  params: int
  bytes: int


def total(*parts: Footprint) -> Footprint:
  """Sum of footprints (parameters and bytes add)."""
  return Footprint(sum(p.params for p in parts), sum(p.bytes for p in parts))


def dense_footprint(size: int, b_w: int = BF16_BYTES) -> Footprint:
  """`size` dense values: P = size, bytes = size b_w."""
  return Footprint(int(size), int(size) * b_w)


def lowrank_footprint(m: int, n: int, rank: int,
                      b_w: int = BF16_BYTES) -> Footprint:
  """Factors (m, r) and (r, n): P = (m + n) r, bytes = (m + n) r b_w."""
  p = (m + n) * int(rank)
  return Footprint(p, p * b_w)


def sparse_footprint(m: int, n: int, nnz: int,
                     costs: ByteCosts = ByteCosts()) -> Footprint:
  """nnz unstructured entries of an (m, n) block in `costs.sparse_format`:
  COO nnz (b_w + 2 b_idx), CSR nnz (b_w + b_idx) + (m + 1) b_idx, bitmap
  nnz b_w + ceil(m n / 8); 0 bytes when nnz = 0."""
  nnz, b_w, b_idx = int(nnz), costs.b_w, costs.b_idx
  if costs.sparse_format not in SPARSE_FORMATS:
    raise ValueError(f"sparse_format must be one of {SPARSE_FORMATS}, got "
                     f"{costs.sparse_format!r}.")
  if nnz == 0:
    return Footprint(0, 0)
  per_entry = {"coo": b_w + 2 * b_idx, "csr": b_w + b_idx,
               "bitmap": b_w}[costs.sparse_format]
  overhead = {"coo": 0, "csr": (m + 1) * b_idx,
              "bitmap": math.ceil(m * n / 8)}[costs.sparse_format]
  return Footprint(nnz, nnz * per_entry + overhead)


def column_sparse_footprint(m: int, k: int, b_w: int = BF16_BYTES,
                            b_idx: int = INT32_BYTES) -> Footprint:
  """k whole columns of an (m, n) matrix: P = m k, bytes = m k b_w + k b_idx."""
  return Footprint(m * int(k), m * int(k) * b_w + int(k) * b_idx)


def kept_count(size: int, fraction: float) -> int:
  """floor(fraction * size): how many of `size` entries a density keeps."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"a density must lie in [0, 1], got {fraction!r}.")
  return int(math.floor(fraction * size + 1e-9))


class ModelBlocks(NamedTuple):
  """The weight blocks of a dense model and the size of everything else.

  Attributes:
    shapes: parameter path (e.g. 'layers_0/attn/q_proj/kernel') -> (m, n),
      in tree order; m = input features, n = output features.
    rest: number of parameters outside the blocks (embedding, head, norms).
  """

  shapes: dict[str, tuple[int, int]]
  rest: int

  @property
  def min_dim(self) -> int:
    """min over blocks of min(m, n): the largest rank every block admits."""
    return min(min(s) for s in self.shapes.values())


def model_blocks(config: LlamaConfig) -> ModelBlocks:
  """Blocks of `Llama(config)`: every projection kernel the `dense_cls`
  replaces (SALAAD's default block selection: 2-D kernels except the head).

  Computed from the abstract parameter tree (`jax.eval_shape`), so nothing is
  materialised; cached per config.
  """
  blocks = _model_blocks(config)
  return ModelBlocks(dict(blocks.shapes), blocks.rest)


@functools.lru_cache(maxsize=32)
def _model_blocks(config: LlamaConfig) -> ModelBlocks:
  abstract = jax.eval_shape(lambda key: init_params(config, key),
                            jax.random.key(0))
  pred = structure.make_predicate()
  shapes, rest = {}, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = structure.path_str(path)
    if pred(name, leaf):
      shapes[name] = (int(leaf.shape[0]), int(leaf.shape[1]))
    else:
      rest += math.prod(leaf.shape)
  return ModelBlocks(shapes, rest)


def largest_rank_within(count: Callable[[int], int], target: int,
                        max_rank: int) -> int:
  """Largest r in [1, max_rank] with count(r) <= target (count non-decreasing).

  Raises:
    ValueError: if even r = 1 exceeds the target.
  """
  if count(1) > target:
    raise ValueError(
        f"a parameter budget of {target} is below the smallest model of this "
        f"method ({count(1)} parameters at rank 1); raise the budget.")
  lo, hi = 1, int(max_rank)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if count(mid) <= target:
      lo = mid
    else:
      hi = mid - 1
  return lo
