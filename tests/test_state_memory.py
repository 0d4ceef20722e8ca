"""``benchmarks.state_memory``: the SALAAD state bytes against a closed form."""

import math

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from benchmarks import state_memory
from salaad_jax import models


@pytest.fixture(autouse=True)
def _parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["state_memory"])
  yield


def test_state_bytes_match_the_block_shapes():
  cfg = models.get_config("tiny", vocab_size=32100)
  params = jax.eval_shape(lambda: models.Llama(cfg).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  blocks = [x.shape for path, x in leaves if x.ndim == 2
            and not any(getattr(k, "key", "") in ("embed", "lm_head") for k in path)]
  param_bytes = 4 * sum(x.size for _, x in leaves)
  block_bytes = 4 * sum(m * n for m, n in blocks)
  f32 = state_memory.state_row("tiny", "exact", "float32", capacity="none")
  bf16 = state_memory.state_row("tiny", "exact", "bfloat16", "bfloat16", capacity="none")
  s_bf16 = state_memory.state_row("tiny", "exact", "bfloat16", "float32", capacity="none")
  assert f32["param_bytes"] == param_bytes
  assert f32["adamw_over_params"] == pytest.approx(2.0, abs=1e-6)  # m, v (+ a count)
  # S and Y: one copy of every block each, halved in bfloat16.
  assert f32["sparse_over_params"] == pytest.approx(block_bytes / param_bytes)
  assert f32["dual_over_params"] == pytest.approx(block_bytes / param_bytes)
  assert bf16["sparse_over_params"] == pytest.approx(block_bytes / param_bytes / 2)
  assert bf16["dual_over_params"] == pytest.approx(block_bytes / param_bytes / 2)
  # S in bfloat16, the dual in float32.
  assert s_bf16["sparse_over_params"] == bf16["sparse_over_params"]
  assert s_bf16["dual_over_params"] == f32["dual_over_params"]
  assert state_memory.DEFAULT_DTYPES == "float32:float32"
  assert state_memory.DEFAULT_CAPACITY == "auto"
  # Compact S (the default): float32 values + int32 indices of ceil(3 d* m n) entries.
  comp = state_memory.state_row("tiny", "exact", "float32")
  assert comp["sparse_over_params"] == pytest.approx(
      8 * sum(math.ceil(0.15 * m * n) for m, n in blocks) / param_bytes)
  assert comp["dual_over_params"] == f32["dual_over_params"]
  frac = state_memory.state_row("tiny", "exact", "bfloat16", capacity="0.2")
  assert frac["sparse_over_params"] == pytest.approx(
      6 * sum(math.ceil(0.2 * m * n) for m, n in blocks) / param_bytes)
  # Exact SVT: full-rank float32 factors U (m, k), s (k,), V (n, k), k = min(m, n).
  factors = 4 * sum((m + n + 1) * min(m, n) for m, n in blocks)
  assert f32["factors_over_params"] == pytest.approx(factors / param_bytes)
  assert bf16["factors_over_params"] == s_bf16["factors_over_params"] == f32["factors_over_params"]
  fast = state_memory.state_row("tiny", "fast", "float32")
  assert fast["factors_over_params"] < f32["factors_over_params"]
  for r in (f32, bf16, s_bf16, fast, comp, frac):
    assert 0 <= r["other_over_params"] < 0.01
    assert r["extra_over_params"] == pytest.approx(
        r["sparse_over_params"] + r["dual_over_params"] + r["factors_over_params"]
        + r["other_over_params"])
