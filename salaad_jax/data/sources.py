"""Document sources: local text files and TFDS datasets.

Local files are tokenised once per (files, tokenizer) and kept in memory as
one int32 stream: each file is a document followed by ``eos_id``. TFDS
datasets are opened through ``tensorflow_datasets`` (imported lazily), by
random access (``as_data_source``, ArrayRecord data, no TensorFlow needed) or,
for datasets stored as TFRecord, by sequential reading (``as_dataset``, needs
TensorFlow).
"""

from __future__ import annotations

import difflib
import functools
import glob
import os
import re
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from salaad_jax.data.tokenizers import Text, Tokenizer

_GLOB_CHARS = frozenset('*?[')


def resolve_text_paths(pattern: str) -> list[str]:
  """Files named by a path or a glob pattern, sorted.

  Raises:
    FileNotFoundError: naming ``pattern`` when no file matches.
  """
  expanded = os.path.expanduser(pattern)
  if _GLOB_CHARS & set(expanded):
    paths = sorted(p for p in glob.glob(expanded, recursive=True)
                   if os.path.isfile(p))
    if not paths:
      raise FileNotFoundError(f'No text file matches the pattern {pattern!r}')
    return paths
  if os.path.isdir(expanded):
    raise FileNotFoundError(
        f'Text source {pattern!r} is a directory; pass a file or a glob such '
        f'as {os.path.join(pattern, "*.txt")!r}')
  if not os.path.isfile(expanded):
    hint = ''
    if not os.path.splitext(pattern)[1] and not os.path.isabs(expanded):
      hint = f" (for a TFDS dataset use 'tfds:{pattern}')"
    raise FileNotFoundError(f'Text file not found: {pattern!r}{hint}')
  return [expanded]


def join_documents(token_docs: Iterable[np.ndarray],
                   eos_id: int | None) -> np.ndarray:
  """Concatenates token arrays, each followed by ``eos_id`` if not None."""
  parts = []
  for toks in token_docs:
    parts.append(np.asarray(toks, dtype=np.int32))
    if eos_id is not None:
      parts.append(np.asarray([eos_id], dtype=np.int32))
  if not parts:
    return np.zeros(0, np.int32)
  return np.concatenate(parts)


@functools.lru_cache(maxsize=8)
def _cached_file_tokens(paths: tuple[str, ...], stamps: tuple[Any, ...],
                        tokenizer: Tokenizer) -> np.ndarray:
  del stamps  # Part of the cache key only: a changed file is re-read.
  def docs():
    for path in paths:
      with open(path, 'rb') as f:
        yield tokenizer.encode(f.read())
  stream = join_documents(docs(), tokenizer.eos_id)
  stream.setflags(write=False)
  return stream


def text_file_tokens(paths: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
  """The token stream of ``paths`` (read-only array, cached in memory)."""
  paths = tuple(os.path.abspath(p) for p in paths)
  stamps = tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)
  return _cached_file_tokens(paths, stamps, _TokenizerKey(tokenizer))


class _TokenizerKey:
  """Hashable wrapper of a tokenizer, equal when ``spec`` is equal."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __hash__(self) -> int:
    return hash((type(self.tokenizer).__name__, self.tokenizer.spec))

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, _TokenizerKey) and
            type(self.tokenizer) is type(other.tokenizer) and
            self.tokenizer.spec == other.tokenizer.spec)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.tokenizer, name)


_SLICE = re.compile(r'^(train|validation)\[(\d{1,3})?%?:(\d{1,3})?%?\]$')


def split_stream(tokens: np.ndarray, split: str, val_fraction: float,
                 name: str) -> np.ndarray:
  """'train': the first ``1 - val_fraction`` of ``tokens``; 'validation': the rest.

  A percent slice of either, as in TFDS (``'validation[50%:]'``, ``'train[:10%]'``),
  takes that part of the split's tokens, e.g. a selection set disjoint from
  the first validation batches.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f'val_fraction must lie in (0, 1), got {val_fraction}')
  cut = int(round(tokens.size * (1.0 - val_fraction)))
  sliced = _SLICE.match(split) if isinstance(split, str) else None
  if sliced:
    part = split_stream(tokens, sliced.group(1), val_fraction, name)
    lo, hi = (int(g) if g is not None else d for g, d in zip(sliced.groups()[1:], (0, 100)))
    if not lo < hi <= 100:
      raise ValueError(f'Split {split!r} of {name}: the slice must be [a%:b%] with '
                       '0 <= a < b <= 100')
    return part[int(round(part.size * lo / 100)):int(round(part.size * hi / 100))]
  if split == 'train':
    return tokens[:cut]
  if split == 'validation':
    return tokens[cut:]
  raise ValueError(
      f"Unknown split {split!r} for {name}: local text has 'train' and "
      "'validation' (the last val_fraction of the tokens), or a percent slice of "
      "either such as 'validation[50%:]'")


