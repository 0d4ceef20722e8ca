"""Tokenizers mapping text to int32 token ids and back.

Every tokenizer exposes the same small interface:

* ``vocab_size``: number of token ids, ids lie in ``[0, vocab_size)``;
* ``eos_id``: the id that separates documents in a packed stream (or ``None``
  when the tokenizer has none);
* ``encode(text) -> np.ndarray[int32]`` and ``decode(ids) -> str``;
* ``spec``: a string that identifies the tokenizer (used as a cache key).
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence, Union, runtime_checkable

import numpy as np

Text = Union[str, bytes]


@runtime_checkable
class Tokenizer(Protocol):
  """Interface shared by all tokenizers of this package."""

  @property
  def vocab_size(self) -> int:
    ...

  @property
  def eos_id(self) -> int | None:
    ...

  @property
  def spec(self) -> str:
    ...

  def encode(self, text: Text) -> np.ndarray:
    ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocabulary of 256 ids, id == byte value.

  The NUL byte (id 0), which does not occur in ordinary text, is the document
  separator ``eos_id``. ``decode`` reverses ``encode`` exactly for any string;
  byte sequences that are not valid UTF-8 decode with U+FFFD replacements.
  """

  vocab_size = 256
  eos_id = 0
  spec = 'byte'

  def encode(self, text: Text) -> np.ndarray:
    data = text if isinstance(text, bytes) else text.encode('utf-8')
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
      raise ValueError(
          f'ByteTokenizer.decode: ids must lie in [0, 255], got range '
          f'[{arr.min()}, {arr.max()}].')
    return arr.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


class SentencePieceTokenizer:
  """A SentencePiece model loaded from a ``.model`` file.

  ``sentencepiece`` is imported on construction, so the package does not need
  it unless this tokenizer is used. ``eos_id`` is the model's ``</s>`` id, or
  ``None`` if the model has no end-of-sequence piece.
  """

  def __init__(self, model_path: str | os.PathLike):
    path = os.fspath(model_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'SentencePiece model file not found: {path!r}')
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f'Tokenizer {path!r} needs the `sentencepiece` package: '
          'pip install sentencepiece') from e
    self._path = os.path.abspath(path)
    self._sp = sentencepiece.SentencePieceProcessor(model_file=self._path)

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  @property
  def eos_id(self) -> int | None:
    eos = int(self._sp.eos_id())
    return eos if eos >= 0 else None

  @property
  def spec(self) -> str:
    return self._path

  def encode(self, text: Text) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def __repr__(self) -> str:
    return f'SentencePieceTokenizer({self._path!r})'


def get_tokenizer(spec: str | os.PathLike | Tokenizer) -> Tokenizer:
  """Returns the tokenizer named by ``spec``.

  Args:
    spec: ``'byte'`` for :class:`ByteTokenizer`, a path to a SentencePiece
      ``.model`` file, or an object that already implements
      :class:`Tokenizer` (returned unchanged).

  Raises:
    ValueError: ``spec`` is neither ``'byte'`` nor a ``.model`` path.
    FileNotFoundError: the ``.model`` file does not exist.
  """
  if isinstance(spec, (str, os.PathLike)):
    name = os.fspath(spec)
    if name == 'byte':
      return ByteTokenizer()
    if name.endswith('.model') or os.path.isfile(name):
      return SentencePieceTokenizer(name)
    raise ValueError(
        f"Unknown tokenizer {name!r}: expected 'byte' or a path to a "
        'SentencePiece .model file.')
  if isinstance(spec, Tokenizer):
    return spec
  raise ValueError(
      f"Unknown tokenizer {spec!r}: expected 'byte', a path to a "
      'SentencePiece .model file, or a Tokenizer object.')
