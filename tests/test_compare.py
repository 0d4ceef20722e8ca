"""``python -m benchmarks.compare``: budgets matched in bytes (checked against the
accounting), one SALAAD run deployed at every budget next to the baselines
trained for each, the results table with paired differences (against a hand
computation), the plot, resume and the one-line errors; and the fine-tuning
table."""

import json
import math
import shutil

import numpy as np
import pytest
from conftest import cached_dir, compare_app as _compare, run_app_cases
from helpers import COMPARE_COMMON as COMMON, TINY_MODEL as TINY, assert_one_line_error
from helpers import read_csv as _csv

from benchmarks import compare_budgets as cb
from benchmarks import compare_tables as tables
from salaad_jax.baselines import accounting, match_rank_target
from salaad_jax.deploy import accounting as deploy_accounting
from salaad_jax.deploy.summary import read_summary
from salaad_jax.train import TrainConfig, TrainError
from salaad_jax.train import config as cfg_lib
from salaad_jax.train import presets
from salaad_jax.train.flags import parse_field_overrides

# The comparison as it was before the fair protocol (compare's docstring).
LEGACY = ["--match=tokens", "--tune_trials=0", "--allow_tuning_seeds", "--controls=",
          "--curve_step=0", "--eval_split=validation", "--noeval_spread", "--eval_dtype=float32"]


# ---------------------------------------------------------------------------
# Budgets, without training.
# ---------------------------------------------------------------------------


def _bytes_by_hand(method, rank, density, fmt):
  """Bytes of a baseline from the deployment accounting (SALAAD's own)."""
  blocks = accounting.model_blocks(TINY)
  total = 2 * blocks.rest
  for m, n in blocks.shapes.values():
    if method == "lost":
      k = math.floor(density * n + 1e-9)
      total += 2 * ((m + n) * rank + m * k) + 4 * k
    else:
      nnz = math.floor(density * m * n + 1e-9) if method == "sltrain" else 0
      total += deploy_accounting.block_bytes(fmt or "coo", m, n, rank, nnz, 2)
  return total


@pytest.mark.parametrize("fmt", ["auto", "coo", "csr", "bitmap"])
@pytest.mark.parametrize("fraction", [0.4, 0.5, 0.6, 0.9])
def test_baselines_get_the_largest_rank_whose_bytes_fit(fmt, fraction):
  dense_bytes = 2 * sum([accounting.model_blocks(TINY).rest,
                         *(m * n for m, n in accounting.model_blocks(TINY).shapes.values())])
  target = cb.target(TINY, fraction, "bytes")
  assert target == math.floor(fraction * dense_bytes)
  for method in cb.RANKED:
    got = cb.match(method, TINY, target, "bytes", 0.03, fmt)
    formats = [got.fmt] if fmt != "auto" or method != "sltrain" else ["coo", "csr", "bitmap"]
    if method != "sltrain":
      assert got.fmt is None
    else:
      assert got.fmt == (fmt if fmt != "auto" else got.fmt) and got.fmt in formats
    # Its bytes are the accounting's, within the budget; one rank more does not fit
    # in the chosen format, nor (auto) in any other.
    assert got.bytes == _bytes_by_hand(method, got.rank, 0.03, got.fmt) <= target
    for f in formats:
      assert _bytes_by_hand(method, got.rank + 1, 0.03, f) > target
    if method == "sltrain" and fmt == "auto":
      fits = [f for f in formats if _bytes_by_hand(method, got.rank, 0.03, f) <= target]
      assert got.bytes == min(_bytes_by_hand(method, got.rank, 0.03, f) for f in fits)


def test_fill_target_is_the_largest_or_the_lower_median():
  assert cb.fill_target([5, 1, 3], "middle") == 3
  assert cb.fill_target([5, 1, 3, 4], "middle") == 3
  assert cb.fill_target([5, 1, 3], "largest") == 5
  assert cb.fill_target([2], "middle") == 2
  with pytest.raises(ValueError, match="fill must be one of"):
    cb.fill_target([1], "smallest")


