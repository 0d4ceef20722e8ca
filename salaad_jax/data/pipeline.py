"""Resumable iterators of fixed-length next-token batches.

A batch is a dict of host-local numpy arrays

    {'inputs': int32[B, T], 'targets': int32[B, T], 'mask': float32[B, T]}

cut from windows ``w`` of ``T + 1`` tokens: ``inputs = w[:-1]``,
``targets = w[1:]``; ``mask`` is 1 on real tokens and 0 on padding (padding
only occurs in the last batches of a finite evaluation pass).

Sharding contract: ``batch_size`` is the global batch ``G``; process ``p`` of
``P`` yields rows ``[p * G / P, (p + 1) * G / P)`` of the global batch, so the
local batches of all processes, concatenated in process order, equal the batch
a single process (``P = 1``) yields. ``G % P == 0`` is required.

Resumption: ``get_state()`` returns a JSON-serialisable dict (ints and lists
of ints, e.g. for ``orbax.checkpoint.args.JsonSave``); after
``set_state(state)`` the iterator yields exactly the batches it would have
yielded after the call to ``get_state()``. :meth:`eval_batches` is a separate
finite pass from the start of the split that neither reads nor changes that
state.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from salaad_jax.data.synthetic import SyntheticMarkovCorpus
from salaad_jax.data.tokenizers import ByteTokenizer, Tokenizer

Batch = dict[str, np.ndarray]

SYNTHETIC_SPLITS = ('train', 'validation', 'test')


def host_layout(batch_size: int, process_index: int | None,
                process_count: int | None) -> tuple[int, int, int, int]:
  """Resolves ``(process_index, process_count, local_batch, first_row)``.

  ``None`` means the running JAX process (``jax.process_index()`` /
  ``jax.process_count()``).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  process_index, process_count = int(process_index), int(process_count)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} must lie in [0, process_count='
        f'{process_count})')
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
        f'batch_size={batch_size} (the global batch) must be a positive '
        f'multiple of process_count={process_count}')
  local = batch_size // process_count
  return process_index, process_count, local, process_index * local


def check_positive(**values: int) -> None:
  """Raises ValueError naming the first argument that is not an int >= 1."""
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')


def batch_from_windows(windows: np.ndarray) -> Batch:
  """Batch from full windows ``int[B, T + 1]`` (mask all ones)."""
  windows = np.asarray(windows, dtype=np.int32)
  return {
      'inputs': np.ascontiguousarray(windows[:, :-1]),
      'targets': np.ascontiguousarray(windows[:, 1:]),
      'mask': np.ones((windows.shape[0], windows.shape[1] - 1), np.float32),
  }


def batch_from_ragged(windows: list[np.ndarray | None], seq_len: int) -> Batch:
  """Batch from windows of at most ``T + 1`` tokens; ``None`` rows are padding."""
  rows = len(windows)
  inputs = np.zeros((rows, seq_len), np.int32)
  targets = np.zeros((rows, seq_len), np.int32)
  mask = np.zeros((rows, seq_len), np.float32)
  for r, w in enumerate(windows):
    if w is None or len(w) < 2:
      continue
    m = len(w) - 1
    inputs[r, :m] = w[:-1]
    targets[r, :m] = w[1:]
    mask[r, :m] = 1.0
  return {'inputs': inputs, 'targets': targets, 'mask': mask}


