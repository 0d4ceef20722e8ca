"""Inference speed and memory of a deployed (structured) model against dense.

    python -m benchmarks.inference --models=small,60m
    python -m benchmarks.inference --models=60m --variants=0.5:ell,0.5:dense --repeats=10

For each model size, in one process:

  * the dense model (bf16 values and compute) with random weights shaped
    like trained SALAAD blocks (``structured_like``: a decaying spectrum
    plus 5 % of entries five times larger, every block at one scale).  Plain
    init weights do not do: their spectrum is flat, so the allocator buys no
    sparse entry, and their residual projections are smaller, so it keeps
    nothing of o_proj / down_proj and XLA removes the dead layers;
  * deployments of it: every attention / MLP block split post hoc into
    L + S (truncated SVD at rank ``--posthoc_rank`` of min(m, n), the
    largest ``--posthoc_density`` of the residual; ``deploy.posthoc_factors``),
    allocated globally at a byte budget and stored as ``--fmt`` in bf16
    (``deploy.compress``), then put in its runtime form by
    ``models.runtime.prepare`` with a product ('coo', 'ell', 'dense',
    'auto', 'adaptive'); a variant 'lowrank' spends the same budget on
    triplets only (the split without S; product 'adaptive'), what a
    time-pricing allocator gives on a device where the sparse product costs
    more than it saves.

A budget is a fraction of the dense model's bytes (b_w P_model), or, for a
model where the parameters outside the blocks alone take more than the
smallest budget (the embedding and head of 60m are 56 % of it), every
budget is a fraction of the blocks' bytes (rest kept whole); the table
gives both fractions.

Measured per variant: prefill latency (one forward of ``--prefill`` =
batch x seq tokens, all logits), decode throughput (greedy, one
token per step with the KV cache, ``--new_tokens`` steps after a
``--prompt``-token prompt, at each ``--decode_batches``), the bytes of the
weights as held on the device (runtime form) and as stored (artifact), and
XLA's temporary buffers of the compiled prefill (activations, and the X_hat
of a block materialised for the call while it lives).
Every variant is compiled and run once first; then ``--repeats`` rounds,
each timing one call of every variant in turn for each measurement
(interleaved, so machine load drifting during the run hits all of them
alike); medians, and as ratio to dense the median over rounds of the
round's time over dense's time in that round (``salaad_jax.models.timing``,
which the capacity spectrum's forward time shares).  ``--json`` writes everything.  Runs unchanged on a GPU.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from salaad_jax import deploy, models
from salaad_jax.deploy import accounting
from salaad_jax.models import runtime, timing
from salaad_jax.models.structured import structured_dense

_MODELS = flags.DEFINE_list("models", ["small", "60m"], "model presets")
_VARIANTS = flags.DEFINE_list(
    "variants", ["0.4:adaptive", "0.5:ell", "0.5:auto", "0.5:adaptive", "0.5:lowrank",
                 "0.6:adaptive"],
    "deployments as budget:product (product coo, ell, dense, auto, adaptive, lowrank)")
_FMT = flags.DEFINE_enum("fmt", "bitmap", ["coo", "csr", "bitmap"], "stored sparse format")
_RANK = flags.DEFINE_float("posthoc_rank", 0.4, "post-hoc split: rank, a fraction of min(m, n)")
_DENSITY = flags.DEFINE_float("posthoc_density", 0.05, "post-hoc split: density of S")
_PREFILL = flags.DEFINE_string("prefill", "8x256", "prefill batch x sequence length")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "8"], "decode batch sizes")
_NEW = flags.DEFINE_integer("new_tokens", 128, "decoded tokens per timed run")
_PROMPT = flags.DEFINE_integer("prompt", 128, "prompt tokens in the cache before decoding")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed rounds (after one warm-up round)")
_AUTO_ROWS = flags.DEFINE_integer("auto_rows", 2048, "rows of x at which 'auto' times blocks")
_SEED = flags.DEFINE_integer("seed", 0, "weights and tokens")
_JSON = flags.DEFINE_string("json", None, "write the results to this JSON file")

PRODUCTS = (*runtime.PRODUCTS, "lowrank")


def parse_variant(text: str) -> tuple[float, str]:
  """'0.5:ell' -> (0.5, 'ell'); raises ValueError naming the flag."""
  try:
    budget, product = text.split(":")
    budget = float(budget)
  except ValueError:
    raise ValueError(f"--variants entry {text!r} is not budget:product (e.g. 0.5:ell)") from None
  if not 0 < budget <= 1 or product not in PRODUCTS:
    raise ValueError(f"--variants entry {text!r}: budget in (0, 1], product one of {PRODUCTS}")
  return budget, product


def _block_params(alloc) -> int:
  return sum(b.m * b.n for b in alloc.blocks)


def budget_bytes(fraction: float, dense_bytes: int, block_bytes: int, of: str) -> int:
  """The byte budget of ``fraction`` of the dense bytes (of='model') or of
  the blocks' bytes, the rest kept whole (of='blocks')."""
  rest = dense_bytes - block_bytes
  return int(fraction * dense_bytes) if of == "model" else int(rest + fraction * block_bytes)


