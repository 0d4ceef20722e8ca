"""Our tokenizers as files ``transformers.AutoTokenizer`` loads.

* ``ByteTokenizer`` (id == UTF-8 byte value, NUL = id 0 the end of a
  document): ``tokenizer.json`` of the ``tokenizers`` library, a byte-level
  BPE with the 256 byte symbols of GPT-2's byte-to-unicode map as its
  vocabulary, in byte order, and no merges, so every byte is one token with
  its own value as id; NUL's symbol (U+0100, 'Ā') is the special eos token.
  Decoding maps the symbols back to bytes and reads them as UTF-8 with
  replacement characters, as ``ByteTokenizer.decode`` does.
* ``SentencePieceTokenizer``: its ``.model`` copied as ``tokenizer.model``,
  loaded as ``T5Tokenizer`` when its special ids are T5's (pad 0, eos 1,
  unk 2) and as ``LlamaTokenizer`` otherwise, both without added bos/eos.
  transformers converts it to a ``tokenizers`` pipeline, which agrees with
  SentencePiece on ordinary text; unknown characters and runs of spaces can
  tokenize differently (the conversion's, not ours).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

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


def _special_ids(tok) -> dict[str, Optional[int]]:
  sp = tok._sp  # pylint: disable=protected-access
  ids = {"pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "bos": sp.bos_id()}
  return {k: (int(v) if v >= 0 else None) for k, v in ids.items()}


def _write_sentencepiece(directory: str, tok, max_len: int) -> list[str]:
  shutil.copyfile(tok.spec, os.path.join(directory, "tokenizer.model"))
  ids = _special_ids(tok)
  piece = lambda i: None if i is None else tok._sp.id_to_piece(i)  # pylint: disable=protected-access
  t5 = (ids["pad"], ids["eos"], ids["unk"]) == (0, 1, 2)
  config = {"tokenizer_class": "T5Tokenizer" if t5 else "LlamaTokenizer",
            "model_max_length": max_len, "clean_up_tokenization_spaces": False,
            "add_bos_token": False, "add_eos_token": False, "legacy": False,
            "eos_token": piece(ids["eos"]), "unk_token": piece(ids["unk"])}
  if t5:
    config.update(pad_token=piece(ids["pad"]), extra_ids=0)
  else:
    config.update(bos_token=piece(ids["bos"]))
  write_json(directory, "tokenizer_config.json", config)
  return ["tokenizer.model", "tokenizer_config.json"]