def import_tfds():
  """Imports ``tensorflow_datasets`` or raises an ImportError saying how to."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'TFDS sources need the `tensorflow-datasets` package: '
        'pip install tensorflow-datasets') from e
  return tfds


def _unknown_dataset_message(tfds, name: str) -> str:
  base = name.split(':')[0].split('/')[0]
  try:
    known = tfds.list_builders(with_community_datasets=False)
  except Exception:  # pylint: disable=broad-except
    known = []
  close = difflib.get_close_matches(base, known, n=3)
  hint = f'; did you mean {close}?' if close else ' (see tfds.list_builders())'
  return f'Unknown TFDS dataset {name!r}{hint}'


class TfdsText:
  """The text feature of one split of a TFDS dataset.

  Attributes:
    name: the TFDS name (``'c4/en'``, ``'tiny_shakespeare'``, ...).
    split: the split string (any TFDS split expression).
    text_key: the feature holding the text.
    num_bytes: size of the split on disk as recorded by TFDS (0 if unknown).
    random_access: the ``as_data_source`` sequence of examples, or None if the
      data are not stored in a random-access format.
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               text_key: str = 'text', download: bool = True):
    tfds = import_tfds()
    self.name, self.split, self.text_key = name, split, text_key
    try:
      self._builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(_unknown_dataset_message(tfds, name)) from e
    features = getattr(self._builder.info, 'features', None)
    keys = list(features.keys()) if hasattr(features, 'keys') else []
    if keys and text_key not in keys:
      raise ValueError(
          f'TFDS dataset {name!r} has no feature {text_key!r} (text_key); '
          f'its features are {keys}')
    if download:
      self._builder.download_and_prepare(file_format='array_record')
    self.num_bytes = self._split_bytes()
    try:
      self.random_access = self._builder.as_data_source(split=split)
    except NotImplementedError:
      self.random_access = None
    except (KeyError, ValueError) as e:
      raise ValueError(
          f'Unknown split {split!r} of TFDS dataset {name!r}: {e}') from e

  def _split_bytes(self) -> int:
    try:
      return int(self._builder.info.splits[self.split].num_bytes or 0)
    except Exception:  # pylint: disable=broad-except
      return 0  # Split sizes unknown (e.g. metadata not generated).

  def text(self, example: Any) -> Text:
    try:
      value = example[self.text_key]
    except (KeyError, TypeError) as e:
      keys = list(example) if hasattr(example, 'keys') else type(example)
      raise ValueError(
          f'TFDS dataset {self.name!r}: examples have no {self.text_key!r} '
          f'(text_key); keys: {keys}') from e
    if isinstance(value, np.ndarray):
      value = value.item()
    return value

  def iter_texts(self) -> Iterator[Text]:
    """All texts of the split, in storage order."""
    if self.random_access is not None:
      for i in range(len(self.random_access)):
        yield self.text(self.random_access[i])
      return
    try:
      ds = self._builder.as_dataset(split=self.split, shuffle_files=False)
    except (KeyError, ValueError) as e:
      raise ValueError(
          f'Unknown split {self.split!r} of TFDS dataset {self.name!r}: {e}'
      ) from e
    except ImportError as e:
      raise ImportError(
          f'TFDS dataset {self.name!r} is stored as TFRecord; reading it needs '
          'TensorFlow (pip install tensorflow-cpu), or prepare it with '
          "file_format='array_record'") from e
    tfds = import_tfds()
    for ex in tfds.as_numpy(ds):
      yield self.text(ex)