def budget_basis(fractions, dense_bytes: int, block_bytes: int) -> str:
  """'model' when every budget exceeds what the parameters outside the
  blocks take, else 'blocks' (one basis for all budgets of a model)."""
  return "model" if min(fractions) * dense_bytes > dense_bytes - block_bytes else "blocks"


class Variant:
  """One model to time: its jitted prefill and decode functions."""

  def __init__(self, name, cfg, layouts, params, prefill_tokens, prompts, stored_bytes):
    model = (models.Llama(cfg) if layouts is None
             else models.Llama(cfg, dense_cls=structured_dense(layouts)))
    self.name, self.params = name, params
    self.runtime_bytes, self.stored_bytes = runtime.tree_bytes(params), stored_bytes
    self.prefill_tokens = prefill_tokens
    self.prefill = jax.jit(lambda p, t: model.apply({"params": p}, t))
    # XLA's temporary buffers of the compiled prefill: activations, and for
    # a block materialised per call its X_hat while it lives.
    stats = self.prefill.lower(params, prefill_tokens).compile().memory_analysis()
    self.prefill_temp_bytes = None if stats is None else int(stats.temp_size_in_bytes)
    new = _NEW.value

    def decode(p, cache, token):
      def step(_, carry):
        tok, cache = carry
        logits, state = model.apply({"params": p, "cache": cache}, tok, decode=True,
                                    mutable=["cache"])
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None], state["cache"]
      return jax.lax.fori_loop(0, new, step, (token, cache))[0]

    self.decode = jax.jit(decode)
    self.decode_inputs = {}
    for b, prompt in prompts.items():
      logits, state = jax.jit(lambda p, c, t: model.apply(
          {"params": p, "cache": c}, t, decode=True, mutable=["cache"]))(
              params, models.init_cache(model, b), prompt)
      first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
      self.decode_inputs[b] = (state["cache"], first)
    self.times = {"prefill": []} | {f"decode_b{b}": [] for b in prompts}

  def kinds(self) -> list[str]:
    return list(self.times)

  def call(self, kind: str):
    """The call of ``kind`` ('prefill' or 'decode_b<batch>'), without arguments."""
    if kind == "prefill":
      return lambda: self.prefill(self.params, self.prefill_tokens)
    inputs = self.decode_inputs[int(kind.split("_b")[1])]
    return lambda: self.decode(self.params, *inputs)


