"""The Hugging Face export (``salaad_jax.deploy.hf``, ``experiments.export``)
checked against the real ``transformers`` client, and the way back
(``import_hf``, ``--init_from_hf``).

The trained model is the session's tiny SALAAD run (``shakespeare_runs`` in
tests/conftest.py, shared with test_spectrum.py and test_pretrain_app.py),
exported by the app at 0.5 of the dense bytes.  ``transformers`` loads the
directory with ``LlamaForCausalLM.from_pretrained`` and must give our Flax
model's float32 logits on the same deployed weights within 1e-4, and the same
32 greedy tokens.  Each of three wrong layouts (the other rotary pairing, a
missing norm weight, a transposed square kernel) must break that match.

torch and transformers come with the ``hf`` extra, which CI installs
(``pip install -e ".[test,hf]"``); a local environment without them skips
this module.
"""

import dataclasses
import functools
import importlib
import json
import os
import subprocess
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from salaad_jax.data.tokenizers import ByteTokenizer, get_tokenizer  # pylint: disable=wrong-import-position
from salaad_jax.deploy import compact_files, deployed, hf  # pylint: disable=wrong-import-position
from salaad_jax.models.llama import Llama, generate  # pylint: disable=wrong-import-position
from salaad_jax.train import TrainError  # pylint: disable=wrong-import-position
from salaad_jax.train.warm_start import hf_params  # pylint: disable=wrong-import-position

from conftest import run_app, run_app_cases  # pylint: disable=wrong-import-position
from helpers import assert_one_line_error  # pylint: disable=wrong-import-position

BUDGET = 0.5
TOLERANCE = 1e-4
NEW_TOKENS = 32
TEXT = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and "
        "Juliet is the sun.\nArise, fair sun, and kill the envious moon,\n")


def export_app(*args) -> subprocess.CompletedProcess:
  return run_app("experiments.export", *args, timeout=240)


@pytest.fixture(scope="module")
def exported(shakespeare_runs, tmp_path_factory):
  """(export directory, deployed model): the app's export at 0.5 of the
  bytes, and the same deployment computed here."""
  out = tmp_path_factory.mktemp("hf") / "model"
  done = export_app(f"--workdir={shakespeare_runs.salaad}", f"--budget={BUDGET}",
                    "--unit=bytes", "--format=hf", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "50.0% of dense bytes" in done.stdout, done.stdout
  return out, deployed.deployed(str(shakespeare_runs.salaad), BUDGET, unit="bytes")


def flax_logits(dep, tokens) -> np.ndarray:
  model = Llama(dep.config.replace(dtype="float32"))
  return np.asarray(model.apply({"params": dep.params}, jnp.asarray(tokens, jnp.int32)))


def hf_model(directory):
  model = transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
  return model.eval()


def hf_logits(directory, tokens) -> np.ndarray:
  with torch.no_grad():
    return hf_model(directory)(torch.tensor(np.asarray(tokens), dtype=torch.long)
                               ).logits.numpy()


def batch(length: int = 64) -> np.ndarray:
  ids = ByteTokenizer().encode(TEXT)
  return np.stack([ids[:length], ids[len(ids) - length:]])


def max_diff(directory, dep, tokens) -> float:
  return float(np.abs(hf_logits(directory, tokens) - flax_logits(dep, tokens)).max())


def test_transformers_gives_our_logits(exported):
  out, dep = exported
  tokens = batch()
  assert tokens.shape == (2, 64) and len(set(tokens[0])) > 10
  assert dep.info["bytes_fraction"] <= BUDGET and dep.info["params"] < dep.info["bytes"]
  diff = max_diff(out, dep, tokens)
  print(f"max abs logit difference, transformers vs Flax: {diff:.3g}")
  assert diff <= TOLERANCE, diff
  with open(out / "config.json") as f:
    config = json.load(f)
  assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"


def test_greedy_generation_gives_our_tokens(exported):
  out, dep = exported
  prompt = batch()[:, :16]
  ours = generate(Llama(dep.config.replace(dtype="float32")), dep.params, prompt, NEW_TOKENS,
                  jax.random.key(0), temperature=0.0)
  with torch.no_grad():
    theirs = hf_model(out).generate(torch.tensor(prompt, dtype=torch.long),
                                    attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False)
  assert theirs.shape == (2, 16 + NEW_TOKENS)
  np.testing.assert_array_equal(theirs.numpy(), np.asarray(ours))


def test_auto_tokenizer_is_the_byte_tokenizer(exported):
  out, _ = exported
  theirs, ours = transformers.AutoTokenizer.from_pretrained(str(out)), ByteTokenizer()
  assert theirs.eos_token_id == ours.eos_id == 0 and len(theirs) == 256
  for text in (TEXT, "naïve café — 日本語 🙂", "a\x00b  \n\t end ", ""):
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text).tolist()
    assert theirs.decode(ids) == ours.decode(ids) == text
  assert theirs.decode([0xE6, 0x97]) == ours.decode([0xE6, 0x97])  # cut UTF-8: U+FFFD