class BatchIterator:
  """Common interface of the datasets of this package.

  Attributes:
    seq_len: ``T``, tokens per row of ``inputs`` / ``targets``.
    batch_size: the global batch ``G``.
    local_batch_size: ``G / process_count``, rows yielded on this process.
    process_index, process_count: this process's shard of every batch.
    tokenizer: the :class:`Tokenizer` whose ids fill the batches.
    vocab_size: ``tokenizer.vocab_size``.
    split: the split name.
    entropy_rate: nats per token of the source, or ``None`` if unknown.
    loss_floor: Bayes-optimal mean loss per target for windows of ``seq_len``,
      or ``None`` if unknown.
  """

  entropy_rate: float | None = None
  loss_floor: float | None = None

  def __init__(self, *, seq_len: int, batch_size: int, tokenizer: Tokenizer,
               split: str, seed: int, process_index: int | None,
               process_count: int | None):
    check_positive(seq_len=seq_len, batch_size=batch_size)
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.tokenizer = tokenizer
    self.split = split
    self.seed = int(seed)
    (self.process_index, self.process_count, self.local_batch_size,
     self._first_row) = host_layout(self.batch_size, process_index, process_count)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> Batch:
    raise NotImplementedError

  def get_state(self) -> dict[str, Any]:
    raise NotImplementedError

  def set_state(self, state: Mapping[str, Any]) -> None:
    raise NotImplementedError

  def eval_batches(self, num_batches: int | None = None) -> Iterator[Batch]:
    raise NotImplementedError

  def _signature(self) -> dict[str, int]:
    """State entries that must match on restore."""
    return {'seq_len': self.seq_len, 'batch_size': self.batch_size}

  def _checked(self, state: Mapping[str, Any], keys: tuple[str, ...]):
    """Validates ``state`` against this iterator; returns it as a dict."""
    state = dict(state)
    missing = [k for k in (*keys, *self._signature()) if k not in state]
    if missing:
      raise ValueError(
          f'{type(self).__name__}.set_state: state lacks keys {missing}; '
          f'got keys {sorted(state)}')
    for k, v in self._signature().items():
      if int(np.asarray(state[k])) != v:
        raise ValueError(
            f'{type(self).__name__}.set_state: state has {k}='
            f'{int(np.asarray(state[k]))} but this iterator has {k}={v}')
    return state

  def _rows(self) -> slice:
    return slice(self._first_row, self._first_row + self.local_batch_size)

  def __repr__(self) -> str:
    return (f'{type(self).__name__}(split={self.split!r}, seq_len={self.seq_len}, '
            f'batch_size={self.batch_size}, process={self.process_index}/'
            f'{self.process_count})')


