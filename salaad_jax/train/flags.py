"""absl flags generated from the TrainConfig fields, and the config they give.

Every field becomes ``--<field>`` with the field's help text, its choices
(``DEFINE_enum``) or lower bound; ``method_options`` becomes the repeatable
``--method_option key=value``.  ``--salaad_preset`` fills the fields that no
flag sets explicitly (see :mod:`salaad_jax.train.presets`).  The help of
``--method`` lists the registered methods with their descriptions
(``--helpfull`` shows it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from absl import flags

from salaad_jax.train.config import TrainConfig, TrainError, fractions
from salaad_jax.train import multihost
from salaad_jax.train.presets import preset_fields
from salaad_jax.train.methods import get_method, method_names


def method_help(names: Optional[Sequence[str]] = None) -> str:
  """The help of ``--method``: each of ``names`` (default: every registered
  method) on its own line with its one-line description."""
  names = method_names() if names is None else list(names)
  lines = [f"{n}: {get_method(n).description}" if get_method(n).description else n
           for n in names]
  return "training method, one of:\n" + "\n".join(lines)


def _define(field: dataclasses.Field, flag_values, methods=None) -> None:
  name, default, meta = field.name, field.default, field.metadata
  help_text = method_help(methods) if name == "method" else meta.get("help", name)
  low = meta.get("min")
  if meta.get("choices"):
    flags.DEFINE_enum(name, default, list(meta["choices"]), help_text, flag_values=flag_values)
  elif isinstance(default, bool):
    flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
  elif isinstance(default, int):
    flags.DEFINE_integer(name, default, help_text, lower_bound=low, flag_values=flag_values)
  elif isinstance(default, float):
    flags.DEFINE_float(name, default, help_text, lower_bound=low, flag_values=flag_values)
  else:
    flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def define_flags(flag_values=flags.FLAGS, methods: Optional[Sequence[str]] = None) -> None:
  """Defines one flag per TrainConfig field on ``flag_values``; the help of
  ``--method`` lists ``methods`` (default: every registered one)."""
  for field in dataclasses.fields(TrainConfig):
    if field.name == "method_options":
      flags.DEFINE_multi_string("method_option", [], "method-specific option key=value "
                                "(repeatable)", flag_values=flag_values)
    else:
      _define(field, flag_values, methods)


def define_distributed_flags(flag_values=flags.FLAGS) -> None:
  """Only --distributed, --coordinator_address, --num_processes and
  --process_id (for the apps that read runs rather than train them)."""
  for field in dataclasses.fields(TrainConfig):
    if field.name in multihost.FLAG_FIELDS:
      _define(field, flag_values)


def distributed_settings(flag_values=flags.FLAGS) -> dict:
  """Those flags' values, as ``multihost.initialize`` takes them."""
  return {name: flag_values[name].value for name in multihost.FLAG_FIELDS}


def parse_method_options(items) -> dict[str, str]:
  out = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise TrainError(f"--method_option={item!r} must be key=value")
    out[key.strip()] = value.strip()
  return out


def config_from_flags(flag_values=flags.FLAGS) -> TrainConfig:
  """The TrainConfig of the parsed flags."""
  values = {}
  for field in dataclasses.fields(TrainConfig):
    if field.name == "method_options":
      values[field.name] = parse_method_options(flag_values["method_option"].value)
    else:
      values[field.name] = flag_values[field.name].value
  # A preset fills the fields no flag sets explicitly (command line or flag file).
  if values["distributed"] and values["salaad_preset"]:
    # The recommended rule reads the model's shapes (a JAX trace), and
    # jax.distributed.initialize must come before any JAX call: join first.
    multihost.initialize(True, values["coordinator_address"], values["num_processes"],
                         values["process_id"])
  preset = preset_fields(values["salaad_preset"], values["model"], values["steps"],
                         fractions(values["deploy_budgets"], "deploy_budgets"),
                         values["vocab_size"])
  for name, value in preset.items():
    if not flag_values[name].present:
      values[name] = value
  return TrainConfig(**values)


def _convert(field: dataclasses.Field, text: str):
  default = field.default
  if isinstance(default, bool):
    low = text.lower()
    if low not in ("true", "false", "1", "0"):
      raise ValueError("true or false")
    return low in ("true", "1")
  if isinstance(default, int):
    return int(text)
  if isinstance(default, float):
    return float(text)
  return text


def parse_field_overrides(items, flag: str, exclude=("method", "method_options")
                          ) -> dict[str, Any]:
  """TrainConfig fields from ``key=value`` strings (the repeatable ``--<flag>``),
  each value converted to its field's type (bool, int, float or string).

  Raises:
    TrainError naming ``--<flag>=<item>``: not key=value, not a TrainConfig
    field (or one of ``exclude``), or a value of the wrong type.
  """
  fields = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in exclude}
  out = {}
  for item in items:
    key, eq, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not eq or not key:
      raise TrainError(f"--{flag}={item!r} must be key=value")
    if key not in fields:
      raise TrainError(f"--{flag}={item!r}: {key!r} is not a TrainConfig field that can be "
                       f"set here (known: {', '.join(sorted(fields))})")
    try:
      out[key] = _convert(fields[key], value)
    except ValueError:
      kind = type(fields[key].default).__name__
      raise TrainError(f"--{flag}={item!r}: {key} takes a {kind}, got {value!r}") from None
  return out
