"""``make_dataset``: one entry point from a source string to a batch iterator."""

from __future__ import annotations

import os
from typing import Any

from salaad_jax.data.pipeline import (BatchIterator, SyntheticDataset,
                                      TokenArrayDataset, check_positive,
                                      host_layout)
from salaad_jax.data.sources import (TfdsText, join_documents,
                                     resolve_text_paths, split_stream,
                                     text_file_tokens)
from salaad_jax.data.streaming import DocumentStreamDataset
from salaad_jax.data.synthetic import SyntheticMarkovCorpus
from salaad_jax.data.tokenizers import ByteTokenizer, Tokenizer, get_tokenizer

DEFAULT_MAX_IN_MEMORY_BYTES = 64 << 20

_SYNTHETIC_FIELDS = {'alphabet_size': int, 'order': int, 'branching': int,
                     'concentration': float, 'smoothing': float, 'seed': int}


def parse_synthetic(spec: str) -> SyntheticMarkovCorpus:
  """Corpus from ``'synthetic'`` or ``'synthetic:order=3,alphabet_size=16'``.

  Keys are the arguments of :class:`SyntheticMarkovCorpus`.
  """
  _, _, options = spec.partition(':')
  kwargs: dict[str, Any] = {}
  for item in filter(None, (s.strip() for s in options.split(','))):
    key, eq, value = item.partition('=')
    key = key.strip()
    if not eq or key not in _SYNTHETIC_FIELDS:
      raise ValueError(
          f'Bad synthetic option {item!r} in source {spec!r}: expected '
          f'key=value with key in {sorted(_SYNTHETIC_FIELDS)}')
    try:
      kwargs[key] = _SYNTHETIC_FIELDS[key](value.strip())
    except ValueError as e:
      raise ValueError(
          f'Bad synthetic option {item!r} in source {spec!r}: {e}') from e
  return SyntheticMarkovCorpus(**kwargs)


def _looks_like_path(source: str) -> bool:
  if os.path.exists(os.path.expanduser(source)):
    return True
  return (os.sep in source or '/' in source or source.startswith(('.', '~'))
          or any(c in source for c in '*?[') or bool(os.path.splitext(source)[1]))


def make_dataset(source: str, *, seq_len: int, batch_size: int,
                 split: str = 'train', seed: int = 0,
                 data_dir: str | None = None,
                 tokenizer: str | Tokenizer = 'byte',
                 process_index: int | None = None,
                 process_count: int | None = None,
                 text_key: str = 'text', val_fraction: float = 0.1,
                 max_in_memory_bytes: int | None = DEFAULT_MAX_IN_MEMORY_BYTES,
                 streaming: bool | None = None,
                 corpus: SyntheticMarkovCorpus | None = None,
                 download: bool = True) -> BatchIterator:
  """Batch iterator for ``source``; see :mod:`salaad_jax.data.pipeline`.

  Args:
    source: ``'synthetic'`` (optionally ``'synthetic:key=value,...'`` with the
      arguments of :class:`SyntheticMarkovCorpus`), ``'tfds:<name>'`` (e.g.
      ``'tfds:tiny_shakespeare'``, ``'tfds:c4/en'``), ``'text:<path or glob>'``
      or a bare path / glob of text files.
    seq_len: ``T``, tokens per row.
    batch_size: the global batch ``G``; must be divisible by process_count.
    split: 'train' or 'validation' for text files (the last ``val_fraction``
      of the token stream) and synthetic data (also 'test'); any TFDS split.
    seed: shuffling seed (synthetic: sampling seed; the language itself is
      fixed by the corpus's own seed).
    data_dir: TFDS data directory.
    tokenizer: 'byte', a SentencePiece ``.model`` path, or a Tokenizer.
      Synthetic data are bytes and need 'byte'.
    process_index, process_count: this process's shard of each global batch
      (default: ``jax.process_index()``, ``jax.process_count()``).
    text_key: TFDS feature holding the text.
    val_fraction: held-out tail of local text for split='validation'.
    max_in_memory_bytes: with ``streaming=None``, TFDS splits up to this
      size on disk (or of unknown size, or with fewer than ``batch_size``
      documents) are tokenised into memory and shuffled by window
      (``TokenArrayDataset``); larger ones stream documents
      (``DocumentStreamDataset``).
    streaming: force streaming (True) or in-memory (False) for TFDS sources.
    corpus: the synthetic language (default ``SyntheticMarkovCorpus()`` or
      parsed from ``source``).
    download: let TFDS download and prepare a missing dataset.

  Returns:
    A :class:`BatchIterator` (``TokenArrayDataset``, ``DocumentStreamDataset``
    or ``SyntheticDataset``).

  Raises:
    ValueError: unknown source, TFDS dataset, split or tokenizer; bad sizes;
      ``batch_size`` not divisible by ``process_count``.
    FileNotFoundError: no text file matches the path or glob.
  """
  if not isinstance(source, str) or not source:
    raise ValueError(f'source must be a non-empty string, got {source!r}')
  check_positive(seq_len=seq_len, batch_size=batch_size)
  host_layout(batch_size, process_index, process_count)
  common = dict(seq_len=seq_len, batch_size=batch_size, split=split,
                seed=seed, process_index=process_index,
                process_count=process_count)
  kind, sep, rest = source.partition(':')

  if kind == 'synthetic':
    return _synthetic_dataset(source, corpus, tokenizer, common)

  if kind == 'tfds' and sep:
    if not rest:
      raise ValueError(f"Source {source!r} names no dataset: use 'tfds:<name>'")
    return _tfds_dataset(rest, get_tokenizer(tokenizer), data_dir=data_dir,
                         text_key=text_key, download=download,
                         max_in_memory_bytes=max_in_memory_bytes,
                         streaming=streaming, **common)

  pattern = _text_pattern(source)
  paths = resolve_text_paths(pattern)
  tok = get_tokenizer(tokenizer)
  stream = split_stream(text_file_tokens(paths, tok), split, val_fraction,
                        name=f'text {pattern!r}')
  return TokenArrayDataset(stream, tokenizer=tok, name=f'text {pattern!r}',
                           **common)


