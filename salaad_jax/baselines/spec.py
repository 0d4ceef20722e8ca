"""The description of a pretraining method that a training harness consumes.

A `MethodSpec` says everything a LLaMA training loop needs to run a method
without knowing it:

    spec = baselines.make_method("sltrain", rank=128)
    model = Llama(config, dense_cls=spec.dense_cls(config))
    variables = model.init(rng, tokens)
    params, constants = split_variables(variables)     # constants never train
    tx = spec.optimizer(schedule)
    logits = model.apply({"params": params, **constants}, tokens)
    spec.footprint(config)        # Footprint(params, bytes) of the trained model
    spec.to_dense(variables)      # equivalent dense Llama params (eval/export)

`constants` holds the non-trainable variable collections a method keeps next
to its parameters (a fixed sparse support, as index arrays); they are fixed
at init and must be passed back at every apply and saved with checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import optax

from salaad_jax.baselines.accounting import Footprint
from salaad_jax.models.configs import LlamaConfig

DenseCls = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One pretraining method, as pluggable pieces.

  Attributes:
    name: registry name ('dense', 'lowrank', 'sltrain', 'lost', 'galore').
    hparams: the method's hyperparameters (for logging and budget matching).
    dense_cls: config -> class for `Llama(config, dense_cls=...)`.
    optimizer: (learning_rate or schedule, **overrides) -> optax transform.
    footprint: (config, costs=ByteCosts()) -> Footprint of the trained
      model (SALAAD.md §6 accounting).
    to_dense: variables -> dense Llama params computing the same function.
    constant_collections: variable collections besides 'params' that the
      model needs at apply time and that never train.
  """

  name: str
  hparams: Mapping[str, Any]
  dense_cls: Callable[[LlamaConfig], DenseCls]
  optimizer: Callable[..., optax.GradientTransformation]
  footprint: Callable[..., Footprint]
  to_dense: Callable[[Mapping[str, Any]], Any]
  constant_collections: tuple[str, ...] = ()


def reference_adamw(learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9,
                    b2: float = 0.95, eps: float = 1e-8,
                    weight_decay: float = 0.0,
                    clip_norm: float | None = 1.0
                    ) -> optax.GradientTransformation:
  """The reference base optimiser (SALAAD.md §7): global-norm clipping then
  AdamW(b1 0.9, b2 0.95, eps 1e-8, weight decay 0)."""
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                      weight_decay=weight_decay)
  if clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, dict]:
  """(params, constants): the trainable 'params' collection and the rest."""
  variables = dict(variables)
  params = variables.pop("params")
  return params, variables


def dense_params(params: Mapping[str, Any], constants: Mapping[str, Any] | None,
                 layer_keys: frozenset[str],
                 build_kernel: Callable[[Mapping, Mapping], Any]) -> dict:
  """Replaces every structured layer of a params tree by a dense one.

  A layer is a sub-dict of `params` holding all of `layer_keys`; it becomes
  {'kernel': build_kernel(layer_params, layer_constants)} (plus its 'bias').
  `constants` is a tree mirroring `params` (one collection, e.g.
  variables['sparsity']) or None; the layer's sub-dict of it is passed along.
  """

  def walk(p, c):
    if not isinstance(p, Mapping):
      return p
    c = c if isinstance(c, Mapping) else {}
    if layer_keys <= set(p):
      out = {"kernel": build_kernel(p, c)}
      if "bias" in p:
        out["bias"] = p["bias"]
      return out
    return {k: walk(v, c.get(k)) for k, v in p.items()}

  return walk(params, constants)


# Ranks of the reference SLTrain and GaLore runs, by LLaMA preset.
REFERENCE_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}
