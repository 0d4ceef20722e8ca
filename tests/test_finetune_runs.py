"""Fine-tuning through the training harness (``--init_from``): LoRA, SALR,
LoSA rounds and SALAAD start from a pretrained tiny run, keep their frozen
parts, resume exactly, write summaries; and ``python -m experiments.finetune``
end to end."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_app
from helpers import assert_one_line_error, tiny_config, train_losses

from salaad_jax.baselines import finetune, harness, lora
from salaad_jax.deploy.summary import read_summary
from salaad_jax.train import TrainConfig, TrainError, train_and_evaluate
from salaad_jax.train import config as cfg_lib
from salaad_jax.train.run import load_run

ONE = jax.devices()[:1]
PRETRAIN_SOURCE = "synthetic:order=1"
FINETUNE_SOURCE = "synthetic:order=1,seed=7"  # another Markov chain: a new task


def tiny(method, **overrides) -> TrainConfig:
  """The tiny run of tests/helpers.py, pretraining on PRETRAIN_SOURCE."""
  return tiny_config(method, **{"source": PRETRAIN_SOURCE, **overrides})


def finetune_config(method, init_from, **overrides) -> TrainConfig:
  return tiny(method, init_from=init_from, source=FINETUNE_SOURCE, **overrides)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(workdir, Llama params) of a dense tiny run."""
  wd = str(tmp_path_factory.mktemp("pretrained") / "dense")
  train_and_evaluate(tiny("dense", steps=20), wd, devices=ONE)
  return wd, load_run(wd).params


def _train_losses(workdir):
  return [loss for _, loss in train_losses(workdir)]


def _kernels(params):
  return {p: np.asarray(w) for p, w in lora.flat(params).items() if np.ndim(w) == 2}


def test_lora_keeps_the_base_trains_adapters_and_resumes(tmp_path, pretrained):
  init_wd, base = pretrained
  config = finetune_config("lora", init_wd, method_options={"rank": "4"}, steps=8)
  full = train_and_evaluate(config, str(tmp_path / "full"), devices=ONE)
  losses = _train_losses(str(tmp_path / "full"))
  assert losses[-1] < losses[0], losses

  run = load_run(str(tmp_path / "full"))
  assert set(run.params) == {"params", "frozen"}
  # The frozen base is the pretrained model, bit for bit, after training.
  jax.tree.map(np.testing.assert_array_equal, run.params["frozen"]["base"], base)
  merged = lora.merge(base, finetune.pairs(run.params["params"]), 16.0)
  jax.tree.map(np.testing.assert_allclose, run.llama_params, merged)
  b = run.params["params"]["layers_0"]["attn"]["q_proj"]["kernel"]["b"]
  assert float(jnp.max(jnp.abs(b))) > 0  # B starts at 0 and has trained
  # Only the adapters have optimiser moments.
  adapter_size = sum(x.size for x in jax.tree.leaves(run.params["params"]))
  assert sum(x.size for x in jax.tree.leaves(run.opt_state)) < 3 * adapter_size + 10

  # Interrupted and resumed, from a copy of the pretrained run that is gone
  # by then: the run's own checkpoint is all a resume (and load_run) needs.
  copy = str(tmp_path / "pretrained_copy")
  shutil.copytree(init_wd, copy)
  split = config.replace(init_from=copy)
  part = train_and_evaluate(split.replace(stop_after=4), str(tmp_path / "split"), devices=ONE)
  assert part["interrupted"] == "stop_after"
  shutil.rmtree(copy)
  rest = train_and_evaluate(split, str(tmp_path / "split"), devices=ONE)
  assert rest["step"] == 8
  np.testing.assert_allclose(rest["eval_loss"], full["eval_loss"], rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, load_run(str(tmp_path / "split")).params,
               run.params)

  summary = harness.write_run_summary(cfg_lib.read_config(str(tmp_path / "full")),
                                      str(tmp_path / "full"), full)
  dense = harness.run_footprint(cfg_lib.read_config(init_wd))
  assert (summary["params"], summary["bytes"]) == tuple(dense)  # merged: the dense model
  assert summary["extra"]["trainable_params"] == adapter_size
  assert summary["perplexity"] == pytest.approx(full["eval_perplexity"])
  assert read_summary(str(tmp_path / "full"))["method"] == "lora"


