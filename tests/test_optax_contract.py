"""optax's own contract for contributed optimizers, run on both SALAAD forms.

optax ships the checks every optimizer in ``optax.contrib`` must pass
(``optax/contrib/_common_test.py``, class ``ContribTest``: extra arguments, no
recompilation, convergence on four small problems, ``tree_map_params``,
``inject_hyperparams``, dtype preservation, ``MultiSteps``, state stability
under ``lax.cond``, learning-rate schedules).  This module imports that class
from the installed optax and runs every one of its test methods, with the
parameters optax uses for one of its own optimizers, on

* ``salaad_adam``: ``salaad(optax.adam(learning_rate))`` (coupled), and
* ``adam_salaad_decoupled``: ``optax.chain(optax.adam(learning_rate),
  salaad_decoupled(learning_rate))``.

optax's problems have vector, scalar and unnamed 2-D parameters, none of
which is a block under the default structure, so both forms must behave as
adam (coupled) / adam followed by the identity (decoupled).  The same forms
with every leaf of two or more dimensions a block (``*_blocks``) run the
cases whose problems have such leaves (convergence on the matrix and mixed
targets, ``inject_hyperparams``); the checks optax makes on vectors only
(extra arguments and no recompilation, dtype preservation, ``MultiSteps``,
state stability under ``lax.cond``) are made on params holding blocks in
tests/test_composition.py.
"""

import inspect
import types
from unittest import mock

from absl.testing import parameterized
import optax
from optax.contrib import _common_test as optax_contrib_test

import salaad_jax as sj


