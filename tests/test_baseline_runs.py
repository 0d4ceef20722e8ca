"""The pretraining baselines through the training harness: a few steps each of
the tiny model, summaries, SLTrain's fixed support in checkpoints, resume."""

import json
import os

import jax
import numpy as np
import pytest

from helpers import tiny_config, train_losses
from salaad_jax.baselines import harness
from salaad_jax.train import TrainConfig, train_and_evaluate
from salaad_jax.train import config as cfg_lib
from salaad_jax.train.run import load_run
from salaad_jax.train.state import build, init_state


pytestmark = pytest.mark.slow  # every test trains the tiny model


def tiny(method, **overrides) -> TrainConfig:
  """The tiny run of tests/helpers.py at rank 4."""
  return tiny_config(method, **{"method_options": {"rank": "4"}, **overrides})


def _losses(workdir):
  return [loss for _, loss in train_losses(workdir)]


@pytest.mark.parametrize("method", ["lowrank", "sltrain", "lost", "galore"])
def test_baseline_trains_and_writes_summary(tmp_path, method):
  wd = str(tmp_path / method)
  options = {"rank": "4", "update_proj_gap": "5"} if method == "galore" else {"rank": "4"}
  config = tiny(method, method_options=options)
  result = train_and_evaluate(config, wd, devices=jax.devices()[:1])
  losses = _losses(wd)
  assert len(losses) == 3 and losses[-1] < losses[0], losses
  summary = harness.write_run_summary(cfg_lib.read_config(wd), wd, result)
  with open(os.path.join(wd, "summary.json")) as f:
    saved = json.load(f)
  assert saved["method"] == method and saved["params"] == summary["params"] > 0
  assert saved["bytes"] > 0 and saved["perplexity"] == pytest.approx(result["eval_perplexity"])
  dense = harness.run_footprint(cfg_lib.read_config(wd).replace(method="dense"))
  if method == "galore":
    assert (saved["params"], saved["bytes"]) == tuple(dense)
  else:
    assert saved["params"] < dense.params


def test_sltrain_support_is_fixed_and_resumes(tmp_path):
  one = jax.devices()[:1]
  config = tiny("sltrain", steps=8)
  full = train_and_evaluate(config, str(tmp_path / "full"), devices=one)
  part = train_and_evaluate(config.replace(stop_after=4), str(tmp_path / "split"), devices=one)
  assert part["interrupted"] == "stop_after"
  rest = train_and_evaluate(config, str(tmp_path / "split"), devices=one)
  assert rest["step"] == 8
  np.testing.assert_allclose(rest["eval_loss"], full["eval_loss"], rtol=1e-5)

  resolved = cfg_lib.read_config(str(tmp_path / "full"))
  run = load_run(str(tmp_path / "full"))
  assert set(run.params) == {"params", "sparsity"}
  parts = build(resolved)
  init = init_state(resolved, parts.model, parts.method, parts.tx)
  jax.tree.map(np.testing.assert_array_equal, run.params["sparsity"], init.params["sparsity"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                       run.params["params"], init.params["params"]))
  assert any(moved)
