r"""What storing SALAAD's state in bfloat16 costs in quality.

    python -m benchmarks.state_dtype --source=/path/to/tinyshakespeare.txt \
        --steps=1000 --seeds=0,1,2 --out=/tmp/state_dtype

For every seed, SALAAD is trained once per ``--state_dtype_variants`` entry,
``<state_dtype>:<dual_dtype>`` (S : the scaled dual U),
with the settings of ``benchmarks.compare`` (same data order, tokens,
schedule, r* matched to ``--budget_fraction`` of the dense parameters), then
deployed at ``--budget_fraction`` of the dense model's *bytes* (global
allocation, §6 accounting: bf16 values, int32 indices, COO).  The table gives
the mean ± std over seeds of the deployed perplexity (and of the dense X's),
and the per-seed paired difference to the first variant (the float32 state),
mean ± standard error.  ``results_state_dtype.md`` / ``.csv`` go to ``--out``;
every run resumes from its workdir.
"""

from __future__ import annotations

import os

from absl import app, flags

from benchmarks import compare
from benchmarks import compare_tables as tables
from experiments import common
from salaad_jax.baselines import harness, match_rank_target
from salaad_jax.deploy import spectrum as sp
from salaad_jax.train.state import model_config

_VARIANTS = flags.DEFINE_list("state_dtype_variants", ["float32:float32", "bfloat16:bfloat16"],
                              "<state_dtype>:<dual_dtype> storage variants to compare; the "
                              "first is the reference of the paired differences")
_DTYPES = ("float32", "bfloat16")


def _parse(variant: str) -> tuple[str, str]:
  parts = variant.split(":")
  if len(parts) != 2 or not set(parts) <= set(_DTYPES):
    common.fail(f"--state_dtype_variants: {variant!r} is not <state_dtype>:<dual_dtype> "
                f"with dtypes in {list(_DTYPES)}")
  return parts[0], parts[1]


def run_variant(variant: str, rank_target: float, seed: int) -> dict:
  """Trains SALAAD with S stored in one dtype and U in another, deploys it
  at the byte budget; returns its run row."""
  state_dtype, dual_dtype = _parse(variant)
  wd = os.path.join(compare._OUT.value, "runs", f"seed_{seed}",
                    f"salaad_{state_dtype}_{dual_dtype}")
  config = compare.base_config("salaad", seed, state_dtype=state_dtype, dual_dtype=dual_dtype,
                               **compare.salaad_settings(rank_target=rank_target))
  result = common.train(config, wd)
  common.write_summary(wd, result)
  fraction = compare._FRACTION.value
  try:
    rows = sp.capacity_spectrum(wd, [fraction], methods=("global",), posthoc=False,
                                unit="bytes", progress=None)
  except sp.SpectrumError as e:
    common.fail(str(e))
  (row,) = [r for r in rows if r["source"] == "salaad"]
  return {"method": variant, "seed": seed, "rank": f"r* {rank_target:.3f}",
          "params": row["params"], "bytes": row["bytes"], "perplexity": row["perplexity"],
          "x_perplexity": result["eval_perplexity"], "wall_s": result["wall_time_sec"]}


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
  target = int(compare._FRACTION.value * dense_params)
  try:
    rank_target = compare._SALAAD_RANK.value or match_rank_target(
        mcfg, target, compare._SALAAD_DENSITY.value)
  except ValueError as e:
    common.fail(f"--budget_fraction={compare._FRACTION.value:g}: {e}")
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
                    "wall_s"])
  rows = tables.aggregate(runs, reference=variants[0])
  dense_bytes = dense_params * 2  # bf16 values
  header = (f"Model `{compare._MODEL.value}`, {compare._STEPS.value} steps of "
            f"{compare._BATCH.value}x{compare._SEQ.value} tokens on "
            f"`{os.path.basename(compare._SOURCE.value)}`, seeds {', '.join(map(str, seeds))}; "
            f"SALAAD (r* {rank_target:.3f}) deployed at {compare._FRACTION.value:g} x the dense "
            f"bytes ({dense_bytes:,} in bf16), global allocation.")
  columns = [
      ("S : U storage", "", lambda r: r["method"]),
      ("deployed params", ":", lambda r: f"{r['params']:,}"),
      ("deployed bytes", ":", lambda r: f"{r['bytes']:,}"),
      ("deployed val. perplexity", ":", tables.ppl_cell),
      ("X val. perplexity", ":", lambda r: f"{r['x_perplexity']:.3f}"),
      (f"vs {variants[0]} (paired)", ":", tables.delta_cell),
      ("time (s)", ":", lambda r: f"{r['wall_s']:.0f}"),
  ]
  table = tables.markdown(header, columns, rows)
  with open(os.path.join(out, "results_state_dtype.md"), "w") as f:
    f.write(table)
  print(table, flush=True)


if __name__ == "__main__":
  app.run(main)