def salaad_adam(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  return sj.salaad(optax.adam(learning_rate))


def adam_salaad_decoupled(learning_rate: optax.ScalarOrSchedule
                          ) -> optax.GradientTransformationExtraArgs:
  return optax.chain(optax.adam(learning_rate), sj.salaad_decoupled(learning_rate))


def _matrices(path, leaf):  # every leaf of two or more dimensions is a block
  del path
  return len(getattr(leaf, "shape", ())) >= 2


def salaad_adam_blocks(learning_rate: optax.ScalarOrSchedule
                       ) -> optax.GradientTransformationExtraArgs:
  return sj.salaad(optax.adam(learning_rate), structure=_matrices, every_k=2)


def adam_salaad_decoupled_blocks(learning_rate: optax.ScalarOrSchedule
                                 ) -> optax.GradientTransformationExtraArgs:
  return optax.chain(optax.adam(learning_rate),
                     sj.salaad_decoupled(learning_rate, structure=_matrices, every_k=2))


FACTORIES = {"salaad_adam": salaad_adam, "adam_salaad_decoupled": adam_salaad_decoupled}
BLOCK_FACTORIES = {"salaad_adam_blocks": salaad_adam_blocks,
                   "adam_salaad_decoupled_blocks": adam_salaad_decoupled_blocks}
CASES_PER_FORM = 16  # optax 0.2.8: the cases of one registered optimizer
BLOCK_CASES_PER_FORM = 3  # of those, the ones whose params have a leaf of 2 or more dimensions


def _has_matrices(test_name: str, params: dict) -> bool:
  """Whether the case's problem has a leaf of two or more dimensions (a
  block of the ``*_blocks`` forms; their explicit structure must select one)."""
  if test_name == "test_optimizers":
    return params["target"].__name__ in ("_setup_matrix_parabola", "_setup_mixed_tensor_target")
  return test_name == "test_optimizers_can_be_wrapped_in_inject_hyperparams"


def _generated_cases():
  """(original test method, its parameters) of every case optax generated for
  the template optimizer: its first plain (unwrapped) optimizer under test."""
  template = next(o for o in optax_contrib_test._MAIN_OPTIMIZERS_UNDER_TEST
                  if o["wrapper_name"] is None)
  keys = ("opt_name", "opt_kwargs", "wrapper_name", "wrapper_kwargs")
  for name, fn in vars(optax_contrib_test.ContribTest).items():
    if not (name.startswith("test") and hasattr(fn, "__wrapped__")):
      continue
    params = inspect.getclosurevars(fn).nonlocals.get("testcase_params")
    if isinstance(params, dict) and all(params.get(k) == template[k] for k in keys):
      yield fn.__wrapped__, params


def _build_class():
  methods: dict[str, list] = {}
  originals = {}
  for original, params in _generated_cases():
    originals[original.__name__] = original
    forms = [*FACTORIES, *(BLOCK_FACTORIES if _has_matrices(original.__name__, params) else ())]
    for opt_name in forms:
      extra = {k: v for k, v in params.items() if k not in ("opt_name", "opt_kwargs")}
      suffix = "_".join(f"{k}_{getattr(v, '__name__', v)}" for k, v in extra.items()
                        if k not in ("wrapper_name", "wrapper_kwargs"))
      methods.setdefault(original.__name__, []).append(dict(
          testcase_name=f"_{opt_name}{'_' + suffix if suffix else ''}",
          opt_name=opt_name, opt_kwargs={"learning_rate": 1e-2}, **extra))
  total = sum(len(v) for v in methods.values())
  expected = CASES_PER_FORM * len(FACTORIES) + BLOCK_CASES_PER_FORM * len(BLOCK_FACTORIES)
  assert total == expected, (
      f"optax's ContribTest yielded {total} cases for {len(FACTORIES)} forms and "
      f"{len(BLOCK_FACTORIES)} with blocks; expected {expected}")

  def set_up(self):
    super(cls, self).setUp()
    find = optax_contrib_test._get_opt_factory
    patcher = mock.patch.object(
        optax_contrib_test, "_get_opt_factory",
        lambda name: {**FACTORIES, **BLOCK_FACTORIES}.get(name) or find(name))
    patcher.start()
    self.addCleanup(patcher.stop)

  def body(ns):
    ns["setUp"] = set_up
    ns["__doc__"] = "optax.contrib's ContribTest on the two SALAAD forms."
    for name, cases in methods.items():
      ns[name] = parameterized.named_parameters(*cases)(originals[name])

  cls = types.new_class("SalaadContribTest", (parameterized.TestCase,), exec_body=body)
  cls.__module__ = __name__
  return cls


SalaadContribTest = _build_class()


# ---------------------------------------------------------------------------
# No block under the default structure: the forms pass through.
# ---------------------------------------------------------------------------

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


def _no_block_params():
  # a 2-D leaf that is not a 'kernel', a vector and a scalar
  return {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.ones(3), "s": jnp.asarray(0.5)}


def _grads(params, step):
  return jax.tree.map(lambda p: jnp.cos(p + step), params)


@pytest.mark.parametrize("form", ["coupled", "decoupled"])
def test_no_block_passes_through_with_one_warning(form, caplog):
  params = _no_block_params()
  if form == "coupled":
    tx, reference = sj.salaad(optax.adam(1e-2), every_k=1), optax.adam(1e-2)
  else:
    tx = optax.chain(optax.adam(1e-2), sj.salaad_decoupled(1e-2, every_k=1))
    reference = optax.adam(1e-2)
  with caplog.at_level("WARNING"):
    state = tx.init(params)
  warnings = [r for r in caplog.records if "no parameter is a block" in r.getMessage()]
  assert len(warnings) == 1
  ref_state = reference.init(params)
  step, ref_step = jax.jit(tx.update), jax.jit(reference.update)
  caplog.clear()
  for t in range(3):  # every_k=1: a round would run every step
    g = _grads(params, t)
    u, state = step(g, state, params)
    u_ref, ref_state = ref_step(g, ref_state, params)
    chex.assert_trees_all_equal(u, u_ref)
    params = optax.apply_updates(params, u)
  assert not caplog.records  # the warning is for init only


def test_explicit_structure_selecting_nothing_is_still_an_error():
  tx = sj.salaad(optax.adam(1e-2), structure=r"kernel")
  with pytest.raises(ValueError, match="selected no parameter"):
    tx.init(_no_block_params())