def _tiny_by_hand():
  """(block shapes, parameters outside the blocks) of the tiny model from its
  config: per layer four d x d attention kernels and the d x d_ff gate and up
  and d_ff x d down kernels; outside them the untied embedding and head (V d
  each) and the RMSNorm scales (two per layer and the final one)."""
  d, f, layers = TINY.d_model, TINY.d_ff, TINY.n_layers
  assert not TINY.tie_embeddings
  shapes = ([(d, d)] * 4 + [(d, f), (d, f), (f, d)]) * layers
  return shapes, 2 * TINY.vocab_size * d + (2 * layers + 1) * d


def test_parameter_budgets_match_the_old_parameter_matching():
  shapes, rest = _tiny_by_hand()
  target = cb.target(TINY, 0.5, "params")
  assert target == math.floor(0.5 * (rest + sum(m * n for m, n in shapes)))
  # P(r) = P_rest + r sum_i (m_i + n_i) + the sparse part (SLTrain floor(0.03 m n)
  # entries, LOST m floor(0.03 n) column entries), so the largest rank that fits
  # is floor((target - P_rest - sparse) / sum_i (m_i + n_i)).
  sparse = {"lowrank": 0,
            "sltrain": sum(math.floor(0.03 * m * n + 1e-9) for m, n in shapes),
            "lost": sum(m * math.floor(0.03 * n + 1e-9) for m, n in shapes)}
  per_rank = sum(m + n for m, n in shapes)
  for method, fixed in sparse.items():
    rank = (target - rest - fixed) // per_rank
    got = cb.match(method, TINY, target, "params", 0.03, "coo")
    assert rank >= 1 and (got.rank, got.params) == (rank, rest + fixed + rank * per_rank), method


def test_salaad_rank_target_fills_the_largest_budget_in_bytes():
  targets = [cb.target(TINY, f, "bytes") for f in (0.4, 0.6, 0.5)]
  fmt = cb.salaad_format(TINY, 0.05, "auto")
  blocks = accounting.model_blocks(TINY).shapes.values()
  sparse = {f: sum(deploy_accounting.sparse_bytes(f, m, n, math.floor(0.05 * m * n), 2)
                   for m, n in blocks) for f in ("coo", "csr", "bitmap")}
  assert sparse[fmt] == min(sparse.values())
  r_star = cb.salaad_rank_target(TINY, targets, "bytes", 0.05, "auto")
  filled = (2 * accounting.model_blocks(TINY).rest + sparse[fmt]
            + sum(2 * r_star * min(m, n) * (m + n) for m, n in blocks))
  assert filled == pytest.approx(max(targets), rel=1e-12)
  # In parameters: P_rest + sum_i [r* min(m_i, n_i) (m_i + n_i) + d* m_i n_i] is the budget.
  shapes, rest = _tiny_by_hand()
  half = cb.target(TINY, 0.5, "params")
  r_star = cb.salaad_rank_target(TINY, [half], "params", 0.05, "coo")
  assert r_star == pytest.approx(match_rank_target(TINY, half, 0.05))
  assert rest + sum(r_star * min(m, n) * (m + n) + 0.05 * m * n for m, n in shapes) == (
      pytest.approx(half, rel=1e-12))


def test_budget_below_the_rest_or_too_small_for_a_method_is_a_value_error():
  with pytest.raises(ValueError, match="below the minimum representable"):
    cb.target(TINY, 0.2, "bytes")
  with pytest.raises(ValueError, match="smallest model of this method"):
    cb.match("sltrain", TINY, cb.target(TINY, 0.26, "bytes"), "bytes", 0.03, "coo")


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


def _run(method, seed, ppl, budget="", params=10, size=20):
  return {"method": method, "seed": seed, "budget": budget, "params": params, "bytes": size,
          "perplexity": ppl}


