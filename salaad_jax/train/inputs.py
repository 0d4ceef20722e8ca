"""Training and evaluation datasets of a TrainConfig."""

from __future__ import annotations

from salaad_jax.data import get_tokenizer, make_dataset
from salaad_jax.train.config import TrainConfig, TrainError


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _dataset(config: TrainConfig, split: str, batch_size: int, **layout):
  try:
    tokenizer = get_tokenizer(config.tokenizer)
  except (ValueError, OSError, ImportError) as e:
    raise TrainError(f"--tokenizer={config.tokenizer}: {_first_line(e)}") from None
  try:
    return make_dataset(config.source, seq_len=config.seq_len, batch_size=batch_size,
                        split=split, seed=config.data_seed, data_dir=config.data_dir or None,
                        tokenizer=tokenizer, **layout)
  except FileNotFoundError as e:
    raise TrainError(f"--source={config.source}: {_first_line(e)}") from None
  except (ValueError, ImportError, OSError) as e:
    raise TrainError(f"--source={config.source} (split {split!r}): {_first_line(e)}") from None


def make_train_dataset(config: TrainConfig):
  """The resumable training iterator (this process's rows of each global batch)."""
  return _dataset(config, config.train_split, config.batch_size)


def make_eval_dataset(config: TrainConfig, split: str = "validation", *,
                      whole_batches: bool = False):
  """The held-out iterator of ``split`` at the evaluation batch size: this
  process's rows of each batch, or with ``whole_batches`` all of them (every
  process of a multi-host job evaluating the same batches on its own)."""
  layout = dict(process_index=0, process_count=1) if whole_batches else {}
  return _dataset(config, split, config.eval_batch_size or config.batch_size, **layout)


def calibration_dataset(config: TrainConfig):
  """Training batches for a method's calibration, in another order than the
  training iterator's (which it leaves untouched)."""
  return make_train_dataset(config.replace(data_seed=config.data_seed + 1))
