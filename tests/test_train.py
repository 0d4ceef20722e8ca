"""The training harness in-process: config, flags (SALAAD's become the
transform's options), sharding rules, the method registry, exact resume,
multi-device equivalence, non-finite detection and load_run.

These runs use ``--method=dense`` (or a custom method): SALAAD's batched
LAPACK calls can deadlock XLA:CPU's intra-op pool on 2-core machines unless
NPROC is raised before JAX starts, so SALAAD runs live in
tests/test_pretrain_app.py, in subprocesses that set it.
"""

import ast
import dataclasses
import graphlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags

from helpers import ROOT, tiny_config, train_losses
from salaad_jax.train import (NonFiniteLossError, TrainConfig, TrainError, TrainState,
                              evaluate, get_method, load_run, make_eval_dataset,
                              register_method, train_and_evaluate)
from salaad_jax.train import config as cfg_lib
from salaad_jax.train import flags as train_flags
from salaad_jax.train import metrics as mt
from salaad_jax.train import sharding as shd
from salaad_jax.baselines import accounting
from salaad_jax.models import get_config
from salaad_jax.train import methods, presets
from salaad_jax.train.methods import method_options


# The tiny run of tests/helpers.py on the plain synthetic corpus, logged every
# step, a checkpoint every 4 steps.
TRAIN_RUN = dict(source="synthetic", seq_len=32, batch_size=8, lr=3e-3, warmup_steps=2,
                 log_every=1, checkpoint_every=4, async_checkpoint=True, tensorboard=False)


def tiny(**overrides) -> TrainConfig:
  """A dense tiny model on the synthetic corpus, a few seconds on CPU."""
  return tiny_config(**{**TRAIN_RUN, **overrides})


# ----------------------------------------------------------------------------
# Config and flags.
# ----------------------------------------------------------------------------


def test_config_json_round_trip_and_differences():
  c = tiny(method_options={"rank": "4"})
  assert TrainConfig.from_json(c.to_json()) == c
  diffs = cfg_lib.config_differences(c, c.replace(model="small", steps=99, lr=1.0))
  assert sorted(d.split(":")[0] for d in diffs) == ["lr", "model"]  # steps may change


@pytest.mark.parametrize("change, message", [
    (dict(model="huge"), "--model='huge' is not one of"),
    (dict(warmup_steps=50), "--warmup_steps=50 exceeds --steps=12"),
    (dict(rank_target=1.5), "--rank_target=1.5 must lie in"),
    (dict(batch_size=8, grad_accum=3), "not divisible by --grad_accum=3"),
    (dict(alpha_init="big"), "--alpha_init='big'"),
    (dict(lr=-1.0), "--lr=-1.0 must be >= 0"),
])
def test_validate_names_the_flag(change, message):
  with pytest.raises(TrainError, match=message.replace("(", r"\(").replace("[", r"\[")):
    cfg_lib.validate(tiny(**change))


def test_flags_cover_every_field_and_give_the_config():
  fv = flags.FlagValues()
  train_flags.define_flags(fv)
  fv(["prog", "--model=tiny", "--steps=7", "--rho=0.5", "--include_head",
      "--method_option=rank=8", "--salaad_mode=fixed"])
  c = train_flags.config_from_flags(fv)
  assert (c.model, c.steps, c.rho, c.include_head, c.salaad_mode) == ("tiny", 7, 0.5, True, "fixed")
  assert c.method_options == {"rank": "8"}
  names = {f.name for f in dataclasses.fields(TrainConfig)} - {"method_options"}
  assert names <= set(fv) and "method_option" in fv
  with pytest.raises(flags.IllegalFlagValueError):
    fv(["prog", "--steps=0"])


def _train_imports() -> dict[str, set[str]]:
  """module -> the salaad_jax.train modules it imports (at any depth, lazy ones too)."""
  package = ROOT / "salaad_jax" / "train"
  names = {p.stem for p in package.glob("*.py")} - {"__init__"}
  graph = {}
  for name in names:
    deps = set()
    for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "salaad_jax.train":
        deps |= {a.name for a in node.names} & names
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("salaad_jax.train."):
        deps.add(node.module.split(".")[2])
      elif isinstance(node, ast.Import):
        deps |= {a.name.split(".")[2] for a in node.names
                 if a.name.startswith("salaad_jax.train.")}
    graph[name] = deps - {name}
  return graph


def test_train_modules_import_one_way():
  graph = _train_imports()
  assert graph["warm_start"] >= {"run"} and "loop" not in graph["run"]  # the graph is read
  list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a circle