def test_summarize_pairs_salaad_with_each_method_at_the_same_budget():
  runs = [
      _run("dense", 0, 6.0), _run("dense", 1, 7.0), _run("dense", 2, 8.0),
      _run("sltrain", 0, 6.5, "0.5"), _run("sltrain", 1, 7.0, "0.5"),
      _run("sltrain", 2, 9.0, "0.5"),
      _run("salaad", 0, 7.0, "0.5", 9, 18), _run("salaad", 1, 8.0, "0.5", 11, 22),
      _run("salaad", 2, 8.5, "0.5", 10, 20),
      _run("sltrain", 0, 9.0, "0.4"),  # one seed: a difference, no standard error
      _run("salaad", 0, 10.0, "0.4"),
      _run("salaad_trained", 1, 8.0),
  ]
  rows = tables.summarize(runs)
  assert [(r["budget"], r["method"]) for r in rows] == [
      ("", "dense"), ("", "salaad_trained"), ("0.4", "salaad"), ("0.4", "sltrain"),
      ("0.5", "salaad"), ("0.5", "sltrain")]
  by = {(r["budget"], r["method"]): r for r in rows}
  sl, sa = by["0.5", "sltrain"], by["0.5", "salaad"]
  # salaad - sltrain per seed: 0.5, 1.0, -0.5.
  assert sl["vs_salaad"] == pytest.approx(1.0 / 3.0)
  assert sl["vs_salaad_se"] == pytest.approx(np.std([0.5, 1.0, -0.5], ddof=1) / math.sqrt(3))
  # each minus dense per seed: sltrain 0.5, 0, 1; salaad 1, 1, 0.5.
  assert sl["delta"] == pytest.approx(0.5)
  assert sl["delta_se"] == pytest.approx(0.5 / math.sqrt(3))
  assert sa["delta"] == pytest.approx(2.5 / 3) and sa["vs_salaad"] is None
  assert (sa["params"], sa["bytes"], sa["n"]) == (10, 20, 3)
  one = by["0.4", "sltrain"]
  assert one["vs_salaad"] == pytest.approx(1.0) and one["vs_salaad_se"] is None
  assert tables.delta_cell(one, "vs_salaad") == "+1.000"
  assert by["", "dense"]["delta"] is None and by["", "dense"]["vs_salaad"] is None
  assert by["", "salaad_trained"]["vs_salaad"] is None
  assert tables.paired_difference(runs[10:11], runs[:3]) == (4.0, None, 1)
  assert tables.paired_difference(runs[:1], runs[11:]) == (None, None, 0)


def test_aggregate_means_stds_and_paired_differences():
  runs = [
      {"method": "dense", "seed": 0, "params": 100, "bytes": 200, "perplexity": 10.0},
      {"method": "lowrank", "seed": 0, "params": 50, "bytes": 100, "perplexity": 11.0},
      {"method": "dense", "seed": 1, "params": 100, "bytes": 200, "perplexity": 12.0},
      {"method": "lowrank", "seed": 1, "params": 50, "bytes": 100, "perplexity": 12.5},
      {"method": "salaad", "seed": 1, "params": 60, "bytes": 150, "perplexity": 13.0,
       "x_perplexity": 12.0},
      {"method": "salaad", "seed": 2, "params": 64, "bytes": 154, "perplexity": 9.0,
       "x_perplexity": 8.0},
  ]
  rows = {r["method"]: r for r in tables.aggregate(runs)}
  assert list(rows) == ["dense", "lowrank", "salaad"]
  d, lr, sa = rows["dense"], rows["lowrank"], rows["salaad"]
  assert (d["n"], d["perplexity"]) == (2, 11.0)
  assert d["perplexity_std"] == pytest.approx(math.sqrt(2.0))
  assert d["delta"] is None
  # Paired: differences 1.0 and 0.5.
  assert lr["delta"] == pytest.approx(0.75)
  assert lr["delta_se"] == pytest.approx(np.std([1.0, 0.5], ddof=1) / math.sqrt(2))
  # Only seed 1 pairs with dense: one difference, no standard error.
  assert sa["delta"] == pytest.approx(1.0) and sa["delta_se"] is None
  assert (sa["params"], sa["bytes"], sa["x_perplexity"]) == (62, 152, 10.0)
  assert tables.ppl_cell(lr) == "11.750 ± 1.061"
  assert tables.delta_cell(lr) == "+0.750 ± 0.250"
  one = tables.aggregate(runs[:1])[0]
  assert one["perplexity_std"] is None and tables.ppl_cell(one) == "10.000"