def structured_like(params, seed: int, std: float = 0.02, spike: float = 5.0,
                    density: float = 0.05):
  """``params`` with every 2-D kernel of the decoder layers replaced by a
  matrix shaped like a SALAAD block: X = U diag(sigma) V^T + S0, sigma_j
  proportional to exp(-3 j / min(m, n)) (random orthogonal U, V), and S0
  holding a ``density`` share of entries ``spike`` times larger; scaled to
  entry std ``std``."""
  rng = np.random.default_rng(seed)

  def block(x):
    m, n = x.shape
    k = min(m, n)
    u = np.linalg.qr(rng.normal(size=(m, k)))[0]
    v = np.linalg.qr(rng.normal(size=(n, k)))[0]
    low = (u * np.exp(-3.0 * np.arange(k) / k)) @ v.T
    low *= 1.0 / low.std()
    s0 = np.where(rng.random((m, n)) < density, spike * rng.normal(size=(m, n)), 0.0)
    return jnp.asarray(std * (low + s0) / (low + s0).std(), x.dtype)

  def swap(path, x):
    keys = [getattr(k, "key", "") for k in path]
    if keys[0].startswith("layers_") and keys[-1] == "kernel":
      return block(x)
    return x
  return jax.tree_util.tree_map_with_path(swap, params)


def _deployments(cfg, dense_params, variants):
  """{(budget, product): (layouts, runtime params, stored bytes, info)}."""
  f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dense_params)
  t0 = time.perf_counter()
  dec = deploy.posthoc_factors(f32, rank=_RANK.value, density=_DENSITY.value)
  blocks = deploy.spectra(f32, dec)
  needs_lowrank = any(p == "lowrank" for _, p in variants)
  lowrank_blocks = (deploy.spectra(f32, deploy.posthoc_factors(f32, rank=_RANK.value, density=0.0))
                    if needs_lowrank else None)
  print(f"  post-hoc split and spectra: {time.perf_counter() - t0:.0f}s", flush=True)
  out = {}
  probe = deploy.allocate(blocks, 1.0, unit="bytes", fmt=_FMT.value)
  dense_bytes = accounting.account(None, probe, "dense")["dense_bytes"]
  of = budget_basis([b for b, _ in variants], dense_bytes, 2 * _block_params(probe))
  for budget, product in variants:
    src = lowrank_blocks if product == "lowrank" else blocks
    value = budget_bytes(budget, dense_bytes, 2 * _block_params(probe), of)
    alloc = deploy.allocate(src, value, unit="bytes", fmt=_FMT.value)
    art = deploy.compress(f32, src, alloc, _FMT.value, "bfloat16")
    counts = accounting.account(None, alloc, _FMT.value, "bfloat16")
    t0 = time.perf_counter()
    params, layouts = runtime.prepare(art.params, art.layouts,
                                      "adaptive" if product == "lowrank" else product,
                                      auto_rows=_AUTO_ROWS.value)
    block_bytes = 2 * _block_params(alloc)
    info = dict(budget=budget, budget_of=of, product=product,
                bytes_fraction=counts["bytes"] / dense_bytes,
                block_bytes_fraction=(counts["bytes"] - (dense_bytes - block_bytes)) / block_bytes,
                lowrank_share=sum((b.m + b.n) * b.rank for b in alloc.blocks) / _block_params(alloc),
                density=sum(b.nnz for b in alloc.blocks) / _block_params(alloc),
                dense_blocks=len(art.layouts) - len(layouts),
                empty_blocks=sum(b.rank == b.nnz == 0 for b in alloc.blocks),
                prepare_s=time.perf_counter() - t0)
    out[(budget, product)] = (layouts, params, counts["bytes"], info)
  return out