def tiny100(**kw) -> TrainConfig:
  """SALAAD on the tiny model over 100 steps, the other fields at their defaults."""
  return TrainConfig(model="tiny", steps=100, warmup_steps=5, **kw)


def test_config_fields_become_transform_options():
  kw = methods.salaad_kwargs(tiny100(every_k=5, target_schedule_end=0.5, rho_mode="tanh",
                                   rho_ramp_center=0.5, rho_ramp_width=0.1,
                                   consolidate_from=0.7))
  assert kw["consolidate_from"] == 70
  assert float(kw["target_schedule"](10)) == 0.0 and float(kw["target_schedule"](0)) == 1.0
  assert float(kw["rho_schedule"](10)) == pytest.approx(5.5)  # centre: 0.5 * 100 / 5
  off = methods.salaad_kwargs(tiny100())
  assert (off["consolidate_from"], off["target_schedule"], off["rho_schedule"]) == (None,) * 3
  assert methods.salaad_kwargs(tiny100(rho_mode="shape_dependent"))["rho"] == "shape_dependent"
  fac = methods.salaad_kwargs(tiny100(consolidate_params="factors", consolidate_from=0.5,
                                    consolidate_factor_lr=3.0, consolidate_global_dropout=0.2))
  assert (fac["consolidate_params"], fac["consolidate_factor_lr"],
          fac["consolidate_global_dropout"]) == ("factors", 3.0, 0.2)
  # byte budgets: with --consolidate_cut_bitmaps a bitmap per block (1/16 of a
  # bf16 value per entry) priced in the cut; without, every bitmap counted as
  # kept: b less the bitmaps' share of the dense bytes
  fields = dict(consolidate_params="factors", consolidate_from=0.5,
                consolidate_cut_budgets="0.4, 0.6", vocab_size=256, seq_len=64)
  cb = methods.salaad_kwargs(tiny100(consolidate_cut_bitmaps=True, consolidate_cut_jitter=0.02,
                                   **fields))
  assert (cb["consolidate_cut_budgets"], cb["consolidate_cut_overhead"],
          cb["consolidate_cut_jitter"]) == ((0.4, 0.6), 1 / 16, 0.02)
  blocks = accounting.model_blocks(get_config("tiny", vocab_size=256, max_len=64))
  total = blocks.rest + sum(m * n for m, n in blocks.shapes.values())
  bitmaps = sum(np.ceil(m * n / 8) for m, n in blocks.shapes.values())
  cb = methods.salaad_kwargs(tiny100(**fields))
  np.testing.assert_allclose(cb["consolidate_cut_budgets"],
                             [b - bitmaps / (2 * total) for b in (0.4, 0.6)])
  assert cb["consolidate_cut_overhead"] == 0.0
  assert cb["consolidate_cut_joint"] == 0.0
  assert methods.salaad_kwargs(tiny100(consolidate_cut_joint=0.5, **fields))[
      "consolidate_cut_joint"] == 0.5
  assert methods.salaad_kwargs(tiny100(consolidate_cut_budgets="0.4"))[
      "consolidate_cut_budgets"] == ()  # consolidation off: no cuts
  # --consolidate_from=0 switches consolidation off whatever the preset set.
  cfg = presets.config_with_preset("recommended", model="tiny", consolidate_from=0.0)
  cfg_lib.validate(cfg)
  off = methods.salaad_kwargs(cfg)
  assert (off["consolidate_from"], off["consolidate_params"], off["consolidate_factor_lr"]) == (
      None, "projection", 1.0)


@pytest.mark.parametrize("change, message", [
    (dict(consolidate_from=1.0), r"--consolidate_from=1.0 must lie in \[0, 1\)"),
    (dict(consolidate_dropout=1.0), "--consolidate_dropout=1.0 must lie in"),
    (dict(target_schedule_end=2.0), "--target_schedule_end=2.0"),
    (dict(rho_mode="tanh", rho_ramp_width=0.0), "--rho_mode=tanh needs"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_dropout=0.2),
     r"--consolidate_params='factors' trains .* no --consolidate_dropout"),
    (dict(consolidate_params="factors", consolidate_from=0.5, coupling="decoupled"),
     r"consolidate_params='factors' trains .* needs the coupled"),
    (dict(consolidate_factor_lr=0.0), "--consolidate_factor_lr=0.0 must be > 0"),
    (dict(consolidate_from=0.5, consolidate_global_dropout=0.5),
     "consolidate_global_dropout trains cuts of the factors: it needs"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_global_dropout=1.0),
     "--consolidate_global_dropout=1.0 must lie in"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_factor_lr=0.0),
     "--consolidate_factor_lr=0.0 must be > 0"),
    (dict(consolidate_cut_budgets="0.4,x"), "--consolidate_cut_budgets='0.4,x' must be"),
    (dict(consolidate_cut_jitter=1.0), r"--consolidate_cut_jitter=1.0 must lie in \[0, 1\)"),
    (dict(consolidate_cut_budgets="0.4,1.5"), "--consolidate_cut_budgets='0.4,1.5' must be"),
    (dict(consolidate_from=0.5, consolidate_cut_budgets="0.4"),
     "consolidate_cut_budgets trains cuts of the factors: it needs"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_cut_budgets="0.4",
          consolidate_global_dropout=0.2), "both choose each step's cut"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_cut_budgets="1.0",
          consolidate_cut_joint=0.5), "consolidate_cut_joint adds the loss at a cut"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_cut_budgets="0.4",
          consolidate_cut_joint=1.0), r"--consolidate_cut_joint=1.0 must lie in \[0, 1\)"),
])
def test_lever_flags_are_validated(change, message):
  with pytest.raises(TrainError, match=message):
    cfg_lib.validate(tiny100(**change))


