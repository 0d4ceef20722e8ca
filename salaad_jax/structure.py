"""Which parameters are SALAAD blocks, and how a kernel is viewed as a matrix.

A *block* is a parameter leaf X_i that gets a low-rank plus sparse surrogate
(SALAAD.md §1).  By default the blocks are the kernels (leaves named
``kernel``) of Dense/DenseGeneral layers with at least two dimensions, except
the output head; the token embedding and the head can be added with flags, and
any selection can be replaced by a regex on the parameter path or a
predicate.

A kernel of rank > 2 (e.g. a Flax ``DenseGeneral`` attention kernel of shape
(d_model, heads, head_dim)) is viewed as the matrix obtained by grouping its
leading ``row_axes`` axes into rows and the rest into columns.  The default
split makes the matrix as square as possible, which groups the input and the
output features of attention kernels correctly; pass ``row_axes`` to decide.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Union

import jax

PathPredicate = Callable[[str, Any], bool]
Structure = Union[None, str, PathPredicate]

DEFAULT_HEAD_PATTERN = r"(^|/)(lm_head|head|output|unembed|logits)(/|$)"
DEFAULT_EMBED_PATTERN = r"(^|/)(embed|embedding|embedder|wte|tok_embeddings|token_embedder)(/|$)"


@dataclasses.dataclass(frozen=True)
class BlockInfo:
  """Static description of one block (hashable, usable under jit)."""

  path: str
  shape: tuple[int, ...]
  row_axes: int

  @property
  def matrix_shape(self) -> tuple[int, int]:
    m = math.prod(self.shape[: self.row_axes])
    n = math.prod(self.shape[self.row_axes:])
    return (m, n)

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def path_str(path) -> str:
  """'layers_0/attn/q_proj/kernel' from a jax key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def squarest_split(shape: tuple[int, ...]) -> int:
  """Number of leading axes forming the rows that makes the matrix squarest."""
  if len(shape) < 2:
    raise ValueError(f"a block needs at least 2 dimensions, got shape {shape}")
  best, best_gap = 1, None
  for k in range(1, len(shape)):
    m, n = math.prod(shape[:k]), math.prod(shape[k:])
    gap = abs(math.log(max(m, 1)) - math.log(max(n, 1)))
    if best_gap is None or gap < best_gap - 1e-12:
      best, best_gap = k, gap
  return best


def _default_predicate(include_embedding: bool, include_head: bool) -> PathPredicate:
  head = re.compile(DEFAULT_HEAD_PATTERN)
  embed = re.compile(DEFAULT_EMBED_PATTERN)

  def pred(path: str, leaf) -> bool:
    if getattr(leaf, "ndim", 0) < 2:
      return False
    name = path.rsplit("/", 1)[-1]
    if embed.search(path) and name in ("embedding", "kernel", "weight"):
      return include_embedding
    if name != "kernel":
      return False
    if head.search(path):
      return include_head
    return True

  return pred


def make_predicate(structure: Structure = None, *, include_embedding: bool = False,
                   include_head: bool = False) -> PathPredicate:
  """Turns the user's ``structure`` argument into a (path, leaf) -> bool."""
  if structure is None:
    return _default_predicate(include_embedding, include_head)
  if isinstance(structure, str):
    pattern = re.compile(structure)
    return lambda path, leaf: bool(pattern.search(path))
  if callable(structure):
    return structure
  raise TypeError(
      "structure must be None, a regex string or a callable (path, leaf) -> bool; "
      f"got {type(structure).__name__}")


RowAxes = Union[None, int, Callable[[str, tuple], int]]


def select_blocks(params, structure: Structure = None, *, include_embedding=False,
                  include_head=False, row_axes: RowAxes = None,
                  allow_empty: bool = False):
  """Returns a pytree mirroring ``params`` whose leaves are ``BlockInfo`` for
  blocks and ``None`` for the other leaves.

  Raises ValueError when nothing is selected (unless ``allow_empty``) and
  when a selected leaf cannot be a matrix (fewer than 2 dimensions or a
  zero-sized axis).
  """
  pred = make_predicate(structure, include_embedding=include_embedding,
                        include_head=include_head)
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  infos = []
  for path, leaf in leaves_with_path:
    p = path_str(path)
    if not pred(p, leaf):
      infos.append(None)
      continue
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) < 2 or 0 in shape:
      raise ValueError(
          f"parameter '{p}' with shape {shape} was selected as a SALAAD block, "
          "but a block must be a matrix (at least 2 non-empty dimensions); fix "
          "the structure regex/predicate to exclude it.")
    if row_axes is None:
      k = squarest_split(shape)
    elif callable(row_axes):
      k = int(row_axes(p, shape))
    else:
      k = int(row_axes) if len(shape) > 2 else 1
    if not 1 <= k < len(shape):
      raise ValueError(f"row_axes={k} is invalid for '{p}' with shape {shape}")
    infos.append(BlockInfo(p, shape, k))
  if not allow_empty and leaves_with_path and all(i is None for i in infos):
    paths = [path_str(p) for p, _ in leaves_with_path][:8]
    raise ValueError(
        "the SALAAD structure selected no parameter as a block; parameter paths "
        f"look like {paths}. Pass structure= (a regex on these paths or a "
        "predicate) that matches the kernels to structure.")
  return jax.tree_util.tree_unflatten(treedef, infos)


def block_list(infos) -> list[BlockInfo]:
  """The BlockInfo leaves of a ``select_blocks`` tree, in tree order."""
  return [i for i in jax.tree.leaves(infos, is_leaf=lambda x: x is None) if i is not None]


def as_matrix(x, info: BlockInfo):
  """Views a parameter leaf as its (m, n) matrix."""
  return x.reshape(info.matrix_shape)


def from_matrix(x, info: BlockInfo):
  """Inverse of ``as_matrix``."""
  return x.reshape(info.shape)