def run_model(name: str, variants) -> dict:
  batch, seq = (int(v) for v in _PREFILL.value.lower().split("x"))
  max_len = max(seq, _PROMPT.value + _NEW.value + 1)
  cfg = models.get_config(name, dtype="bfloat16", param_dtype="bfloat16", max_len=max_len)
  dense = structured_like(models.init_params(cfg, jax.random.key(_SEED.value)), _SEED.value)
  rng = np.random.default_rng(_SEED.value)
  prefill_tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
  prompts = {int(b): jnp.asarray(rng.integers(0, cfg.vocab_size, (int(b), _PROMPT.value)),
                                 jnp.int32) for b in _DECODE_BATCHES.value}
  print(f"{name}: {models.count_params(dense) / 1e6:.2f}M params, building deployments",
        flush=True)
  deployed = _deployments(cfg, dense, variants)
  t0 = time.perf_counter()
  runs = [Variant("dense", cfg, None, dense, prefill_tokens, prompts, runtime.tree_bytes(dense))]
  infos = [dict(budget=1.0, budget_of="model", product="dense", bytes_fraction=1.0,
                block_bytes_fraction=1.0, lowrank_share=None, density=None, dense_blocks=None,
                empty_blocks=None)]
  for key, (layouts, params, stored, info) in deployed.items():
    runs.append(Variant(f"{key[0]:g}:{key[1]}", cfg, layouts, params, prefill_tokens, prompts,
                        stored))
    infos.append(info)
  # Each round times every measurement of every variant in turn, one call
  # each: neighbours in time (the first call of each compiles and warms up).
  calls = [(v, kind) for kind in runs[0].kinds() for v in runs]
  times = timing.time_rounds([v.call(kind) for v, kind in calls], _REPEATS.value)
  for (v, kind), t in zip(calls, times):
    v.times[kind] = t
  print(f"  compiled and timed {len(runs)} variants in {time.perf_counter() - t0:.0f}s",
        flush=True)
  base = runs[0]
  rows = []
  for v, info in zip(runs, infos):
    row = dict(model=name, variant=v.name, **info, runtime_bytes=v.runtime_bytes,
               stored_bytes=v.stored_bytes, runtime_over_dense=v.runtime_bytes / base.runtime_bytes,
               prefill_temp_bytes=v.prefill_temp_bytes,
               stored_over_dense=v.stored_bytes / base.stored_bytes)
    for key, times in v.times.items():
      ms = timing.median_ms(times)
      # ratio per round against dense's time in the same round, then the median
      ratio = timing.median_ratio(times, base.times[key])
      if key == "prefill":
        row.update(prefill_ms=ms, prefill_x_dense=ratio)
      else:
        b = int(key.split("_b")[1])
        row.update({f"{key}_tok_s": b * _NEW.value / (1e-3 * ms), f"{key}_x_dense": 1.0 / ratio})
    rows.append(row)
  return dict(model=name, params=models.count_params(dense), rows=rows)


def print_table(results) -> None:
  batches = [int(b) for b in _DECODE_BATCHES.value]
  head = ("| model | variant | bytes stored / dense | of blocks | runtime weights / dense "
          "| prefill temp MB | prefill ms | x dense | "
          + " | ".join(f"decode b{b} tok/s | x dense" for b in batches) + " |")
  print("\n" + head + "\n|" + "---|" * (8 + 2 * len(batches)))
  for res in results:
    for r in res["rows"]:
      dec = " | ".join(f"{r[f'decode_b{b}_tok_s']:.0f} | {r[f'decode_b{b}_x_dense']:.2f}"
                       for b in batches)
      temp = r["prefill_temp_bytes"]
      print(f"| {r['model']} | {r['variant']} | {r['bytes_fraction']:.3f} | "
            f"{r['block_bytes_fraction']:.3f} | {r['runtime_over_dense']:.3f} | "
            f"{'n/a' if temp is None else f'{temp / 2 ** 20:.1f}'} | "
            f"{r['prefill_ms']:.1f} | {r['prefill_x_dense']:.2f} | {dec} |")


def main(argv):
  del argv
  variants = [parse_variant(v) for v in _VARIANTS.value]
  load0 = os.getloadavg()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} "
        f"({jax.default_backend()}), load average {load0[0]:.2f}", flush=True)
  results = [run_model(name, variants) for name in _MODELS.value]
  load1 = os.getloadavg()
  print_table(results)
  print(f"\nload average at start {load0[0]:.2f}, at end {load1[0]:.2f}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                     load_average=[load0[0], load1[0]], flags=dict(
                         fmt=_FMT.value, posthoc_rank=_RANK.value,
                         posthoc_density=_DENSITY.value, prefill=_PREFILL.value,
                         new_tokens=_NEW.value, prompt=_PROMPT.value, repeats=_REPEATS.value),
                     results=results), f, indent=1)


if __name__ == "__main__":
  app.run(main)