# ----------------------------------------------------------------------------
# Sharding rules.
# ----------------------------------------------------------------------------


def test_fsdp_spec_shards_the_largest_divisible_axis():
  P = jax.sharding.PartitionSpec
  assert shd.fsdp_spec((64, 172), 4) == P(None, "fsdp")  # both divide: the larger
  assert shd.fsdp_spec((172, 64), 4) == P("fsdp", None)
  assert shd.fsdp_spec((6, 64), 4) == P(None, "fsdp")
  assert shd.fsdp_spec((0,), 4) == P()      # SALAAD placeholders stay replicated
  assert shd.fsdp_spec((), 4) == P()
  assert shd.fsdp_spec((5, 7), 4) == P()
  assert shd.fsdp_spec((64, 64), 1) == P()


def test_mesh_shape_resolution_and_errors():
  assert shd.mesh_shape(tiny(mesh_data=-1, mesh_fsdp=4), 8) == (2, 4)
  assert shd.mesh_shape(tiny(mesh_data=8, mesh_fsdp=-1), 8) == (8, 1)
  with pytest.raises(TrainError, match="does not match the 8 devices"):
    shd.mesh_shape(tiny(mesh_data=2, mesh_fsdp=2), 8)
  with pytest.raises(TrainError, match="cannot be split"):
    shd.mesh_shape(tiny(mesh_data=-1, mesh_fsdp=3), 8)
  with pytest.raises(TrainError, match=r"--batch_size=6 is not divisible by 8 \(8 devices\)"):
    shd.check_batch_divisible("batch_size", 6, 8)


# ----------------------------------------------------------------------------
# Method registry.
# ----------------------------------------------------------------------------


def _sgd_optimizer(config, schedule):
  return optax.sgd(schedule, momentum=get_method("test_sgd").options["momentum"])


register_method("test_sgd", _sgd_optimizer, options={"momentum": 0.9, "nesterov": False},
                metrics=lambda params, opt_state: {"param_norm": optax.tree.norm(params)},
                description="plain SGD (a test of the registry)", overwrite=True)


@pytest.mark.slow  # trains the tiny model
def test_registered_method_trains_through_the_loop(tmp_path):
  result = train_and_evaluate(tiny(method="test_sgd", lr=0.1, steps=4, log_every=2),
                              str(tmp_path), devices=jax.devices()[:1])
  assert result["step"] == 4 and np.isfinite(result["eval_loss"])
  assert result["param_norm"] > 0  # the method's metrics reach the records
  run = load_run(str(tmp_path))
  assert run.method.name == "test_sgd" and run.step == 4


def test_method_options_and_unknown_method():
  method = get_method("test_sgd")
  assert method_options(method, tiny(method_options={"momentum": "0.5", "nesterov": "true"})) == {
      "momentum": 0.5, "nesterov": True}
  with pytest.raises(TrainError, match="has no option 'rank'"):
    method_options(method, tiny(method_options={"rank": "3"}))
  with pytest.raises(TrainError, match="--method='nope' is not a registered method"):
    get_method("nope")


# ----------------------------------------------------------------------------
# The loop: resume, devices, failure, read-back.
# ----------------------------------------------------------------------------