def _swap_rotary(monkeypatch):
  monkeypatch.setattr(hf, "ROTARY_LAYOUT", "interleaved")


def _edit_tensors(edit):
  def patch(monkeypatch):
    original = hf.to_hf_tensors
    monkeypatch.setattr(hf, "to_hf_tensors", lambda *a, **k: edit(original(*a, **k)))
  return patch


def _drop(name):
  return _edit_tensors(lambda t: {k: v for k, v in t.items() if k != name})


def _transpose(name):
  return _edit_tensors(lambda t: {**t, name: np.ascontiguousarray(t[name].T)})


MUTATIONS = {
    "rotary pairs interleaved": _swap_rotary,
    "no input_layernorm weight": _drop("model.layers.1.input_layernorm.weight"),
    "no final norm weight": _drop("model.norm.weight"),
    "o_proj kernel not transposed": _transpose("model.layers.0.self_attn.o_proj.weight"),
    "q_proj kernel not transposed": _transpose("model.layers.0.self_attn.q_proj.weight"),
}


@pytest.fixture(scope="module")
def initialised(exported):
  """The deployed model's config with freshly initialised weights and norm
  scales drawn from U(0.5, 1.5), so that every block and norm holds weights
  whatever the run learned (a run on the synthetic corpus, where the real
  text is absent, may deploy an empty k_proj, under which attention is
  uniform and the layout of q does not show)."""
  _, dep = exported
  model = Llama(dep.config.replace(dtype="float32"))
  params = model.init(jax.random.key(0), jnp.asarray(batch(8), jnp.int32))["params"]
  key = lambda path: jax.random.key(zlib.crc32(jax.tree_util.keystr(path).encode()))
  draw = lambda path, x: (jax.random.uniform(key(path), x.shape, x.dtype, 0.5, 1.5)
                          if path[-1].key == "scale" else x)
  return dataclasses.replace(dep, params=jax.tree_util.tree_map_with_path(draw, params))


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_wrong_layout_breaks_the_match(initialised, tmp_path, monkeypatch, mutation):
  dep = initialised
  MUTATIONS[mutation](monkeypatch)
  hf.export_hf(tmp_path / "m", dep.params, dep.config)
  diff = max_diff(tmp_path / "m", dep, batch())
  print(f"{mutation}: max abs logit difference {diff:.3g}")
  assert diff > TOLERANCE, diff  # the match test would fail


def test_round_trip_through_import_and_init_from_hf(exported):
  out, dep = exported
  config, params = hf.import_hf(out, dep.config)
  assert config == dep.config
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, dep.params))
  again = hf_params(str(out), dep.config)  # what --init_from_hf starts from
  jax.tree.map(np.testing.assert_array_equal, again, params)
  tokens = batch()
  np.testing.assert_array_equal(flax_logits(dataclasses.replace(dep, params=params), tokens),
                                flax_logits(dep, tokens))
  with pytest.raises(TrainError, match="another shape than this run's model: d_model 64"):
    hf_params(str(out), dep.config.replace(d_model=32, n_heads=2))


