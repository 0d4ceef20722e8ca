"""Our tokenizers as files ``transformers.AutoTokenizer`` loads.

* ``ByteTokenizer`` (id == UTF-8 byte value, NUL = id 0 the end of a
  document): ``tokenizer.json`` of the ``tokenizers`` library, a byte-level
  BPE with the 256 byte symbols of GPT-2's byte-to-unicode map as its
  vocabulary, in byte order, and no merges, so every byte is one token with
  its own value as id; NUL's symbol (U+0100, 'Ā') is the special eos token.
  Decoding maps the symbols back to bytes and reads them as UTF-8 with
  replacement characters, as ``ByteTokenizer.decode`` does.
* ``SentencePieceTokenizer``: ``tokenizer.json`` made by transformers'
  generic SentencePiece converter (``SpmConverter``: the model's own
  normalizer, pieces and unknown id), with no bos/eos added, so the ids are
  SentencePiece's; the ``.model`` is copied beside as ``tokenizer.model``.
  Decoding agrees except for unknown pieces (SentencePiece writes ' ⁇ ',
  transformers the unknown token).
"""

from __future__ import annotations

import os
import shutil
import types

from salaad_jax.data import tokenizers as tk
from salaad_jax.deploy.hf import HFError, write_json


def resolve(tokenizer, vocab_size: int):
  """Our Tokenizer of ``tokenizer`` (None, a spec or an object), checked to
  fit the model's vocabulary; ValueError otherwise."""
  if tokenizer is None:
    return None
  try:
    tok = tk.get_tokenizer(tokenizer)
  except (ValueError, FileNotFoundError, ImportError) as e:
    raise HFError(str(e)) from None
  if tok.vocab_size > vocab_size:
    raise HFError(f"tokenizer {tok.spec!r} has {tok.vocab_size} ids, more than the "
                  f"model's vocabulary of {vocab_size}")
  if not isinstance(tok, (tk.ByteTokenizer, tk.SentencePieceTokenizer)):
    raise HFError(f"no Hugging Face files for tokenizer {tok!r}: only the byte tokenizer "
                  "and SentencePiece models are exported")
  return tok


def byte_symbols() -> list[str]:
  """The symbol of every byte value 0..255 (GPT-2's byte-to-unicode map)."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode  # pylint: disable=import-outside-toplevel
  table = bytes_to_unicode()
  return [table[b] for b in range(256)]


def write(directory: str, tok, max_len: int) -> list[str]:
  """Writes ``tok``'s files into ``directory``; returns their names."""
  if isinstance(tok, tk.ByteTokenizer):
    return _write_byte(directory, max_len)
  return _write_sentencepiece(directory, tok, max_len)


def _write_byte(directory: str, max_len: int) -> list[str]:
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  symbols = byte_symbols()
  tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  eos = symbols[tk.ByteTokenizer.eos_id]
  tok.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
  tok.save(os.path.join(directory, "tokenizer.json"))
  write_json(directory, "tokenizer_config.json", {
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
      "model_max_length": max_len, "clean_up_tokenization_spaces": False,
      "add_bos_token": False, "add_eos_token": False})
  return ["tokenizer.json", "tokenizer_config.json"]


def _write_sentencepiece(directory: str, tok, max_len: int) -> list[str]:
  from transformers.convert_slow_tokenizer import SpmConverter  # pylint: disable=import-outside-toplevel
  # The generic converter reads the model's own normalizer, pieces and
  # unknown id (the model-specific ones, e.g. T5's or LLaMA's, assume theirs).
  SpmConverter(types.SimpleNamespace(vocab_file=tok.spec)).converted().save(
      os.path.join(directory, "tokenizer.json"))
  shutil.copyfile(tok.spec, os.path.join(directory, "tokenizer.model"))
  sp = tok._sp  # pylint: disable=protected-access
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "clean_up_tokenization_spaces": False, "add_bos_token": False,
            "add_eos_token": False}
  for name, i in (("eos", sp.eos_id()), ("unk", sp.unk_id()), ("bos", sp.bos_id()),
                  ("pad", sp.pad_id())):
    if i >= 0:
      config[f"{name}_token"] = sp.id_to_piece(i)
  write_json(directory, "tokenizer_config.json", config)
  return ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
