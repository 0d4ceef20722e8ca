"""options: the transform's options parsed once, and the phase of each step."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import salaad_jax as sj
from salaad_jax import options
from salaad_jax.options import ADMM, FACTORS, PROJECT, Consolidation


def _timeline(c: Consolidation, counts=range(8)):
  return ([int(c.phase(n)) for n in counts], [bool(c.first(n)) for n in counts])


@pytest.mark.parametrize("params, phases, first", [
    # consolidate_from = 3: the step taken from 3 steps is the first projection.
    ("projection", [ADMM] * 3 + [PROJECT] * 5, [False] * 3 + [True] + [False] * 4),
    ("factors", [ADMM] * 3 + [PROJECT] + [FACTORS] * 4, [False] * 3 + [True, True] + [False] * 3),
])
def test_phase_of_each_step(params, phases, first):
  assert _timeline(Consolidation(start=3, params=params)) == (phases, first)


def test_without_consolidation_every_step_is_admm():
  c = Consolidation()
  assert c.num_phases == 1
  assert _timeline(c) == ([ADMM] * 8, [False] * 8)


def test_phase_takes_a_traced_count():
  c = Consolidation(start=3, params="factors")
  assert jax.jit(c.phase)(jnp.int32(5)) == FACTORS
  np.testing.assert_array_equal(jax.vmap(c.phase)(jnp.arange(5)), [0, 0, 0, 1, 2])


def _kwargs(**change):
  kw = {k: p.default for k, p in inspect.signature(sj.salaad).parameters.items()
        if k != "inner"}
  return dict(kw, **change)


def test_parse_binds_the_consolidation_options():
  opts = options.parse(coupled=True, **_kwargs(
      consolidate_from=5, consolidate_params="factors", consolidate_cut_budgets=(0.4, 1.0),
      consolidate_cut_joint=0.5))
  c = opts.consolidation
  assert (c.start, c.factored, c.num_phases, c.cuts.budgets, c.cuts.joint) == (
      5, True, 3, (0.4, 1.0), 0.5)


@pytest.mark.parametrize("change, coupled, message", [
    (dict(consolidate_params="factors", consolidate_from=5), False, "needs the coupled"),
    (dict(consolidate_params="factors"), True, "a consolidate_from step"),
    (dict(consolidate_cut_budgets=(0.4,)), True, "consolidate_cut_budgets trains cuts"),
    (dict(consolidate_from=-1), True, "consolidate_from must be a step >= 0"),
    (dict(every_k=0), True, "every_k"),
    (dict(sparse_capacity="most"), True, "sparse_capacity must be"),
])
def test_parse_names_the_option(change, coupled, message):
  with pytest.raises(ValueError, match=message):
    options.parse(coupled=coupled, **_kwargs(**change))


def test_parse_accepts_traced_injectable_options():
  @jax.jit
  def parsed_rho(rho):
    return options.parse(coupled=True, **_kwargs(rho=rho)).hparams["rho"] * 2
  assert float(parsed_rho(0.5)) == 1.0


def test_lever_errors_name_the_option():
  with pytest.raises(ValueError, match="consolidate_structure"):
    sj.salaad(optax.sgd(1.0), consolidate_structure="best")
  with pytest.raises(ValueError, match="consolidate_from"):
    sj.salaad(optax.sgd(1.0), consolidate_from=-1)
  with pytest.raises(ValueError, match="target_schedule"):
    sj.salaad(optax.sgd(1.0), target_schedule=0.5)
  with pytest.raises(ValueError, match="consolidate_dropout"):
    sj.salaad(optax.sgd(1.0), consolidate_dropout=1.5)
  with pytest.raises(ValueError, match="consolidate_params must be one of"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="svd")
  for bad in (dict(), dict(consolidate_from=3, consolidate_dropout=0.2)):
    with pytest.raises(ValueError, match="consolidate_params='factors'"):
      sj.salaad(optax.sgd(1.0), consolidate_params="factors", **bad)
  with pytest.raises(ValueError, match="consolidate_params='factors'"):
    sj.salaad_decoupled(1.0, consolidate_from=3, consolidate_params="factors")
  with pytest.raises(ValueError, match="consolidate_factor_lr"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_factor_lr=0.0)
  with pytest.raises(ValueError, match="consolidate_factor_lr scales the factors"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_factor_lr=2.0)
  with pytest.raises(ValueError, match="consolidate_global_dropout trains cuts"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_global_dropout=0.5)
  with pytest.raises(ValueError, match="consolidate_global_dropout"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_global_dropout=1.5)
  with pytest.raises(ValueError, match="consolidate_cut_budgets trains cuts"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_cut_budgets=(0.5,))
  for bad in ((0.5, 0.0), (1.2,), ("x",)):
    with pytest.raises(ValueError, match="consolidate_cut_budgets"):
      sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
                consolidate_cut_budgets=bad)
  with pytest.raises(ValueError, match="consolidate_cut_overhead prices"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_cut_overhead=0.1)
  with pytest.raises(ValueError, match="consolidate_cut_jitter moves"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_cut_jitter=0.1)
  with pytest.raises(ValueError, match="consolidate_cut_jitter"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_cut_budgets=(0.5,), consolidate_cut_jitter=-0.1)
  with pytest.raises(ValueError, match="pass one of them"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_cut_budgets=(0.5,), consolidate_global_dropout=0.3)
