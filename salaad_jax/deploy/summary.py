"""``<workdir>/summary.json``: one trained model's headline numbers, for tables.

Any app that trains or compresses a model can leave a summary that the
capacity-spectrum tool (``salaad_jax.deploy.spectrum``) plots as one labelled
point next to the SALAAD curves.  The file is one JSON object:

    {"format_version": 1,
     "method": "sltrain",          # what produced the model (also the label)
     "label": "SLTrain r=128",     # optional display name; default: method
     "params": 41250000,           # stored parameter count P
     "bytes": 82500000,            # deployment bytes
     "perplexity": 31.2,           # validation perplexity exp(loss)
     "loss": 3.44,                 # optional: validation loss (nats per token)
     "sparsity": 0.97,             # optional: share of zero weights in the blocks
     "dense_params": 58000000,     # optional: P_model of the dense counterpart
     "fmt": "coo", "dtype": "bfloat16", "step": 11000,   # optional
     "extra": {...}}               # optional: anything JSON-able

``write_summary`` validates and writes it atomically (temporary file, then
rename); ``read_summary`` validates what it reads and raises ValueError with
one line naming the file and the field.  The module needs only the
standard library, so any layer can write a summary.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

SUMMARY_FILE = "summary.json"
FORMAT_VERSION = 1
_REQUIRED = ("method", "params", "bytes", "perplexity")
_OPTIONAL = ("label", "loss", "sparsity", "dense_params", "fmt", "dtype", "step", "extra")


def summary_path(workdir: str) -> str:
  """``<workdir>/summary.json``, or ``workdir`` itself when it names a .json file."""
  workdir = os.fspath(workdir)
  if workdir.endswith(".json"):
    return workdir
  return os.path.join(workdir, SUMMARY_FILE)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_summary(summary: dict, where: str = "summary") -> dict:
  """Checks the fields of a summary; returns it with ``label`` filled in.

  Raises:
    ValueError: a missing or ill-typed field, or an unknown one.
  """
  if not isinstance(summary, dict):
    raise ValueError(f"{where}: a summary is a JSON object, got {type(summary).__name__}")
  missing = [k for k in _REQUIRED if k not in summary]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}")
  unknown = sorted(set(summary) - set(_REQUIRED) - set(_OPTIONAL) - {"format_version"})
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; put free-form data under 'extra'")
  version = summary.get("format_version", FORMAT_VERSION)
  if version != FORMAT_VERSION:
    raise ValueError(f"{where}: format_version {version!r} is not {FORMAT_VERSION}")
  if not isinstance(summary["method"], str) or not summary["method"]:
    raise ValueError(f"{where}: 'method' must be a non-empty string")
  for key in ("params", "bytes"):
    if not _is_int(summary[key]) or summary[key] <= 0:
      raise ValueError(f"{where}: '{key}' must be a positive integer, got {summary[key]!r}")
  dense = summary.get("dense_params")
  if dense is not None and (not _is_int(dense) or dense <= 0):
    raise ValueError(f"{where}: 'dense_params' must be a positive integer, got {dense!r}")
  ppl = summary["perplexity"]
  if not _is_real(ppl) or ppl < 1.0:
    raise ValueError(f"{where}: 'perplexity' must be a finite number >= 1, got {ppl!r}")
  loss = summary.get("loss")
  if loss is not None and (not _is_real(loss) or loss < 0):
    raise ValueError(f"{where}: 'loss' must be a finite number >= 0, got {loss!r}")
  sparsity = summary.get("sparsity")
  if sparsity is not None and (not _is_real(sparsity) or not 0.0 <= sparsity <= 1.0):
    raise ValueError(f"{where}: 'sparsity' must lie in [0, 1], got {sparsity!r}")
  step = summary.get("step")
  if step is not None and (not _is_int(step) or step < 0):
    raise ValueError(f"{where}: 'step' must be an integer >= 0, got {step!r}")
  for key in ("label", "fmt", "dtype"):
    if summary.get(key) is not None and not isinstance(summary[key], str):
      raise ValueError(f"{where}: '{key}' must be a string, got {summary[key]!r}")
  out = dict(summary, format_version=FORMAT_VERSION)
  out["label"] = summary.get("label") or summary["method"]
  return out


def write_summary(workdir: str, *, method: str, params: int, bytes: int,  # pylint: disable=redefined-builtin
                  perplexity: float, label: Optional[str] = None,
                  loss: Optional[float] = None, sparsity: Optional[float] = None,
                  dense_params: Optional[int] = None, fmt: Optional[str] = None,
                  dtype: Optional[str] = None, step: Optional[int] = None,
                  extra: Optional[dict] = None, write: bool = True) -> dict[str, Any]:
  """Validates the numbers and writes ``<workdir>/summary.json`` atomically.

  ``workdir`` is created if needed.  Integers may be numpy integers and
  reals numpy floats (they are converted).  Returns the written summary;
  ``write=False`` checks and returns it without writing (a job of several
  processes writes from one).

  Raises:
    ValueError (writing nothing): a field out of range or not JSON-able.
  """
  def plain(x):  # numpy scalars -> Python numbers; anything else as it is
    return x.item() if hasattr(x, "item") and hasattr(x, "dtype") else x

  summary = {"format_version": FORMAT_VERSION, "method": method, "params": plain(params),
             "bytes": plain(bytes), "perplexity": plain(perplexity)}
  optional = dict(label=label, loss=plain(loss), sparsity=plain(sparsity),
                  dense_params=plain(dense_params), fmt=fmt, dtype=dtype, step=plain(step),
                  extra=extra)
  summary.update({k: v for k, v in optional.items() if v is not None})
  path = summary_path(workdir)
  summary = validate_summary(summary, path)
  try:
    text = json.dumps(summary, indent=1, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: the summary is not JSON-able ({e})") from None
  if not write:
    return summary
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as fh:
      fh.write(text + "\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return summary


def read_summary(workdir: str) -> dict[str, Any]:
  """The validated summary of ``workdir`` (a directory or a .json file path).

  Raises:
    ValueError: no summary there, invalid JSON, or an invalid field.
  """
  path = summary_path(workdir)
  if not os.path.isfile(path):
    raise ValueError(f"{os.fspath(workdir)!r} holds no summary: {path} does not exist "
                     "(write one with salaad_jax.deploy.summary.write_summary)")
  try:
    with open(path) as fh:
      summary = json.load(fh)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  return validate_summary(summary, path)
