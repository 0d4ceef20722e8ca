"""The fair protocol's bookkeeping (``benchmarks.compare_protocol``): trials,
the choice, tuned records, fresh seeds; and the evaluation's batches and
weight rounding (``deploy.spectrum``)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import compare_protocol as protocol
from salaad_jax.data.pipeline import TokenArrayDataset
from salaad_jax.data.tokenizers import ByteTokenizer
from salaad_jax.deploy import spectrum as sp


@pytest.mark.parametrize("method", protocol.TUNED_METHODS)
def test_trials_are_the_defaults_then_reproducible_draws_in_the_space(method):
  first = protocol.defaults(method, 3e-3, {"consolidate_factor_lr": 3.0,
                                           "consolidate_cut_joint": 0.6, "rho": 1e-3})
  got = protocol.trials(method, 6, first)
  assert len(got) == 6 and got[0] == first
  assert got == protocol.trials(method, 6, first)  # the same in every invocation
  assert protocol.trials(method, 3, first) == got[:3]  # more trials extend, never reshuffle
  for draw in got[1:]:
    assert set(draw) == set(protocol.SPACES[method])
    for key, (_, lo, hi) in protocol.SPACES[method].items():
      assert lo <= draw[key] <= hi
  assert len({tuple(sorted(d.items())) for d in got}) == 6
  with pytest.raises(ValueError, match=">= 1"):
    protocol.trials(method, 0, first)


def test_defaults_are_each_methods_untuned_settings():
  assert protocol.defaults("dense", 3e-3) == {"lr": 3e-3}
  assert protocol.defaults("sltrain", 1e-3, density=0.05) == {"lr": 1e-3, "scale": 0.25,
                                                              "density": 0.05}
  salaad = protocol.defaults("salaad", 3e-3, {"consolidate_factor_lr": 3.0,
                                              "consolidate_cut_joint": 0.6, "rho": 1e-3})
  assert salaad == {"lr": 3e-3, "consolidate_factor_lr": 3.0, "consolidate_cut_joint": 0.6,
                    "rho": 1e-3}
  with pytest.raises(ValueError, match="no tuning space"):
    protocol.defaults("galore", 3e-3)


def test_apply_turns_settings_into_fields_and_options():
  got = protocol.apply("sltrain", {"lr": 2e-3, "scale": 0.5, "density": 0.02}, rank=9)
  assert got == {"fields": {"lr": 2e-3}, "options": {"alpha": "4.5", "density": "0.02"}}
  with pytest.raises(ValueError, match="rank"):
    protocol.apply("sltrain", {"lr": 2e-3, "scale": 0.5, "density": 0.02})
  got = protocol.apply("salaad", {"lr": 2e-3, "consolidate_factor_lr": 2.0,
                                  "consolidate_cut_joint": 0.5, "rho": 1e-4})
  assert got["fields"] == {"lr": 2e-3, "consolidate_factor_lr": 2.0,
                           "consolidate_cut_joint": 0.5, "rho": 1e-4, "rho_embed": 1e-4}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1.0, 1e3), min_size=1, max_size=6))
def test_choice_is_the_lowest_geometric_mean(ppls):
  assert protocol.score(ppls) == pytest.approx(math.exp(np.mean(np.log(ppls))))
  results = [{"settings": {"lr": i}, "score": p} for i, p in enumerate(ppls)]
  chosen = protocol.choose(results)
  assert chosen["score"] == min(ppls)
  assert chosen["trial"] == ppls.index(min(ppls))  # the first of equals
  assert chosen["settings"] == {"lr": chosen["trial"]}


def test_tuned_records_round_trip_by_name_or_path(tmp_path, monkeypatch):
  monkeypatch.setattr(protocol, "TUNED_DIR", str(tmp_path / "tuned"))
  record = {"tune_seeds": [100], "methods": {"dense": {"chosen": {"settings": {"lr": 1e-3},
                                                                  "score": 5.0, "trial": 1}}}}
  protocol.write_tuned(protocol.tuned_path("mine"), record)
  assert protocol.read_tuned("mine") == record
  assert protocol.read_tuned(str(tmp_path / "tuned" / "mine.json")) == record
  with pytest.raises(ValueError, match="does not exist"):
    protocol.read_tuned("other")
  protocol.write_tuned(str(tmp_path / "bad.json"), {"methods": {"dense": {}}})
  with pytest.raises(ValueError, match="not a tuned record"):
    protocol.read_tuned(str(tmp_path / "bad.json"))


def test_a_tuning_or_selection_seed_is_refused_as_a_reported_seed():
  protocol.check_fresh([10, 11], [100], (0, 1, 2))
  with pytest.raises(ValueError, match="seed 100 was a tuning seed"):
    protocol.check_fresh([10, 100], [100], (0, 1, 2))
  with pytest.raises(ValueError, match="seed 1 chose the SALAAD preset"):
    protocol.check_fresh([1], [100], (0, 1, 2))


def test_controls_change_one_thing_each():
  fields = {name: set(f) for name, (_, f) in protocol.CONTROLS.items()}
  assert fields == {"reference": {"salaad_preset"}, "no_admm": {"consolidate_from"},
                    "no_admm_random": {"consolidate_from", "consolidate_support"},
                    "one_pass": {"consolidate_cut_joint"}}
  # step 0 at any step count: no ADMM round before the structure is chosen
  assert round(protocol.CONTROLS["no_admm"][1]["consolidate_from"] * 100_000) == 0


def _text(n_tokens, seq, batch):
  return TokenArrayDataset((np.arange(n_tokens) % 200).astype(np.int32), seq_len=seq,
                           batch_size=batch, tokenizer=ByteTokenizer(), split="validation")



@pytest.mark.parametrize("joint", [0.0, 0.6])
def test_a_control_whose_run_is_the_recipe_is_not_run(joint):
  from salaad_jax.train.presets import config_with_preset  # pylint: disable=import-outside-toplevel
  recipe = config_with_preset("recommended", model="tiny", steps=50,
                              consolidate_cut_joint=joint)
  kept, same = protocol.distinct_controls(list(protocol.CONTROLS),
                                          lambda fields: recipe.replace(**fields))
  # one pass per step is the recipe's own run when its joint weight is 0
  assert same == (["one_pass"] if joint == 0.0 else [])
  assert set(kept) | set(same) == set(protocol.CONTROLS) and not set(kept) & set(same)
  assert all(kept[n] == protocol.CONTROLS[n][1] for n in kept)
  with pytest.raises(ValueError, match="unknown control 'other'"):
    protocol.distinct_controls(["other"], lambda fields: recipe)

@pytest.mark.parametrize("wanted", [1, 3, 7, 50])
def test_spread_batches_are_evenly_spaced_over_the_whole_split(wanted):
  ds = _text(16 * 4 * 20 + 1, 16, 4)  # 20 batches
  every = list(ds.eval_batches())
  got = sp.spread_batches(ds, wanted)
  idx = [next(i for i, b in enumerate(every) if np.array_equal(b["inputs"], g["inputs"]))
         for g in got]
  if wanted >= len(every):
    assert idx == list(range(len(every)))
  else:
    assert len(idx) == wanted and idx[0] == 0 and (wanted == 1 or idx[-1] == len(every) - 1)
    gaps = np.diff(idx)
    assert wanted == 1 or gaps.max() - gaps.min() <= 1
  assert len(sp.spread_batches(ds, 0)) == len(every)


def test_rounded_weights_are_the_bf16_values_in_their_own_dtype():
  params = {"w": jnp.asarray([1.0 + 2 ** -10, 3.14159], jnp.float32),
            "index": jnp.asarray([1, 2], jnp.int32)}
  got = sp.rounded(params, "bfloat16")
  assert got["w"].dtype == jnp.float32 and got["index"].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got["w"]), [1.0, 3.140625])
  np.testing.assert_array_equal(np.asarray(got["index"]), [1, 2])
  assert sp.rounded(params, None) is params
