"""Streaming batches from a random-access collection of documents.

For corpora too large to tokenise up front (C4, LM1B), documents are read and
tokenised on demand. Row ``r`` of every global batch is a *lane*: in epoch
``e`` lane ``r`` reads the documents ``perm_e(r), perm_e(r + G),
perm_e(r + 2G), ...`` (``perm_e`` a seeded pseudo-random permutation of the
``N`` documents, ``G`` the global batch), each followed by ``eos_id``, as one
token stream, and emits consecutive windows of ``T + 1`` tokens with stride
``T``. Lanes are independent, so a process reads only the documents of its own
rows, and every row of a batch comes from a different document stream.

The state of a lane is ``(epoch, doc, offset)``: the next window starts at
token ``offset`` of the lane's ``doc``-th document of ``epoch``. The state of
the iterator is these three numbers for each of this process's lanes; it is
per process (save one state per process).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from salaad_jax.data.pipeline import Batch, BatchIterator, batch_from_ragged
from salaad_jax.data.tokenizers import Text, Tokenizer

_ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser: a bijective 64-bit mixing of ``x``."""
  x = x ^ (x >> np.uint64(30))
  x = x * _M1
  x = x ^ (x >> np.uint64(27))
  x = x * _M2
  return x ^ (x >> np.uint64(31))