class TokenArrayDataset(BatchIterator):
  """Batches cut from one in-memory token stream.

  The stream ``s`` of ``N`` tokens is cut into ``W = (N - 1) // T`` windows
  ``s[i T : i T + T + 1]``; their targets are disjoint and cover
  ``s[1 : W T + 1]``. Training iterates forever: epoch ``e`` visits the
  windows in the order of a permutation seeded by ``(seed, e)``, in
  ``W // G`` global batches (the ``W mod G`` windows left over differ from
  epoch to epoch). State: ``{'epoch', 'step'}`` (``step`` = batches taken
  in the epoch). :meth:`eval_batches` visits all windows in stream order,
  plus a shorter last window holding the tail, padding the last batch.
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int,
               tokenizer: Tokenizer, split: str = 'train', seed: int = 0,
               process_index: int | None = None,
               process_count: int | None = None, name: str = 'tokens'):
    super().__init__(seq_len=seq_len, batch_size=batch_size,
                     tokenizer=tokenizer, split=split, seed=seed,
                     process_index=process_index, process_count=process_count)
    self.tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    self.name = name
    if self.tokens.size < 2:
      raise ValueError(
          f'{name} split {split!r} holds {self.tokens.size} tokens; at least 2 '
          'are needed for one target')
    self.num_windows = (self.tokens.size - 1) // self.seq_len
    self._epoch = 0
    self._step = 0
    self._perm_epoch = -1
    self._perm = np.zeros(0, np.int64)

  @property
  def steps_per_epoch(self) -> int:
    return self.num_windows // self.batch_size

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm = rng.permutation(self.num_windows)
      self._perm_epoch = epoch
    return self._perm

  def _windows(self, starts: np.ndarray) -> np.ndarray:
    idx = starts[:, None] + np.arange(self.seq_len + 1)
    return self.tokens[idx]

  def __next__(self) -> Batch:
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'{self.name} split {self.split!r} has {self.tokens.size} tokens = '
          f'{self.num_windows} windows of seq_len+1={self.seq_len + 1}, fewer '
          f'than batch_size={self.batch_size}; use a smaller batch or seq_len')
    if self._step >= self.steps_per_epoch:
      self._epoch += 1
      self._step = 0
    perm = self._permutation(self._epoch)
    ids = perm[self._step * self.batch_size:(self._step + 1) * self.batch_size]
    self._step += 1
    return batch_from_windows(self._windows(ids[self._rows()] * self.seq_len))

  def get_state(self) -> dict[str, Any]:
    return {'epoch': self._epoch, 'step': self._step, **self._signature()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    state = self._checked(state, ('epoch', 'step'))
    self._epoch = int(np.asarray(state['epoch']))
    self._step = int(np.asarray(state['step']))

  @property
  def epoch(self) -> int:
    return self._epoch

  def num_eval_batches(self) -> int:
    """Global batches in a full :meth:`eval_batches` pass."""
    total = -(-(self.tokens.size - 1) // self.seq_len)
    return -(-total // self.batch_size)

  def eval_batches(self, num_batches: int | None = None) -> Iterator[Batch]:
    """The split once, in stream order: ``min(num_batches, all)`` batches."""
    n = self.num_eval_batches()
    if num_batches is not None:
      n = min(n, int(num_batches))
    last = self.tokens.size - 1  # Index of the last token (a target).
    for b in range(n):
      rows = np.arange(b * self.batch_size, (b + 1) * self.batch_size)[self._rows()]
      starts = rows * self.seq_len
      if starts[-1] + self.seq_len <= last:
        yield batch_from_windows(self._windows(starts))
      else:
        yield batch_from_ragged(
            [self.tokens[s:s + self.seq_len + 1] if s < last else None
             for s in starts], self.seq_len)


class SyntheticDataset(BatchIterator):
  """Batches of independent stationary sequences from a Markov corpus.

  Global batch ``b`` of split ``s`` is driven by uniforms from
  ``np.random.default_rng([corpus.seed, seed, s, b])``, so batches are
  random-access and splits ('train', 'validation', 'test') are disjoint
  streams of the same language. Training iterates forever; state is
  ``{'step'}``. :meth:`eval_batches` yields the first ``num_batches`` batches
  of the split.
  """

  def __init__(self, corpus: SyntheticMarkovCorpus | None = None, *,
               seq_len: int, batch_size: int, split: str = 'train',
               seed: int = 0, process_index: int | None = None,
               process_count: int | None = None):
    if split not in SYNTHETIC_SPLITS:
      raise ValueError(
          f'synthetic split must be one of {SYNTHETIC_SPLITS}, got {split!r}')
    super().__init__(seq_len=seq_len, batch_size=batch_size,
                     tokenizer=ByteTokenizer(), split=split, seed=seed,
                     process_index=process_index, process_count=process_count)
    self.corpus = corpus if corpus is not None else SyntheticMarkovCorpus()
    self.entropy_rate = self.corpus.entropy_rate
    self.loss_floor = self.corpus.loss_floor(self.seq_len)
    self._split_id = SYNTHETIC_SPLITS.index(split)
    self._step = 0

  def batch(self, index: int) -> Batch:
    """Local rows of global batch ``index``."""
    rng = np.random.default_rng(
        [self.corpus.seed, self.seed, self._split_id, int(index)])
    u = rng.random((self.batch_size, self.seq_len + 1))[self._rows()]
    return batch_from_windows(self.corpus.sample_from_uniforms(u))

  def __next__(self) -> Batch:
    out = self.batch(self._step)
    self._step += 1
    return out

  def get_state(self) -> dict[str, Any]:
    return {'step': self._step, **self._signature()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    state = self._checked(state, ('step',))
    self._step = int(np.asarray(state['step']))

  def eval_batches(self, num_batches: int | None = None) -> Iterator[Batch]:
    if num_batches is None:
      raise ValueError(
          'the synthetic corpus is infinite: eval_batches needs num_batches')
    for b in range(int(num_batches)):
      yield self.batch(b)