def test_salr_prunes_the_base_only_and_counts_a_bitmap(tmp_path, pretrained):
  init_wd, base = pretrained
  wd = str(tmp_path / "salr")
  config = finetune_config("salr", init_wd, steps=6,
                           method_options={"lora_rank": "2", "residual_rank": "4"})
  result = train_and_evaluate(config, wd, devices=ONE)
  run = load_run(wd)
  frozen = run.params["frozen"]
  pruned, dense = _kernels(frozen["base"]), _kernels(base)
  for path in lora.flat(finetune.pairs(frozen["residual"])):
    w, w0 = pruned[path], dense[path]
    kept = w != 0
    assert kept.mean() == pytest.approx(0.5, abs=1.0 / w.size)
    np.testing.assert_array_equal(w[kept], w0[kept])  # magnitude pruning, values kept
    assert np.min(np.abs(w0[kept])) >= np.max(np.abs(w0[~kept]))
  # Leaves outside the targets (the head, embeddings, norms) are untouched.
  np.testing.assert_array_equal(pruned["lm_head/kernel"], dense["lm_head/kernel"])

  summary = harness.write_run_summary(cfg_lib.read_config(wd), wd, result)
  assert summary["sparsity"] == pytest.approx(0.5, abs=0.01)
  assert summary["bytes"] < harness.run_footprint(cfg_lib.read_config(init_wd)).bytes


def test_losa_round_keeps_its_mask_through_training_and_merge(tmp_path, pretrained):
  init_wd, _ = pretrained
  wd = str(tmp_path / "losa")
  config = finetune_config("losa", init_wd, steps=6,
                           method_options={"rank": "2", "round": "3", "rounds": "3",
                                           "sparsity": "0.6", "calib_batches": "1"})
  result = train_and_evaluate(config, wd, devices=ONE)
  run = load_run(wd)
  masks = lora.flat(run.params["frozen"]["masks"])
  merged = _kernels(run.llama_params)
  # The last round reaches the target; layers differ by at most max_deviation.
  overall = 1 - sum(int(np.sum(m)) for m in masks.values()) / sum(m.size for m in masks.values())
  assert overall == pytest.approx(0.6, abs=0.03)
  for path, mask in masks.items():
    assert not np.any(merged[path][~np.asarray(mask)])  # pruned entries stay zero
  assert set(lora.flat(finetune.pairs(run.params["params"]))) == set(masks)
  summary = harness.write_run_summary(cfg_lib.read_config(wd), wd, result)
  assert summary["sparsity"] == pytest.approx(overall, abs=1e-6)
  assert summary["params"] < summary["dense_params"]


@pytest.mark.parametrize("method", ["dense", "salaad"])
def test_init_from_starts_at_the_pretrained_weights(tmp_path, pretrained, method):
  init_wd, base = pretrained
  wd = str(tmp_path / method)
  # lr 0: the AdamW step is zero, so X after one step is the starting point.
  train_and_evaluate(finetune_config(method, init_wd, steps=1, lr=0.0), wd, devices=ONE)
  jax.tree.map(np.testing.assert_array_equal, load_run(wd).params, base)


def test_finetuning_errors_are_one_line(tmp_path, pretrained):
  init_wd, _ = pretrained
  with pytest.raises(TrainError, match="--init_from"):
    train_and_evaluate(tiny("lora"), str(tmp_path / "a"), devices=ONE)
  with pytest.raises(TrainError, match="holds no run"):
    train_and_evaluate(finetune_config("lora", str(tmp_path / "nothing")),
                       str(tmp_path / "b"), devices=ONE)
  structured = str(tmp_path / "lowrank")
  train_and_evaluate(tiny("lowrank", steps=2, method_options={"rank": "4"}), structured,
                     devices=ONE)
  with pytest.raises(TrainError, match="structured projections"):
    train_and_evaluate(finetune_config("lora", structured), str(tmp_path / "c"), devices=ONE)
  with pytest.raises(TrainError, match="other parameter shapes"):
    train_and_evaluate(finetune_config("lora", init_wd, vocab_size=300),
                       str(tmp_path / "d"), devices=ONE)
  with pytest.raises(TrainError, match="round=4"):
    train_and_evaluate(finetune_config("losa", init_wd, method_options={"round": "4",
                                                                         "rounds": "3"}),
                       str(tmp_path / "e"), devices=ONE)