class IndexPermutation:
  """A seeded pseudo-random bijection of ``[0, n)`` in O(1) memory.

  A 4-round balanced Feistel network on ``2h`` bits (``4^h >= n``) with
  splitmix64 round functions, restricted to ``[0, n)`` by cycle walking.
  """

  def __init__(self, n: int, seed: Sequence[int] | int):
    if n < 1:
      raise ValueError(f'IndexPermutation needs n >= 1, got {n}')
    self.n = int(n)
    half = max(1, -(-max(1, (self.n - 1).bit_length()) // 2))
    self._half = np.uint64(half)
    self._mask = np.uint64((1 << half) - 1)
    self._keys = np.random.default_rng(seed).integers(
        0, np.iinfo(np.uint64).max, size=_ROUNDS, dtype=np.uint64,
        endpoint=True)

  def _feistel(self, x: np.ndarray) -> np.ndarray:
    left, right = x >> self._half, x & self._mask
    for key in self._keys:
      left, right = right, left ^ (_mix(right ^ key) & self._mask)
    return (left << self._half) | right

  def __call__(self, index: np.ndarray | int) -> np.ndarray:
    x = np.asarray(index, dtype=np.uint64)
    if x.size and (x.max() >= self.n):
      raise IndexError(f'index out of range [0, {self.n})')
    with np.errstate(over='ignore'):
      out = self._feistel(x.reshape(-1))
      bad = out >= self.n
      while bad.any():
        out[bad] = self._feistel(out[bad])
        bad = out >= self.n
    return out.astype(np.int64).reshape(x.shape)


class _Lane:
  """Reads one lane's token stream; position ``(epoch, doc, offset)``."""

  def __init__(self, owner: 'DocumentStreamDataset', lane: int, finite: bool):
    self.owner, self.lane, self.finite = owner, lane, finite
    self.epoch = self.doc = self.offset = 0
    self._cache: dict[tuple[int, int], np.ndarray] = {}

  def _next_doc(self, epoch: int, doc: int) -> tuple[int, int] | None:
    if doc + 1 < self.owner.lane_length(self.lane):
      return epoch, doc + 1
    return None if self.finite else (epoch + 1, 0)

  def _tokens(self, epoch: int, doc: int) -> np.ndarray:
    key = (epoch, doc)
    if key not in self._cache:
      self._cache[key] = self.owner.doc_tokens(self.lane, epoch, doc)
    return self._cache[key]

  def read(self, length: int) -> np.ndarray | None:
    """The next ``length`` tokens (fewer at the end of a finite stream)."""
    pieces, have = [], 0
    pos: tuple[int, int] | None = (self.epoch, self.doc)
    offset, empty_docs = self.offset, 0
    while pos is not None and have < length:
      toks = self._tokens(*pos)[offset:offset + length - have]
      pieces.append(toks)
      have += toks.size
      empty_docs = 0 if toks.size else empty_docs + 1
      if empty_docs > self.owner.lane_length(self.lane) + 1:
        raise ValueError(
            f'{self.owner.name}: lane {self.lane} found no tokens in a whole '
            'epoch of documents (empty documents and no eos_id)')
      pos, offset = self._next_doc(*pos), 0
    if have == 0:
      return None
    return np.concatenate(pieces)

  def advance(self, count: int) -> None:
    """Moves the position ``count`` tokens forward (or to the stream end)."""
    while True:
      size = self._tokens(self.epoch, self.doc).size
      if self.offset + count < size:
        self.offset += count
        break
      count -= size - self.offset
      nxt = self._next_doc(self.epoch, self.doc)
      if nxt is None:
        self.offset = size
        break
      self.epoch, self.doc = nxt
      self.offset = 0
    for key in [k for k in self._cache if k < (self.epoch, self.doc)]:
      del self._cache[key]


class DocumentStreamDataset(BatchIterator):
  """Streaming batches from ``N >= G`` documents read by index.

  Args:
    documents: a random-access sequence of documents (``len`` and integer
      indexing; items are ``str``/``bytes``, or anything ``get_text`` maps to
      them).
    get_text: maps an item of ``documents`` to its text (default: identity).
    seq_len, batch_size, tokenizer, split, seed, process_index,
      process_count: as in :class:`BatchIterator`.
    name: used in error messages.
  """

  def __init__(self, documents: Sequence[Any], *, seq_len: int,
               batch_size: int, tokenizer: Tokenizer, split: str = 'train',
               seed: int = 0, process_index: int | None = None,
               process_count: int | None = None,
               get_text: Callable[[Any], Text] | None = None,
               name: str = 'documents'):
    super().__init__(seq_len=seq_len, batch_size=batch_size,
                     tokenizer=tokenizer, split=split, seed=seed,
                     process_index=process_index, process_count=process_count)
    self.documents = documents
    self.num_documents = len(documents)
    self.name = name
    self._get_text = get_text or (lambda x: x)
    if self.num_documents < self.batch_size:
      raise ValueError(
          f'{name} split {split!r} has {self.num_documents} documents, fewer '
          f'than batch_size={self.batch_size} streaming lanes')
    self._perms: dict[int, IndexPermutation] = {}
    self._lanes = [_Lane(self, r, finite=False) for r in self._lane_ids()]

  def _lane_ids(self) -> range:
    return range(self._first_row, self._first_row + self.local_batch_size)

  def lane_length(self, lane: int) -> int:
    """Documents of ``lane`` per epoch: ``ceil((N - lane) / G)``."""
    return -(-(self.num_documents - lane) // self.batch_size)

  def document_index(self, lane: int, epoch: int, doc: int) -> int:
    """Index in ``documents`` of the ``doc``-th document of ``lane``."""
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = IndexPermutation(self.num_documents, [self.seed, epoch])
    return int(self._perms[epoch](lane + doc * self.batch_size))

  def doc_tokens(self, lane: int, epoch: int, doc: int) -> np.ndarray:
    text = self._get_text(self.documents[self.document_index(lane, epoch, doc)])
    toks = self.tokenizer.encode(text)
    if self.tokenizer.eos_id is not None:
      toks = np.append(toks, np.int32(self.tokenizer.eos_id))
    return toks.astype(np.int32)

  def __next__(self) -> Batch:
    rows = []
    for lane in self._lanes:
      rows.append(lane.read(self.seq_len + 1))
      lane.advance(self.seq_len)
    return batch_from_ragged(rows, self.seq_len)

  def get_state(self) -> dict[str, Any]:
    return {
        'epoch': [ln.epoch for ln in self._lanes],
        'doc': [ln.doc for ln in self._lanes],
        'offset': [ln.offset for ln in self._lanes],
        **self._signature(),
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    state = self._checked(state, ('epoch', 'doc', 'offset'))
    cols = [np.asarray(state[k], dtype=np.int64).reshape(-1)
            for k in ('epoch', 'doc', 'offset')]
    if any(c.size != self.local_batch_size for c in cols):
      raise ValueError(
          f'{type(self).__name__}.set_state: expected {self.local_batch_size} '
          f'lanes, got {[c.size for c in cols]}')
    lanes = [_Lane(self, r, finite=False) for r in self._lane_ids()]
    for lane, e, d, o in zip(lanes, *cols):
      lane.epoch, lane.doc, lane.offset = int(e), int(d), int(o)
    self._lanes = lanes

  def _signature(self) -> dict[str, int]:
    return {**super()._signature(), 'process_index': self.process_index,
            'process_count': self.process_count,
            'num_documents': self.num_documents}

  def eval_batches(self, num_batches: int | None = None) -> Iterator[Batch]:
    """``num_batches`` batches of one pass over epoch 0 of every lane.

    Lanes that run out are padded (mask 0); the count is fixed so that all
    processes yield the same number of batches.
    """
    if num_batches is None:
      raise ValueError(
          f'{self.name}: streaming eval_batches needs num_batches (the split '
          'is read lazily and its length in batches is unknown)')
    lanes = [_Lane(self, r, finite=True) for r in self._lane_ids()]
    for _ in range(int(num_batches)):
      rows = []
      for lane in lanes:
        w = lane.read(self.seq_len + 1)
        rows.append(w if w is not None and w.size >= 2 else None)
        lane.advance(self.seq_len)
      yield batch_from_ragged(rows, self.seq_len)
