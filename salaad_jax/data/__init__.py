"""Deterministic, resumable input pipelines of fixed-length token batches.

``make_dataset(source, seq_len=..., batch_size=...)`` turns ``'synthetic'``,
``'tfds:<name>'`` or a path / glob of text files into an iterator of
``{'inputs', 'targets', 'mask'}`` batches with ``get_state`` / ``set_state``.
"""

from salaad_jax.data.factory import make_dataset, parse_synthetic
from salaad_jax.data.pipeline import (Batch, BatchIterator, SyntheticDataset,
                                      TokenArrayDataset)
from salaad_jax.data.sources import TfdsText, resolve_text_paths
from salaad_jax.data.streaming import DocumentStreamDataset, IndexPermutation
from salaad_jax.data.synthetic import SyntheticMarkovCorpus
from salaad_jax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer,
                                        Tokenizer, get_tokenizer)

__all__ = [
    'Batch', 'BatchIterator', 'ByteTokenizer', 'DocumentStreamDataset',
    'IndexPermutation', 'SentencePieceTokenizer', 'SyntheticDataset',
    'SyntheticMarkovCorpus', 'TfdsText', 'TokenArrayDataset', 'Tokenizer',
    'get_tokenizer', 'make_dataset', 'parse_synthetic', 'resolve_text_paths',
]