def test_lora_fine_tunes_from_a_hugging_face_checkpoint(exported, tmp_path):
  """What ``experiments.finetune --init_from_hf=DIR --method=lora`` runs: the
  preset and vocabulary of the checkpoint's shape, its weights as the frozen
  base (LoRA's B = 0: the first evaluation is the exported model's)."""
  from salaad_jax.train import TrainConfig, train_and_evaluate  # pylint: disable=import-outside-toplevel
  from salaad_jax.train.run import load_run  # pylint: disable=import-outside-toplevel
  out, dep = exported
  settings = hf.model_settings(out)
  assert settings == {"model": "tiny", "vocab_size": 256, "tokenizer": "byte"}
  config = TrainConfig(method="lora", init_from_hf=str(out), source="synthetic:order=1",
                       dtype="float32", steps=1, warmup_steps=0, batch_size=2, seq_len=32,
                       eval_batches=1, eval_every=0, checkpoint_every=0, log_every=1,
                       **settings)
  result = train_and_evaluate(config, str(tmp_path / "ft"), devices=jax.devices()[:1])
  assert result["step"] == 1
  base = load_run(str(tmp_path / "ft")).params["frozen"]["base"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base),
               jax.tree.map(np.asarray, dep.params))
  with pytest.raises(hf.HFError, match="no model preset has its shape"):
    hf.model_settings(_reshaped_export(out, tmp_path / "odd"))


def _reshaped_export(out, target):
  """A copy of the export whose config claims another width."""
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(out, target)
  with open(target / "config.json") as f:
    config = json.load(f)
  config["hidden_size"], config["head_dim"] = 96, 24
  with open(target / "config.json", "w") as f:
    json.dump(config, f)
  return target


def test_sharded_weights_load_the_same(exported, tmp_path):
  out, dep = exported
  files = hf.export_hf(tmp_path / "s", dep.params, dep.config, tokenizer="byte",
                       max_shard_bytes=100_000)
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 2 and hf.INDEX in files and hf.WEIGHTS not in files
  tokens = batch()
  np.testing.assert_array_equal(hf_logits(tmp_path / "s", tokens), hf_logits(out, tokens))
  _, params = hf.import_hf(tmp_path / "s")
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, dep.params))


def test_bfloat16_export_is_close(exported, tmp_path):
  out, dep = exported
  hf.export_hf(tmp_path / "b", dep.params, dep.config, dtype="bfloat16")
  assert os.path.getsize(tmp_path / "b" / hf.WEIGHTS) < 0.6 * os.path.getsize(out / hf.WEIGHTS)
  tokens = batch()
  assert np.abs(hf_logits(tmp_path / "b", tokens) - flax_logits(dep, tokens)).max() < 0.5


def test_dense_run_exports_whole(shakespeare_runs, tmp_path):
  dep = deployed.deployed(str(shakespeare_runs.dense), 1.0)
  assert dep.info["run_method"] == "dense"
  hf.export_hf(tmp_path / "d", dep.params, dep.config)
  assert max_diff(tmp_path / "d", dep, batch()) <= TOLERANCE


@pytest.mark.parametrize("method", ["lowrank", "sltrain", "lost"])
def test_baselines_export_their_dense_form(method, tmp_path):
  """A structured baseline (here at its initialisation) exports the dense
  Llama computing its function: transformers gives its own model's logits."""
  from salaad_jax.train import TrainConfig  # pylint: disable=import-outside-toplevel
  from salaad_jax.train.run import Run  # pylint: disable=import-outside-toplevel
  from salaad_jax.train.state import build, init_state, model_variables  # pylint: disable=import-outside-toplevel
  config = TrainConfig(method=method, model="tiny", vocab_size=256, seq_len=64,
                       dtype="float32", steps=1, warmup_steps=0)
  parts = build(config)
  params = init_state(config, parts.model, parts.method, parts.tx).params
  run = Run(config, parts.model_config, parts.model, params, None, 0, parts.method, {})
  dep = deployed.deployed(run, 1.0)
  hf.export_hf(tmp_path / method, dep.params, dep.config)
  tokens = batch()
  ours = np.asarray(parts.model.apply(model_variables(params), jnp.asarray(tokens)))
  assert np.abs(hf_logits(tmp_path / method, tokens) - ours).max() <= TOLERANCE
  with pytest.raises(deployed.DeployError, match="has a fixed size"):
    deployed.deployed(run, 0.5)


