"""Dense full-rank training: the unchanged Llama and the reference AdamW."""

from __future__ import annotations

from salaad_jax.baselines import accounting, spec
from salaad_jax.models import llama


def footprint(config, costs: accounting.ByteCosts = accounting.ByteCosts()
              ) -> accounting.Footprint:
  """Every parameter dense: P = P_model, bytes = P b_w."""
  blocks = accounting.model_blocks(config)
  size = blocks.rest + sum(m * n for m, n in blocks.shapes.values())
  return accounting.dense_footprint(size, costs.b_w)


def method() -> spec.MethodSpec:
  """The dense baseline."""
  return spec.MethodSpec(
      name="dense",
      hparams={},
      dense_cls=lambda config: llama.Dense,
      optimizer=spec.reference_adamw,
      footprint=footprint,
      to_dense=lambda variables: variables["params"],
  )
