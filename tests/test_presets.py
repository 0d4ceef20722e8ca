"""presets: --salaad_preset expanded under the fields given explicitly (the
reference preset is the paper's settings; the tiny flag file runs the
recommended one)."""

import dataclasses

import pytest
from absl import flags

from helpers import TINY_FLAGS
from salaad_jax.train import TrainConfig, TrainError
from salaad_jax.train import flags as train_flags
from salaad_jax.train import presets


def test_reference_preset_is_the_papers_settings():
  ref = presets.config_with_preset("reference", model="60m")
  assert (ref.k_alpha, ref.k_beta, ref.every_k, ref.rho, ref.rho_embed) == (
      0.2, 0.002, 10, 1e-6, 3e-7)
  assert (ref.alpha_init, ref.beta_init, ref.energy, ref.svt) == ("zero", 0.0, 0.999, "exact")
  assert (ref.rank_target, ref.density_target, ref.deriv_start) == (0.15, 0.05, 1500)
  # S dense, as the authors store it: with their slow gains its density stays
  # far above the default capacity (3 d*) for most of training.
  assert ref.sparse_capacity == "none"
  assert presets.config_with_preset("recommended", model="tiny").sparse_capacity == "none"
  big = presets.config_with_preset("reference", model="350m")
  assert (big.k_beta, big.rho, big.every_k) == (0.0013, 1e-8, 25)
  assert presets.config_with_preset("reference", model="1b").every_k == 5
  assert presets.config_with_preset("reference", model="tiny", rho=1e-3).rho == 1e-3
  with pytest.raises(TrainError, match="--salaad_preset='best' is not a preset"):
    presets.preset_fields("best", "tiny")


def test_with_preset_expands_the_named_preset_under_explicit_fields():
  got = presets.with_preset({"salaad_preset": "recommended", "rank_target": 0.3}, "tiny")
  assert got["rank_target"] == 0.3 and got["salaad_preset"] == "recommended"
  assert (got["consolidate_from"], got["density_target"], got["rho"]) == (0.01, 0.08, 1e-3)
  assert (got["consolidate_params"], got["consolidate_factor_lr"]) == ("factors", 3.0)
  # The tiny model's structure is sized for half its dense bytes; others keep 0.2.
  assert presets.with_preset({"salaad_preset": "recommended"}, "tiny")["rank_target"] == 0.12
  assert presets.with_preset({"salaad_preset": "recommended"}, "60m")["rank_target"] == 0.2
  assert presets.with_preset({"k_alpha": 1.0}, "tiny") == {"k_alpha": 1.0}
  with pytest.raises(TrainError, match="is not a preset"):
    presets.with_preset({"salaad_preset": "best"}, "tiny")


def test_explicit_flags_win_over_the_preset(tmp_path):
  flagfile = tmp_path / "f.flags"
  flagfile.write_text("--every_k=3\n")
  fv = flags.FlagValues()
  train_flags.define_flags(fv)
  fv(["prog", "--model=tiny", "--salaad_preset=reference", "--rho=1e-3",
      f"--flagfile={flagfile}"])
  c = train_flags.config_from_flags(fv)
  assert c.salaad_preset == "reference"
  assert (c.rho, c.every_k) == (1e-3, 3)  # given: command line, flag file
  assert (c.k_beta, c.alpha_init, c.svt) == (0.002, "zero", "exact")  # from the preset
  defaults = dataclasses.replace(TrainConfig(), model="tiny")
  plain = flags.FlagValues()
  train_flags.define_flags(plain)
  plain(["prog", "--model=tiny"])
  assert train_flags.config_from_flags(plain) == defaults


def test_tiny_flag_file_runs_the_recommended_preset():
  """The flag file sets no SALAAD field itself, so --salaad_preset swaps all of them."""
  got = {}
  for preset in (None, "reference"):
    fv = flags.FlagValues()
    train_flags.define_flags(fv)
    fv(["prog", f"--flagfile={TINY_FLAGS}"] + ([f"--salaad_preset={preset}"] if preset else []))
    got[preset] = train_flags.config_from_flags(fv)
  rec = presets.preset_fields("recommended", "tiny")
  assert got[None].salaad_preset == "recommended" and rec["consolidate_from"] > 0
  assert all(getattr(got[None], k) == v for k, v in rec.items())
  ref = presets.preset_fields("reference", "tiny")
  assert all(getattr(got["reference"], k) == v for k, v in ref.items())