def _synthetic_dataset(source: str, corpus, tokenizer, common: dict):
  """The synthetic source's dataset (its language from ``corpus`` or the
  source's options, never both; bytes only)."""
  if corpus is not None and ':' in source:
    raise ValueError(
        f'Source {source!r} has options and corpus is also given; pass one')
  if not (isinstance(tokenizer, ByteTokenizer) or
          (isinstance(tokenizer, str) and tokenizer == 'byte')):
    raise ValueError(
        f"The synthetic source emits bytes and needs tokenizer='byte', got "
        f'{tokenizer!r}')
  return SyntheticDataset(corpus or parse_synthetic(source), **common)


def _text_pattern(source: str) -> str:
  """The path or glob of a text source: after 'text:', or the source itself
  when it looks like a path."""
  kind, sep, rest = source.partition(':')
  if kind == 'text' and sep:
    return rest
  if _looks_like_path(source):
    return source
  raise ValueError(
      f"Unknown data source {source!r}: expected 'synthetic', "
      "'tfds:<name>', 'text:<path or glob>' or a path to text files")


def _tfds_dataset(name: str, tok: Tokenizer, *, data_dir, text_key, download,
                  max_in_memory_bytes, streaming, **common) -> BatchIterator:
  src = TfdsText(name, common['split'], data_dir=data_dir, text_key=text_key,
                 download=download)
  label = f'tfds:{name}'
  split = common['split']
  if streaming is None:
    streaming = (max_in_memory_bytes is not None
                 and src.num_bytes > max_in_memory_bytes
                 and (src.random_access is None
                      or len(src.random_access) >= common['batch_size']))
  if streaming:
    if src.random_access is None:
      raise ValueError(
          f'{label} split {split!r} ({src.num_bytes} bytes) is stored as '
          'TFRecord, but streaming needs random access: prepare it with '
          "file_format='array_record' (tfds build --file_format=array_record), "
          'or read it into memory (streaming=False / larger max_in_memory_bytes)')
    return DocumentStreamDataset(src.random_access, tokenizer=tok,
                                 get_text=src.text, name=label, **common)
  tokens = join_documents((tok.encode(t) for t in src.iter_texts()), tok.eos_id)
  return TokenArrayDataset(tokens, tokenizer=tok, name=label, **common)
