"""``python -m experiments.pretrain`` end to end, in subprocesses: the tiny
flag file, SALAAD against dense on real text, a resume with another
configuration refused, and one-line errors for bad input.  SIGTERM + exact
resume and sharded SALAAD against one device: tests/test_pretrain_exact.py."""

import json
import os
import re
import shutil

import numpy as np
import pytest

import salaad_jax as sj
from salaad_jax.train import presets
from salaad_jax.train import load_run, make_eval_dataset, evaluate
from salaad_jax.train.metrics import read_records

from conftest import pretrain_app as pretrain, run_app, run_app_cases
from helpers import NEEDS_SHAKESPEARE, TINY_FLAGS, assert_one_line_error

pytestmark = pytest.mark.slow  # every test starts the app in a subprocess


# The tiny flag file for 40 steps: metrics every 10, an evaluation and a
# checkpoint every 20.
TINY_ARGS = ["--steps=40", "--log_every=10", "--eval_every=20", "--checkpoint_every=20",
             "--warmup_steps=5"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """(workdir, the app's output) of the tiny flag file run with TINY_ARGS,
  once for the module; a test that runs the app on it again works on a copy."""
  wd = tmp_path_factory.mktemp("tiny") / "run"
  return wd, pretrain(f"--workdir={wd}", *TINY_ARGS)


def test_tiny_flagfile_runs_and_reports(tiny_run):
  wd, out = tiny_run
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  step_lines = [l for l in lines if l.startswith("step ")]
  assert len(step_lines) == 4
  for key in ("loss", "(floor", "ppl", "lr", "rank", "dens", "steps/s", "tok/s", "ETA"):
    assert key in step_lines[-1], (key, step_lines[-1])
  assert sum(l.startswith("eval step") for l in lines) == 2
  assert "surrogate loss" in [l for l in lines if l.startswith("eval step")][-1]
  assert lines[-2].startswith("done: step 40")
  assert lines[-1].startswith("summary: salaad")
  summary = json.loads((wd / "summary.json").read_text())
  # SALAAD is deployed as its surrogate: the summary has its perplexity.
  last_eval = [r for r in read_records(os.path.join(wd, "metrics.jsonl")) if r["kind"] == "eval"][-1]
  assert summary["perplexity"] == pytest.approx(last_eval["surrogate/perplexity"])
  assert summary["step"] == 40 and 0 < summary["params"] and summary["dense_params"] > 0
  assert sorted(os.listdir(wd / "checkpoints")) == ["20", "40"]
  assert json.loads((wd / "config.json").read_text())["method"] == "salaad"
  records = read_records(wd / "metrics.jsonl")
  last = [r for r in records if r["kind"] == "train"][-1]
  for key in ("rank_rate", "density", "alpha", "beta", "primal_residual",
              "blocks/layers_0/attn/q_proj/kernel/rank_rate"):
    assert np.isfinite(last[key]), key


@NEEDS_SHAKESPEARE
def test_salaad_reaches_its_targets_within_10_percent_of_dense(shakespeare_runs):
  # 300 steps, batch 8, sequence 64, metrics every 20 steps (tests/conftest.py).
  tmp_path = shakespeare_runs.salaad.parent
  salaad, dense = load_run(str(tmp_path / "salaad")), load_run(str(tmp_path / "dense"))
  ds = make_eval_dataset(salaad.config)
  loss_s = evaluate(salaad.model, salaad.params, ds, 10)["loss"]
  loss_d = evaluate(dense.model, dense.params, ds, 10)["loss"]
  assert loss_s <= 1.10 * loss_d, (loss_s, loss_d)
  # The controller holds every block near r* and d*: averaged over the last
  # 100 steps (the integral controller oscillates around its set point).
  records = [r for r in read_records(tmp_path / "salaad" / "metrics.jsonl")
             if r["kind"] == "train"][-5:]
  paths = sj.block_paths(salaad.opt_state)
  assert len(paths) == 14
  cfg = salaad.config
  rank = np.mean([[r[f"blocks/{p}/rank_rate"] for p in paths] for r in records], axis=0)
  dens = np.mean([[r[f"blocks/{p}/density"] for p in paths] for r in records], axis=0)
  assert abs(rank.mean() - cfg.rank_target) < 0.03, rank
  assert abs(dens.mean() - cfg.density_target) < 0.025, dens
  assert np.all(rank < 2 * cfg.rank_target) and np.all(dens < 2.5 * cfg.density_target)
  # The deployable surrogate X_hat = L + S is as good as the dense X.
  hat = sj.surrogate_params(salaad.params, salaad.opt_state)
  assert evaluate(salaad.model, hat, ds, 10)["loss"] <= 1.10 * loss_d


BAD_INPUT = [
    (["--source=tfds:no_such_dataset_xyz"], "Unknown TFDS dataset 'no_such_dataset_xyz'"),
    (["--source=/no/such/file.txt"], "--source=/no/such/file.txt"),
    (["--method=nope"], "--method='nope' is not a registered method"),
    (["--tokenizer=/no/such/spiece.model"], "--tokenizer=/no/such/spiece.model"),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
  """Every BAD_INPUT case run by the app on the tiny flag file (forked from
  one process that imported the package once: conftest.run_app_cases)."""
  base = tmp_path_factory.mktemp("bad_input")
  cases = [[f"--flagfile={TINY_FLAGS}", f"--workdir={base / str(i)}", *args]
           for i, (args, _) in enumerate(BAD_INPUT)]
  return base, run_app_cases("experiments.pretrain", cases, timeout=240)


@pytest.mark.parametrize("case", range(len(BAD_INPUT)),
                         ids=[needle for _, needle in BAD_INPUT])
def test_bad_input_is_one_clear_line(refused, case):
  base, results = refused
  assert_one_line_error(results[case], BAD_INPUT[case][1])
  assert not (base / str(case)).exists()


@pytest.mark.parametrize("app, methods", [
    ("experiments.pretrain", ["dense", "salaad", "lowrank", "sltrain", "lost", "galore"]),
    ("experiments.finetune", ["lora", "salr", "losa", "salaad"]),
])
def test_helpfull_lists_the_methods_with_their_descriptions(app, methods):
  from salaad_jax.train import get_method  # pylint: disable=import-outside-toplevel
  out = run_app(app, "--helpfull", timeout=120)
  assert out.returncode == 1 and "--method:" in out.stdout, out.stderr[-2000:]
  help_text = out.stdout.split("--method:")[1].split("\n  --")[0]
  listed = [m.group(1) for m in re.finditer(r"^\s*(\w+): ", help_text, re.MULTILINE)]
  if app.endswith("finetune"):
    assert listed == methods
  else:  # every registered method, fine-tuning ones included (they need --init_from)
    assert set(methods) | {"lora", "salr", "losa"} <= set(listed) and listed == sorted(listed)
  for name in methods:
    first_words = " ".join(get_method(name).description.split()[:4])
    assert f"{name}: {first_words}" in " ".join(help_text.split()), name


def test_batch_not_divisible_by_devices(tmp_path):
  out = pretrain(f"--workdir={tmp_path / 'run'}", "--batch_size=12", devices=8, timeout=120)
  assert_one_line_error(out, "--batch_size=12 is not divisible by 8 (8 devices)")
  assert not (tmp_path / "run").exists()


def test_incompatible_resume_is_refused_and_the_workdir_kept(tiny_run, tmp_path):
  first_wd, first = tiny_run
  assert first.returncode == 0, first.stderr[-2000:]
  wd = tmp_path / "run"  # a copy: test_tiny_flagfile_runs_and_reports reads the run
  shutil.copytree(first_wd, wd)
  files = {p: p.stat().st_mtime_ns for p in wd.rglob("*") if p.is_file()}
  out = pretrain(f"--workdir={wd}", *TINY_ARGS, "--rank_target=0.3", timeout=120)
  r_star = presets.preset_fields("recommended", "tiny")["rank_target"]  # tiny.flags' preset
  assert_one_line_error(out, f"different configuration (rank_target: {r_star} -> 0.3)")
  assert {p: p.stat().st_mtime_ns for p in wd.rglob("*") if p.is_file()} == files