@pytest.mark.slow  # trains the tiny model
def test_stop_after_then_resume_reproduces_the_losses_bit_for_bit(tmp_path):
  one = jax.devices()[:1]
  full = train_and_evaluate(tiny(), str(tmp_path / "full"), devices=one)
  part = train_and_evaluate(tiny(stop_after=6), str(tmp_path / "split"), devices=one)
  assert part["interrupted"] == "stop_after" and part["step"] == 6
  rest = train_and_evaluate(tiny(), str(tmp_path / "split"), devices=one)
  assert rest["step"] == 12
  ref, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
  assert [s for s, _ in got] == list(range(1, 13))
  assert got == ref  # bit-identical floats on CPU
  assert full["eval_loss"] == rest["eval_loss"]


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  """(losses, final metrics) of 6 steps on one device."""
  wd = tmp_path_factory.mktemp("one")
  result = train_and_evaluate(tiny(steps=6), str(wd), devices=jax.devices()[:1])
  return train_losses(wd), result


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("layout", [dict(mesh_data=2, mesh_fsdp=4), dict(mesh_data=8),
                                    dict(parallelism="pmap")])
def test_multi_device_training_matches_one_device(tmp_path, layout, one_device_run):
  ref_losses, ref = one_device_run
  got = train_and_evaluate(tiny(steps=6, **layout), str(tmp_path))
  assert "interrupted" in got and got["step"] == 6
  np.testing.assert_allclose([v for _, v in train_losses(tmp_path)], [v for _, v in ref_losses],
                             rtol=2e-5)
  np.testing.assert_allclose(got["eval_loss"], ref["eval_loss"], rtol=2e-5)
  if layout.get("mesh_fsdp", 1) > 1:  # restore lands sharded on a mesh with an fsdp axis
    mesh = shd.make_mesh(tiny(mesh_data=2, mesh_fsdp=4))
    run = load_run(str(tmp_path), mesh=mesh)
    kernel = run.params["layers_0"]["mlp"]["up_proj"]["kernel"]  # (64, 172)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    mu = run.opt_state[1][0].mu["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec


def _blowup_optimizer(config, schedule):
  """SGD whose updates become infinite from the 6th step on."""
  return optax.chain(optax.sgd(schedule),
                     optax.scale_by_schedule(lambda count: jnp.where(count >= 5, jnp.inf, 1.0)))


register_method("test_blowup", _blowup_optimizer, overwrite=True,
                description="diverges at step 6 (a test of non-finite detection)")


@pytest.mark.slow  # trains the tiny model
def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path):
  wd = str(tmp_path)
  with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 7; .*"
                     r"last good checkpoint \(step 4\)"):
    train_and_evaluate(tiny(method="test_blowup"), wd, devices=jax.devices()[:1])
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4"]
  run = load_run(wd)
  assert run.step == 4
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(run.params))


@pytest.mark.slow  # trains the tiny model
def test_incompatible_workdir_is_refused_and_left_alone(tmp_path):
  wd = str(tmp_path)
  train_and_evaluate(tiny(steps=4), wd, devices=jax.devices()[:1])
  snapshot = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(wd) for p in fs}
  with pytest.raises(TrainError, match="different configuration .*seq_len: 32 -> 16"):
    train_and_evaluate(tiny(steps=4, seq_len=16), wd, devices=jax.devices()[:1])
  after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(wd) for p in fs}
  assert after == snapshot


@pytest.mark.slow  # trains the tiny model
def test_load_run_gives_back_a_usable_run(tmp_path):
  wd = str(tmp_path)
  result = train_and_evaluate(tiny(steps=4, eval_batches=3), wd, devices=jax.devices()[:1])
  run = load_run(wd)
  assert run.step == 4 and run.config == cfg_lib.read_config(wd)
  assert run.model_config.vocab_size == 256 and run.model_config.max_len == 32
  adam = run.opt_state[1][0]
  assert type(adam).__name__ == "ScaleByAdamState" and int(adam.count) == 4
  ds = make_eval_dataset(run.config)
  out = evaluate(run.model, run.params, ds, 3)
  assert out["tokens"] == 3 * 8 * 32
  np.testing.assert_allclose(out["loss"], result["eval_loss"], rtol=1e-6)
  np.testing.assert_allclose(out["perplexity"], np.exp(out["loss"]), rtol=1e-6)
  records = mt.read_records(os.path.join(wd, "metrics.jsonl"))
  assert {r["kind"] for r in records} == {"train", "eval"}
  train = [r for r in records if r["kind"] == "train"][-1]
  assert {"loss", "perplexity", "lr", "steps_per_sec", "tokens_per_sec", "eta_sec",
          "loss_floor"} <= set(train)
  with open(os.path.join(wd, "config.json")) as fh:
    assert json.load(fh)["vocab_size"] == 256
  assert isinstance(run.opt_state, tuple) and not isinstance(run.opt_state, TrainState)