def test_finetune_footprint_of_losa_counts_kept_entries():
  params = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}}},
            "lm_head": {"kernel": jnp.ones((2, 3))}}
  masks = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.asarray([[True, False],
                                                                   [False, True]])}}}}
  adapters = lora.init(params, 1, jax.random.key(0), targets=lambda p, _: p.startswith("layers"))
  config = tiny("losa", vocab_size=256, method_options={"alpha": "1.0"})
  fp, extra = finetune.finetune_footprint(
      config, {"params": finetune.plain(adapters), "frozen": {"base": params, "masks": masks}})
  # 2 kept of 4 (bitmap: 2 values + 1 byte of bits) + the dense head (6 values).
  assert fp.params == 2 + 6
  assert fp.bytes == 2 * 2 + 1 + 6 * 2
  assert extra["sparsity"] == 0.5 and extra["trainable_params"] == 4


def _app(module, *args, timeout=300):
  return run_app(module, *args, timeout=timeout)


@pytest.mark.slow  # starts the apps
def test_finetune_app_chains_losa_rounds_and_writes_a_summary(tmp_path):
  common = ["--model=tiny", "--dtype=float32", "--seq_len=16", "--batch_size=4",
            "--warmup_steps=0", "--eval_batches=2", "--log_every=2", "--eval_every=0",
            "--checkpoint_every=0"]
  dense = tmp_path / "dense"
  out = _app("experiments.pretrain", *common, "--method=dense", f"--source={PRETRAIN_SOURCE}",
             "--steps=6", f"--workdir={dense}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads((dense / "summary.json").read_text())["method"] == "dense"

  wd = tmp_path / "losa"
  ft = ["--method=losa", f"--source={FINETUNE_SOURCE}", "--steps=5", f"--init_workdir={dense}",
        f"--workdir={wd}", "--method_option=rounds=2", "--method_option=rank=2",
        "--method_option=calib_batches=1", "--log_every=1", "--checkpoint_every=0",
        "--eval_batches=2", "--batch_size=4", "--seq_len=16", "--warmup_steps=0"]
  out = _app("experiments.finetune", *ft)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "== LoSA round 2/2: 3 steps" in out.stdout
  assert out.stdout.splitlines()[-1].startswith("summary: losa")
  summary = read_summary(str(wd))
  assert summary["step"] == 5 and summary["extra"]["rounds"] == 2
  assert summary["sparsity"] == pytest.approx(0.5, abs=0.03)
  # Round 2 starts from round 1; the model settings come from the dense run.
  round2 = cfg_lib.read_config(str(wd / "round_2"))
  assert round2.init_from == str(wd / "round_1") and round2.dtype == "float32"
  assert round2.model == "tiny" and round2.method_options["round"] == "2"

  # Rerunning the finished command keeps the rounds and rewrites the summary.
  again = _app("experiments.finetune", *ft)
  assert again.returncode == 0 and read_summary(str(wd))["perplexity"] == pytest.approx(
      summary["perplexity"])

  bad = _app("experiments.finetune", f"--init_workdir={tmp_path / 'none'}",
             f"--workdir={tmp_path / 'x'}")
  assert_one_line_error(bad, "error: --init_workdir", returncode=1, alone=True)


@pytest.mark.parametrize("parallelism,fsdp", [("jit", 2), ("pmap", 1)])
def test_finetuning_on_two_devices_matches_one(tmp_path, pretrained, parallelism, fsdp):
  """LoSA (boolean masks in the frozen collection) sharded FSDP-style over a
  mesh, or replicated under pmap, computes what one device computes."""
  init_wd, _ = pretrained
  config = finetune_config("losa", init_wd, steps=4,
                           method_options={"rank": "2", "round": "1", "rounds": "2",
                                           "calib_batches": "1"})
  one = train_and_evaluate(config, str(tmp_path / "one"), devices=ONE)
  two = train_and_evaluate(config.replace(parallelism=parallelism, mesh_fsdp=fsdp),
                           str(tmp_path / "two"), devices=jax.devices()[:2])
  np.testing.assert_allclose(two["eval_loss"], one["eval_loss"], rtol=1e-5)
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