def test_salaad_options_are_typed_trainconfig_fields():
  got = parse_field_overrides(["k_alpha=0.2", "every_k=10", "alpha_init=zero",
                               "include_head=true", "svt = exact"], "salaad_option")
  assert got == {"k_alpha": 0.2, "every_k": 10, "alpha_init": "zero", "include_head": True,
                 "svt": "exact"}
  assert isinstance(got["k_alpha"], float) and isinstance(got["every_k"], int)
  for item, needle in (("k_alpa=0.2", "'k_alpa' is not a TrainConfig field"),
                       ("every_k=2.5", "every_k takes a int"),
                       ("include_head=maybe", "include_head takes a bool"),
                       ("method=dense", "'method' is not a TrainConfig field"),
                       ("rho", "must be key=value")):
    with pytest.raises(TrainError, match=needle):
      parse_field_overrides([item], "salaad_option")


# ---------------------------------------------------------------------------
# The whole command, on a few steps over two seeds.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def compared(tmp_path_factory):
  """The command run once per test session (whichever xdist worker asks first
  runs it; the others wait for it and read its output)."""

  def build(path):
    done = _compare(*COMMON, *LEGACY, "--methods=dense,salaad,sltrain", "--seeds=0,1",
                    "--budgets=0.6,0.4", "--unit=bytes", "--spectrum_budgets=0.5,1.0",
                    "--salaad_option=k_beta=0.5", "--salaad_option=every_k=2",
                    f"--out={path / 'cmp'}", "--finetune_source=synthetic:order=1,seed=7",
                    "--finetune_steps=3", "--finetune_methods=full,salr", timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]

  out = cached_dir(tmp_path_factory, "compared", build) / "cmp"
  return out, _csv(out / "results.csv")


def test_results_have_one_row_per_method_seed_and_budget(compared):
  out, rows = compared
  assert list(rows[0])[:6] == ["method", "seed", "budget", "unit", "format", "rank"]
  assert {"bytes", "perplexity"} <= set(rows[0])
  per_seed = [("dense", ""), ("salaad_trained", ""),
              *((m, b) for b in ("0.4", "0.6") for m in ("salaad", "sltrain", "posthoc"))]
  assert [(r["method"], r["budget"], r["seed"]) for r in rows] == [
      (m, b, s) for s in ("0", "1") for m, b in per_seed]
  dense = int(rows[0]["bytes"])
  for r in rows:
    if r["budget"]:
      assert r["unit"] == "bytes"
      assert int(r["bytes"]) <= math.floor(float(r["budget"]) * dense), r  # matched budget
    if r["method"] in ("salaad", "posthoc", "sltrain"):
      assert r["format"] in ("coo", "csr", "bitmap"), r
  # A baseline row is its run at the matched rank; its bytes are the accounting's.
  for r in rows:
    if r["method"] == "sltrain":
      got = cb.match(r["method"], TINY, cb.target(TINY, float(r["budget"]), "bytes"),
                     "bytes", 0.03, "auto")
      assert (int(r["rank"]), int(r["bytes"]), r["format"] or None) == (
          got.rank, got.bytes, got.fmt)
      s = read_summary(r["workdir"])  # trained on the same batches as evaluated here
      assert float(r["perplexity"]) == pytest.approx(s["perplexity"], rel=1e-5)
      assert int(r["steps"]) == 4 and int(r["tokens"]) == 4 * 4 * 16
      assert r["workdir"].endswith(f"seed_{r['seed']}/{r['method']}_r{got.rank}")
  # One SALAAD run per seed: every deployed row comes from it, larger budgets keep more.
  for seed in ("0", "1"):
    deployed = [r for r in rows if r["method"] == "salaad" and r["seed"] == seed]
    assert {r["workdir"] for r in deployed} == {str(out / "runs" / f"seed_{seed}" / "salaad")}
    assert int(deployed[0]["bytes"]) <= int(deployed[1]["bytes"])
  # The seeds differ (initialisation and data order).
  assert rows[0]["perplexity"] != rows[len(per_seed)]["perplexity"]


