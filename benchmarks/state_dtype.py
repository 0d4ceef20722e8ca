r"""What storing SALAAD's state compactly or in bfloat16 costs in quality.

    python -m benchmarks.state_dtype --source=/path/to/tinyshakespeare.txt \
        --steps=1000 --seeds=0,1,2 --out=/tmp/state_dtype

For every seed, SALAAD is trained once per ``--state_dtype_variants`` entry,
``<state_dtype>:<dual_dtype>[:<sparse_capacity>]`` (S : the scaled dual U :
S's capacity, 'auto' (the default when left out), 'none' (S dense) or a
fraction), with the settings of ``benchmarks.compare`` (same data order, tokens,
schedule, r* matched to ``--budget_fraction`` (default 0.5) of the dense parameters), then
deployed at ``--budget_fraction`` of the dense model's *bytes* (global
allocation, §6 accounting: bf16 values, int32 indices, COO).  The table gives
the mean ± std over seeds of the deployed perplexity (and of the dense X's),
and the per-seed paired difference to the first variant (the float32 state),
mean ± standard error.  Runs log every round, and the *overflow* column counts
the logged rounds in which some block's S-step result held more entries than
its capacity (its ``density`` stat above the capacity fraction), per seed.
``results_state_dtype.md`` / ``.csv`` go to ``--out``; every run resumes from
its workdir.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags
import numpy as np

from benchmarks import compare
from benchmarks import compare_tables as tables
from experiments import common
from salaad_jax import compact
from salaad_jax.baselines import harness, match_rank_target
from salaad_jax.deploy import spectrum as sp
from salaad_jax.train import config as config_lib
from salaad_jax.train import metrics as metrics_lib
from salaad_jax.train.state import model_config

_VARIANTS = flags.DEFINE_list("state_dtype_variants", ["float32:float32:none", "bfloat16:bfloat16:none"],
                              "<state_dtype>:<dual_dtype>[:<sparse_capacity>] storage variants "
                              "to compare (capacity 'auto' when left out); the first is the "
                              "reference of the paired differences")
_DTYPES = ("float32", "bfloat16")


def _parse(variant: str) -> tuple[str, str, str]:
  parts = variant.split(":")
  if len(parts) == 2:
    parts.append("auto")
  ok = len(parts) == 3 and set(parts[:2]) <= set(_DTYPES)
  if ok:
    try:
      config_lib.validate(config_lib.TrainConfig(sparse_capacity=parts[2]))
    except config_lib.TrainError:
      ok = False
  if not ok:
    common.fail(f"--state_dtype_variants: {variant!r} is not <state_dtype>:<dual_dtype>"
                f"[:<sparse_capacity>] with dtypes in {list(_DTYPES)} and a capacity "
                "'auto', 'none' or a fraction in (0, 1]")
  return parts[0], parts[1], parts[2]


def _fraction() -> float:
  """The deployment budget: --budget_fraction of the dense bytes, 0.5 when unset."""
  return 0.5 if compare._FRACTION.value is None else compare._FRACTION.value


def overflow_rounds(workdir: str, capacity: str, density_target: float) -> str:
  """'k/N': logged rounds with some block's density above its capacity
  fraction ('' for dense S)."""
  if capacity == "none":
    return ""
  frac = (min(1.0, compact.AUTO_FACTOR * density_target) if capacity == "auto"
          else float(capacity))
  records = [r for r in metrics_lib.read_records(os.path.join(workdir, metrics_lib.METRICS_FILE))
             if r.get("kind") == "train"]
  over = [max((v for k, v in r.items() if k.endswith("/density")), default=0.0) > frac + 1e-6
          for r in records]
  return f"{int(np.sum(over))}/{len(over)}"


def run_variant(variant: str, rank_target: float, seed: int) -> dict:
  """Trains SALAAD with S stored in one dtype and U in another (S at a
  capacity or dense), deploys it at the byte budget; returns its run row."""
  state_dtype, dual_dtype, capacity = _parse(variant)
  name = f"salaad_{state_dtype}_{dual_dtype}" + ("" if capacity == "none" else f"_cap{capacity}")
  wd = os.path.join(compare._OUT.value, "runs", f"seed_{seed}", name)
  settings = compare.salaad_settings(rank_target=rank_target)
  config = compare.base_config("salaad", seed, state_dtype=state_dtype, dual_dtype=dual_dtype,
                               sparse_capacity=capacity, **settings)
  config = dataclasses.replace(config, log_every=config.every_k)  # log every round
  result = common.train(config, wd)
  common.write_summary(wd, result)
  fraction = _fraction()
  try:
    rows = sp.capacity_spectrum(wd, [fraction], methods=("global",), posthoc=False,
                                unit="bytes", progress=None)
  except sp.SpectrumError as e:
    common.fail(str(e))
  (row,) = [r for r in rows if r["source"] == "salaad"]
  return {"method": variant, "seed": seed, "rank": f"r* {rank_target:.3f}",
          "params": row["params"], "bytes": row["bytes"], "perplexity": row["perplexity"],
          "x_perplexity": result["eval_perplexity"], "wall_s": result["wall_time_sec"],
          "overflow": overflow_rounds(wd, capacity, config.density_target)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logging()
  variants = _VARIANTS.value
  for v in variants:
    _parse(v)
  seeds = [int(s) for s in compare._SEEDS.value]
  probe = compare.base_config("dense", seeds[0], vocab_size=256)
  mcfg = model_config(probe)
  dense_params = int(harness.run_footprint(probe).params)
  target = int(_fraction() * dense_params)
  try:
    rank_target = compare._SALAAD_RANK.value or match_rank_target(
        mcfg, target, compare.salaad_settings()["density_target"])
  except ValueError as e:
    common.fail(f"--budget_fraction={_fraction():g}: {e}")
  os.makedirs(compare._OUT.value, exist_ok=True)
  runs = []
  for seed in seeds:
    for variant in variants:
      print(f"== seed {seed}: SALAAD, S : U stored in {variant}", flush=True)
      runs.append(run_variant(variant, rank_target, seed))
      print(f"   deployed ppl {runs[-1]['perplexity']:.3f} "
            f"(X {runs[-1]['x_perplexity']:.3f})", flush=True)
  out = compare._OUT.value
  tables.write_csv(os.path.join(out, "results_state_dtype.csv"), runs,
                   ["method", "seed", "params", "bytes", "perplexity", "x_perplexity",
                    "wall_s", "overflow"])
  rows = tables.aggregate(runs, reference=variants[0])
  overflow = {v: ", ".join(r["overflow"] for r in runs if r["method"] == v) for v in variants}
  dense_bytes = dense_params * 2  # bf16 values
  header = (f"Model `{compare._MODEL.value}`, {compare._STEPS.value} steps of "
            f"{compare._BATCH.value}x{compare._SEQ.value} tokens on "
            f"`{os.path.basename(compare._SOURCE.value)}`, seeds {', '.join(map(str, seeds))}; "
            f"SALAAD (r* {rank_target:.3f}) deployed at {_fraction():g} x the dense "
            f"bytes ({dense_bytes:,} in bf16), global allocation.")
  columns = [
      ("S : U storage : S capacity", "", lambda r: r["method"]),
      ("deployed params", ":", lambda r: f"{r['params']:,}"),
      ("deployed bytes", ":", lambda r: f"{r['bytes']:,}"),
      ("deployed val. perplexity", ":", tables.ppl_cell),
      ("X val. perplexity", ":", lambda r: f"{r['x_perplexity']:.3f}"),
      (f"vs {variants[0]} (paired)", ":", tables.delta_cell),
      ("overflow rounds per seed", ":", lambda r: overflow[r["method"]]),
      ("time (s)", ":", lambda r: f"{r['wall_s']:.0f}"),
  ]
  table = tables.markdown(header, columns, rows)
  with open(os.path.join(out, "results_state_dtype.md"), "w") as f:
    f.write(table)
  print(table, flush=True)


if __name__ == "__main__":
  app.run(main)
