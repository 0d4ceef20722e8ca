r"""Optimizer-state memory of SALAAD beyond AdamW, at the reference model sizes.

    python -m benchmarks.state_memory --models=60m,130m,350m

The state is built abstractly (``jax.eval_shape`` of ``tx.init``: shapes and
dtypes only, nothing allocated), so the bytes are exact and the same on every
device, and a 350M model costs nothing to measure.  For each model, each
storage variant ``<S>:<dual Y>`` (``state_dtype``:``dual_dtype``) and each S
capacity (``sparse_capacity``: 'auto' = values + int32 indices of 3 d* of a
block's entries, a fraction, or 'none' = S dense in the param's shape) it
prints the bytes of the SALAAD state beyond the inner AdamW's, over the
parameter bytes, split into S, the dual Y, the factors of L (bounded rank
``ceil(2 r* min(m, n)) + 8`` on the fast path, ``min(m, n)`` on the exact
one) and the rest; ``--json`` writes them to a file.  The variant
``salaad()`` uses when given none is marked "(default)".
"""

from __future__ import annotations

import inspect
import json

from absl import app, flags
import jax
import jax.numpy as jnp
import optax

import salaad_jax as sj
from salaad_jax import models

_MODELS = flags.DEFINE_list("models", ["60m", "130m", "350m"], "model presets")
_VOCAB = flags.DEFINE_integer("vocab_size", 32100, "vocabulary (T5: 32100)")
_DTYPES = flags.DEFINE_list("state_dtypes", ["float32:float32", "bfloat16:float32",
                                             "bfloat16:bfloat16"],
                            "storage dtypes to compare, <S>:<dual Y>")
_CAPACITIES = flags.DEFINE_list("sparse_capacities", ["auto", "none"],
                                "S capacities to compare: auto, none (dense S) or a fraction")
_DENSITY = flags.DEFINE_float("density_target", 0.05, "d*, which sizes the 'auto' capacity")
_SVT = flags.DEFINE_list("svt", ["fast", "exact"], "SVT variants (factor rank bound)")
_RANK_TARGET = flags.DEFINE_float("rank_target", 0.15, "r*, which bounds the fast factor rank")
_JSON = flags.DEFINE_string("json", None, "write the rows to this JSON file")


def _default(name: str) -> str:
  return str(jnp.dtype(inspect.signature(sj.salaad).parameters[name].default))


# The storage salaad() uses when given none.
DEFAULT_DTYPES = f"{_default('state_dtype')}:{_default('dual_dtype')}"
DEFAULT_CAPACITY = inspect.signature(sj.salaad).parameters["sparse_capacity"].default
DEFAULT_SVT = inspect.signature(sj.salaad).parameters["svt"].default


def _capacity(text: str):
  """'auto', None ('none') or a float: ``sparse_capacity`` from its flag text."""
  if text in ("auto", "none"):
    return None if text == "none" else text
  return float(text)


def tree_bytes(tree) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def state_row(name: str, svt: str, state_dtype: str, dual_dtype: str = "float32",
              capacity: str = "auto") -> dict:
  """Bytes of one configuration, as fractions of the parameter bytes."""
  cfg = models.get_config(name, vocab_size=_VOCAB.value)
  params = jax.eval_shape(lambda: models.Llama(cfg).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  param_bytes = tree_bytes(params)
  adamw = optax.adamw(1e-3)
  adamw_bytes = tree_bytes(jax.eval_shape(adamw.init, params))
  tx = sj.salaad(adamw, svt=svt, rank_target=_RANK_TARGET.value,
                 density_target=_DENSITY.value, state_dtype=state_dtype, dual_dtype=dual_dtype,
                 sparse_capacity=_capacity(capacity))
  full = jax.eval_shape(tx.init, params)
  state = sj.find_state(full)
  parts = {"sparse": tree_bytes(state.sparse), "dual": tree_bytes(state.dual),
           "factors": tree_bytes(state.lr_u) + tree_bytes(state.lr_s) + tree_bytes(state.lr_v)}
  extra = tree_bytes(full) - adamw_bytes
  parts["other"] = extra - sum(parts.values())
  return dict(model=name, params=int(sum(x.size for x in jax.tree.leaves(params))),
              param_bytes=param_bytes, svt=svt, dtypes=f"{state_dtype}:{dual_dtype}",
              capacity=capacity,
              adamw_over_params=adamw_bytes / param_bytes, extra_over_params=extra / param_bytes,
              **{f"{k}_over_params": v / param_bytes for k, v in parts.items()})


def main(argv):
  del argv
  rows = [state_row(m, svt, *d.split(":"), capacity=c) for m in _MODELS.value
          for svt in _SVT.value for c in _CAPACITIES.value for d in _DTYPES.value]
  print("| model | params | SVT | S capacity | S : Y dtype | AdamW state | SALAAD extra | S | Y | "
        "factors of L | other |")
  print("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    default = (r["dtypes"] == DEFAULT_DTYPES and _capacity(r["capacity"]) == DEFAULT_CAPACITY
               and r["svt"] == DEFAULT_SVT)
    print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['svt']} | {r['capacity']} | "
          f"{r['dtypes']}{' (default)' if default else ''} | "
          f"{r['adamw_over_params']:.2f} | **{r['extra_over_params']:.3f}** | "
          f"{r['sparse_over_params']:.3f} | {r['dual_over_params']:.3f} | "
          f"{r['factors_over_params']:.3f} | {r['other_over_params']:.3f} |", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