def test_salaad_run_takes_its_options_and_fills_the_largest_budget(compared):
  out, _ = compared
  config = cfg_lib.read_config(str(out / "runs" / "seed_0" / "salaad"))
  assert (config.k_beta, config.every_k) == (0.5, 2)
  # Under the options, the default preset (recommended): its d*, its
  # consolidation, the authors' gains.
  assert config.salaad_preset == "recommended"
  rec = presets.preset_fields("recommended", "tiny", config.steps)
  assert (config.density_target, config.consolidate_from, config.k_alpha, config.rho) == (
      rec["density_target"], rec["consolidate_from"], rec["k_alpha"], rec["rho"])
  # --budgets=0.6,0.4: the structure fills the largest budget (the rule's r*
  # for these budgets), and trains its cut at the other and the whole.
  assert config.rank_target == pytest.approx(cb.salaad_rank_target(
      TINY, [cb.target(TINY, 0.6, "bytes")], "bytes", rec["density_target"], "auto"))
  assert config.rank_target == pytest.approx(presets.preset_fields(
      "recommended", "tiny", config.steps, (0.6, 0.4))["rank_target"])
  assert cfg_lib.cut_budgets(config) == (0.4, 1.0)
  # The baselines keep the shared settings.
  assert cfg_lib.read_config(str(out / "runs" / "seed_0" / "dense")).every_k == 10


def test_a_run_that_trained_its_cuts_is_deployed_at_them():
  fields = dict(model="tiny", steps=100, consolidate_from=0.5, consolidate_params="factors")
  for name, extra, unit, fmt, want in [
      ("cuts", dict(consolidate_cut_budgets="0.4,1.0"), "bytes", "auto", "cut"),
      ("cuts_bitmap", dict(consolidate_cut_budgets="0.4,1.0"), "bytes", "bitmap", "cut"),
      ("cuts_coo", dict(consolidate_cut_budgets="0.4,1.0"), "bytes", "coo", "global"),
      ("cuts_params", dict(consolidate_cut_budgets="0.4,1.0"), "params", "auto", "global"),
      ("priced", dict(consolidate_cut_budgets="0.4,1.0", consolidate_cut_bitmaps=True),
       "bytes", "auto", "global"),
      ("none", {}, "bytes", "auto", "global")]:
    assert cb.salaad_allocation(TrainConfig(**fields, **extra), unit, fmt) == want, name


def test_cut_budgets_are_the_deployments_below_the_fill_and_the_whole():
  assert cb.cut_budgets(TINY, [0.6, 0.4, 0.5], 0.5, "bytes") == [0.4, 1.0]
  assert cb.cut_budgets(TINY, [0.3, 0.4, 0.6], 0.6, "bytes") == [0.3, 0.4, 1.0, 1.0]
  assert cb.cut_budgets(TINY, [0.4, 0.6], 0.4, "bytes") == []
  # in parameters: the byte fraction whose harness conversion gives p back
  blocks = accounting.model_blocks(TINY)
  total = blocks.rest + sum(m * n for m, n in blocks.shapes.values())
  bitmaps = sum(math.ceil(m * n / 8) for m, n in blocks.shapes.values())
  got = cb.cut_budgets(TINY, [0.3, 0.5], 0.5, "params")
  assert got[0] == pytest.approx(0.3 + bitmaps / (2 * total)) and got[1] == 1.0