def test_compact_form_round_trips(exported, shakespeare_runs, tmp_path):
  """The compact files hold the allocation of the dense export: per block
  A B^T + S (COO) is its X_hat (up to bf16 rounding), and they are the
  parameter tree of the structured Llama ``load_compact`` returns."""
  export_lib = importlib.import_module("salaad_jax.deploy.export")
  _, dep = exported
  manifest = compact_files.export_run(tmp_path / "c", str(shakespeare_runs.salaad), BUDGET,
                                      unit="bytes")
  assert manifest["bytes"] == dep.info["bytes"] <= BUDGET * manifest["dense_bytes"]
  assert {p: b["rank"] for p, b in manifest["blocks"].items()} == dep.info["ranks"]
  model, params, _ = compact_files.load_compact(tmp_path / "c")
  assert export_lib._signature(export_lib._abstract_params(model)) == export_lib._signature(params)  # pylint: disable=protected-access
  for path, block in manifest["blocks"].items():
    *keys, _ = path.split("/")
    node = functools.reduce(lambda t, k: t.get(k, {}), keys, params)
    if not node:  # an empty block holds no array (the synthetic corpus's run has one)
      assert block["rank"] == block["nnz"] == 0, (path, block)
    stored = jax.tree.map(lambda x: np.asarray(x, np.float32), node)
    x = np.zeros((block["m"], block["n"]), np.float32)
    if block["rank"]:
      x += stored["lr_a"] @ stored["lr_b"].T
    if block["nnz"]:
      np.add.at(x, (stored["sp_rows"].astype(int), stored["sp_cols"].astype(int)),
                stored["sp_values"])
    want = np.asarray(functools.reduce(lambda t, k: t[k], path.split("/"), dep.params))
    np.testing.assert_allclose(x, want, atol=0.02 * np.abs(want).max())


def test_sentencepiece_tokenizer_loads_in_transformers(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  lines = [f"the {w} sat on the mat number {i}" for i, w in
           enumerate(["cat", "dog", "bird", "fish"] * 50)]
  (tmp_path / "corpus.txt").write_text("\n".join(lines))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"),
                                 model_prefix=str(tmp_path / "sp"), vocab_size=48,
                                 model_type="unigram", minloglevel=2)
  from salaad_jax.models.configs import get_config  # pylint: disable=import-outside-toplevel
  from salaad_jax.models.llama import init_params  # pylint: disable=import-outside-toplevel
  config = get_config("tiny", vocab_size=48)
  params = init_params(config, jax.random.key(0))
  hf.export_hf(tmp_path / "sp_hf", params, config, tokenizer=str(tmp_path / "sp.model"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "sp_hf"))
  ours = get_tokenizer(str(tmp_path / "sp.model"))
  for text in ("the dog sat on the mat", "the bird sat on the mat number 12",
               "  the  cat\nnumber 12", "Zebra unicode ü"):  # runs of spaces, unknowns
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text).tolist()
    assert "⁇" in ours.decode(ids) or theirs.decode(ids) == ours.decode(ids)
  assert theirs.eos_token_id == ours.eos_id


# ---------------------------------------------------------------------------
# Bad input: one line, nothing written.
# ---------------------------------------------------------------------------

BAD_INPUT = [
    (["--budget=0.01", "--unit=bytes"], "is below the minimum representable"),
    (["--format=onnx"], "--format='onnx' is not one of ['hf', 'compact']"),
    (["--budget=0.5", "--dense"], "has a fixed size"),
    (["--workdir=/no/such/run"], "--workdir=/no/such/run: no such directory"),
    (["--nonempty"], "is not empty; pass --overwrite"),
    (["--nonempty", "--overwrite"], "holds files that are not an export"),
    (["--budget=abc"], "budget 'abc' is neither a fraction"),
]


@pytest.fixture(scope="module")
def refused(shakespeare_runs, tmp_path_factory):
  base = tmp_path_factory.mktemp("bad_export")
  cases = []
  for i, (args, _) in enumerate(BAD_INPUT):
    out = base / str(i)
    if "--nonempty" in args:
      out.mkdir()
      (out / "keep.txt").write_text("mine")
    run = shakespeare_runs.dense if "--dense" in args else shakespeare_runs.salaad
    flags = [a for a in args if a not in ("--nonempty", "--dense")]
    if not any(a.startswith("--workdir") for a in flags):
      flags.append(f"--workdir={run}")
    cases.append([f"--out={out}", *flags])
  return base, run_app_cases("experiments.export", cases)


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[n for _, n in BAD_INPUT])
def test_bad_input_is_one_line_and_writes_nothing(refused, case):
  base, results = refused
  assert_one_line_error(results[case], BAD_INPUT[case][1], returncode=1, alone=True)
  out_dir = base / str(case)
  if "--nonempty" in BAD_INPUT[case][0]:
    assert sorted(os.listdir(out_dir)) == ["keep.txt"]
  else:
    assert not out_dir.exists()
  assert not [p for p in os.listdir(base) if p.startswith(".")]  # no half-written directory

