"""Step time and memory of SALAAD against the same model trained with AdamW.

    python -m benchmarks.step_time --model=tiny --batch=8 --seq=128 --every_k=10
    python -m benchmarks.step_time --model=130m --batch=128 --seq=256 --every_k=10

In one process, for one LLaMA size, measures

  (a) dense: clip(1.0) + AdamW (the baseline),
  (b) salaad, exact SVT (full SVD every K steps, the reference design),
  (c) salaad, fast SVT (warm-started subspace iteration at bounded rank),

and prints for each (timed interleaved, K steps of each variant in turn):
compile time, the median time of an ordinary step, the
time of a step that runs the ADMM round, the step time amortised over K
(((K - 1) * ordinary + round) / K), the optimizer-state bytes, the bytes the
compiled step needs (XLA memory analysis: arguments + outputs + temporaries
- aliased), and the ratios to (a).  ``--variants`` picks a subset;
``--json`` writes the numbers to a file.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import salaad_jax as sj
from salaad_jax import models

_MODEL = flags.DEFINE_string("model", "tiny", "model preset (tiny, small, 60m, 130m, 350m, 1b)")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences per step")
_SEQ = flags.DEFINE_integer("seq", 128, "sequence length")
_K = flags.DEFINE_integer("every_k", 10, "K: steps between ADMM rounds")
_CYCLES = flags.DEFINE_integer("cycles", 3, "timed K-step cycles per variant")
_VARIANTS = flags.DEFINE_list("variants", ["dense", "exact", "fast"], "variants to run")
_STATE_DTYPE = flags.DEFINE_enum("state_dtype", "float32", ["float32", "bfloat16"],
                                 "storage dtype of S and U")
_SVT_ITERS = flags.DEFINE_integer("svt_iters", 2, "subspace iterations per round (fast)")
_MAX_RANK = flags.DEFINE_integer("max_rank", None, "factor rank bound (fast); default 2 r* k + 8")
_JSON = flags.DEFINE_string("json", None, "write results to this JSON file")


def _tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


def _optimizer(variant: str, schedule):
  base = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0))
  if variant == "dense":
    return base
  return sj.salaad(base, every_k=_K.value, rho=1e-6, k_beta=0.002,
                   svt="exact" if variant == "exact" else "fast",
                   svt_iters=_SVT_ITERS.value, max_rank=_MAX_RANK.value,
                   state_dtype=_STATE_DTYPE.value, dual_dtype=_STATE_DTYPE.value)


def _compiled_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # backends without memory analysis
    return None


class _Variant:
  """One compiled variant with its running params/state and timings."""

  def __init__(self, variant: str, cfg, params, batch):
    model = models.Llama(cfg)
    self.name = variant
    tx = _optimizer(variant, 1e-3)
    t0 = time.perf_counter()
    opt_state = jax.jit(tx.init)(params)
    jax.block_until_ready(opt_state)
    self.init_s = time.perf_counter() - t0
    self.opt_state_bytes = _tree_bytes(opt_state)

    def step(p, s, b):
      def loss_fn(p):
        logits = model.apply({"params": p}, b["inputs"])
        return models.cross_entropy_loss(logits, b["targets"])[0]
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    t0 = time.perf_counter()
    self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.step_bytes = _compiled_bytes(self.compiled)
    self.p, self.s, self.batch = jax.tree.map(jnp.copy, params), opt_state, batch
    self.t = 0
    self.times, self.round_times = [], []
    self.loss = None

  def run(self, n: int, record: bool) -> None:
    for _ in range(n):
      t = time.perf_counter()
      self.p, self.s, self.loss = self.compiled(self.p, self.s, self.batch)
      jax.block_until_ready((self.p, self.s, self.loss))
      dt = time.perf_counter() - t
      self.t += 1
      if record:
        is_round = self.name != "dense" and self.t % _K.value == 0
        (self.round_times if is_round else self.times).append(dt)

  def result(self) -> dict:
    k = _K.value if self.name != "dense" else 1
    ordinary = statistics.median(self.times)
    rnd = statistics.median(self.round_times) if self.round_times else ordinary
    return dict(variant=self.name, compile_s=self.compile_s, init_s=self.init_s,
                step_ms=1e3 * ordinary, round_step_ms=1e3 * rnd,
                amortised_ms=1e3 * ((k - 1) * ordinary + rnd) / k,
                opt_state_bytes=self.opt_state_bytes, step_bytes=self.step_bytes,
                final_loss=float(self.loss))


def run_variants(names, cfg, params, batch) -> list[dict]:
  """Compiles every variant, then times them interleaved: each cycle runs K
  steps of every variant in turn, so drifting machine load hits all alike."""
  variants = [_Variant(v, cfg, params, batch) for v in names]
  for v in variants:
    v.run(_K.value, record=False)  # warm-up cycle
  for _ in range(_CYCLES.value):
    for v in variants:
      v.run(_K.value, record=True)
  return [v.result() for v in variants]


def main(argv):
  del argv
  cfg = models.get_config(_MODEL.value, max_len=max(_SEQ.value, 8))
  params = models.init_params(cfg, jax.random.key(0), batch=1, seq=8)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, size=(_BATCH.value, _SEQ.value + 1), dtype=np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  n_params = models.count_params(params)
  param_bytes = _tree_bytes(params)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  model: {_MODEL.value} "
        f"({n_params / 1e6:.1f}M params)  batch {_BATCH.value} x {_SEQ.value}  K={_K.value}  "
        f"S/U dtype {_STATE_DTYPE.value}", flush=True)
  results = run_variants(_VARIANTS.value, cfg, params, batch)
  for r in results:
    v = r["variant"]
    print(f"  {v:6s} compile {r['compile_s']:6.1f}s  step {r['step_ms']:9.2f} ms  "
          f"round step {r['round_step_ms']:9.2f} ms  amortised {r['amortised_ms']:9.2f} ms",
          flush=True)
  base = next((r for r in results if r["variant"] == "dense"), None)
  header = ("| variant | compile s | step ms | round step ms | amortised ms | x dense "
            "| opt state / param bytes | extra state vs AdamW / param bytes | step bytes x dense |")
  print("\n" + header + "\n|" + "---|" * 9)
  for r in results:
    ratio = r["amortised_ms"] / base["amortised_ms"] if base else float("nan")
    extra = ((r["opt_state_bytes"] - base["opt_state_bytes"]) / param_bytes if base
             else float("nan"))
    mem = (r["step_bytes"] / base["step_bytes"] if base and r["step_bytes"] and base["step_bytes"]
           else float("nan"))
    r.update(ratio_vs_dense=ratio, extra_state_over_params=extra, step_bytes_ratio=mem)
    print(f"| {r['variant']} | {r['compile_s']:.1f} | {r['step_ms']:.2f} | "
          f"{r['round_step_ms']:.2f} | {r['amortised_ms']:.2f} | {ratio:.3f} | "
          f"{r['opt_state_bytes'] / param_bytes:.2f} | {extra:.2f} | {mem:.2f} |")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dict(model=_MODEL.value, batch=_BATCH.value, seq=_SEQ.value, every_k=_K.value,
                     device=jax.devices()[0].device_kind, params=n_params,
                     param_bytes=param_bytes, results=results), f, indent=1)


if __name__ == "__main__":
  app.run(main)