def test_table_plot_spectrum_and_finetuning(compared):
  out, rows = compared
  table = (out / "results.md").read_text()
  assert "2 seeds (0, 1)" in table and "salaad minus it" in table
  numeric = ("params", "bytes", "perplexity", "x_perplexity", "wall_s", "kept_rank", "kept_nnz")
  by_budget = tables.summarize([dict(r, **{k: float(r[k]) if r[k] else None for k in numeric})
                                for r in rows])
  sl = next(r for r in by_budget if (r["method"], r["budget"]) == ("sltrain", "0.4"))
  assert f"| 0.4 | sltrain | {sl['rank']} |" in table
  assert tables.delta_cell(sl, "vs_salaad") in table and tables.delta_cell(sl) in table
  assert (out / "results.png").stat().st_size > 0
  # The first seed's spectrum, the baselines as points in the same storage.
  spectrum = json.loads((out / "spectrum" / "spectrum.json").read_text())
  points = [r for r in spectrum if r["source"] == "baseline"]
  assert sorted(r["series"] for r in points) == sorted(
      f"{r['method']} r={r['rank']}" for r in rows
      if r["seed"] == "0" and r["method"] in ("sltrain", "lowrank"))
  assert {r["budget_fraction"] for r in spectrum if r["series"] == "salaad/global"} == {0.5, 1.0}

  ft = _csv(out / "finetune.csv")
  assert [(r["method"], r["seed"]) for r in ft] == [
      (m, s) for s in ("0", "1") for m in ("pretrained (no fine-tuning)", "full", "salr")]
  salr = read_summary(str(out / "finetune" / "seed_1" / "salr"))
  assert float(ft[5]["perplexity"]) == salr["perplexity"]
  assert int(ft[2]["trainable"]) < int(ft[1]["trainable"])
  # Fine-tuning on the new chain improves on the pretrained model.
  assert float(ft[1]["perplexity"]) < float(ft[0]["perplexity"])
  for name in ("finetune.md", "finetune.png", "spectrum/spectrum.png"):
    assert (out / name).stat().st_size > 0


def test_rerun_resumes_without_training(compared, tmp_path):
  shared, rows = compared
  out = tmp_path / "cmp"  # a copy: the other tests read the shared output
  shutil.copytree(shared, out)
  metrics = out / "runs" / "seed_0" / "sltrain_r4" / "metrics.jsonl"
  logged = metrics.read_text().count('"train"')
  again = _compare(*COMMON, *LEGACY, "--methods=dense,sltrain", "--seeds=0", "--budgets=0.4",
                   f"--out={out}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert metrics.read_text().count('"train"') == logged > 0
  rerun = {(r["method"], r["budget"]): r["perplexity"] for r in _csv(out / "results.csv")}
  first = {(r["method"], r["budget"]): r["perplexity"] for r in rows if r["seed"] == "0"}
  assert rerun == {k: first[k] for k in (("dense", ""), ("sltrain", "0.4"))}


BAD_INPUT = [
    (["--budgets=0.1"], "--budgets: 0.1"),
    (["--budgets=0.4,0.4"], "distinct"),
    (["--budgets=0.4,1.5"], "fractions in (0, 1]"),
    (["--budget_fraction=0.5", "--budgets=0.5"], "old form of --budgets=F --unit=params"),
    (["--methods=dense,svd"], "unknown ['svd']"),
    (["--methods=lowrank", "--finetune_source=synthetic"], "keep dense in --methods"),
    (["--salaad_option=k_alpa=1"], "'k_alpa' is not a TrainConfig field"),
    (["--salaad_option=rank_target=2"], "--rank_target=2.0 must lie in (0, 1)"),
    (["--source=/no/such/file.txt"], "/no/such/file.txt"),
    (["--methods=dense", "--seeds=100", "--tune_seeds=100"], "seed 100 was a tuning seed"),
    (["--methods=dense,salaad", "--seeds=1,10"], "seed 1 chose the SALAAD preset"),
    (["--controls=no_admm,other"], "unknown ['other']"),
    (["--match=tokens", "--train_flops=1e12"], "it needs --match=flops"),
    (["--tuned=no_such_name"], "no tuned settings 'no_such_name'"),
    (["--tune_trials=1", "--selection_split=test", "--eval_split=test"], "both 'test'"),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
  """Every BAD_INPUT case run by the command (forked from one process that
  imported the package once: conftest.run_app_cases), each with its own --out."""
  base = tmp_path_factory.mktemp("bad_input")
  cases = [["--source=synthetic:order=1", "--steps=2", f"--out={base / str(i)}", *args]
           for i, (args, _) in enumerate(BAD_INPUT)]
  return base, run_app_cases("benchmarks.compare", cases)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(BAD_INPUT)),
                         ids=[needle for _, needle in BAD_INPUT])
def test_bad_input_is_a_short_error(refused, case):
  base, results = refused
  assert_one_line_error(results[case], BAD_INPUT[case][1], prefix="", alone=True)
  assert not (base / str(case) / "results.csv").exists()
