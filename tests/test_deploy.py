"""Deployment: allocation (HPA, global), accounting, export / load, errors."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

import salaad_jax as sj
from helpers import tiny_config
from salaad_jax import deploy
from salaad_jax.deploy import accounting
from salaad_jax.models import Llama, LlamaConfig, generate, init_params
from salaad_jax.models.structured import structured_dense
from salaad_jax.train import load_run, train_and_evaluate

Factors = sj.Factors


# ---------------------------------------------------------------------------
# Hand-worked example.
# ---------------------------------------------------------------------------


def _diag_factors(m, n, sigma):
  r = len(sigma)
  return Factors(np.eye(m)[:, :r], np.asarray(sigma, float), np.eye(n)[:, :r])


def _sparse(m, n, entries):
  s = np.zeros((m, n))
  for (i, j), val in entries.items():
    s[i, j] = val
  return s


def _hand_blocks():
  """Block a (8x8): sigma~ = [6, 3, 1, 0.001], S entries 5, -4, 3, 2, 1e-9.
  Block b (4x8): sigma~ = [4, 0.002], S entries 1, 0.5.  Ten more scalars.

  Base ranks (unsquared 99.9 % mass): a: 6 + 3 + 1 = 10 >= 0.999 * 10.001
  -> 3; b: 4 >= 0.999 * 4.002 -> 1.  Base nnz (> 1e-8 max): a 4, b 2.
  P_model = 64 + 32 + 10 = 106, P_L = 3 * 16 + 1 * 12 = 60, P_S = 6,
  P_total = 10 + 60 + 6 = 76.
  """
  params = {"a": {"kernel": np.zeros((8, 8))}, "b": {"kernel": np.zeros((4, 8))},
            "norm": {"scale": np.zeros(10)}}
  dec = deploy.Decomposition(
      {"a/kernel": _diag_factors(8, 8, [6, 3, 1, 0.001]),
       "b/kernel": _diag_factors(4, 8, [4, 0.002])},
      {"a/kernel": _sparse(8, 8, {(0, 7): 5, (1, 6): -4, (2, 5): 3, (3, 4): 2, (7, 0): 1e-9}),
       "b/kernel": _sparse(4, 8, {(0, 7): 1.0, (3, 2): 0.5})})
  return params, deploy.spectra(params, dec)


# (budget, gamma) -> (ranks a, b), (nnz a, b), P
HPA_CASES = [
    # 0.9 * 106 -> 95 >= P_total: no cut, the base allocation.
    (0.9, 0.5, (3, 1), (4, 2), 76),
    # D = 76 - 46 = 30: D_L = D_S = 15; D_S > P_S = 6 overflows 9 to D_L = 24.
    # ranks * (1 - 24/60): 3 * 0.6 -> 1, 1 * 0.6 -> 0; nnz * 0 -> 0.
    (46, 0.5, (1, 0), (0, 0), 26),
    # D = 10: D_L = D_S = 5. ranks * 55/60: 2.75 -> 2, 0.92 -> 0; nnz * 1/6 -> 0, 0.
    (66, 0.5, (2, 0), (0, 0), 42),
    # gamma = 1 (the reference's evaluation): D = 6 = D_L: ranks * 0.9 -> 2, 0.
    (70, 1.0, (2, 0), (4, 2), 48),
    # gamma = 0: D = 3 = D_S: nnz * 0.5 -> 2, 1; ranks unchanged.  P = 73 exactly.
    (73, 0.0, (3, 1), (2, 1), 73),
]


@pytest.mark.parametrize("budget,gamma,ranks,nnz,p", HPA_CASES)
def test_hpa_hand_worked(budget, gamma, ranks, nnz, p):
  _, blocks = _hand_blocks()
  assert blocks.total_params == 106 and blocks.rest_params == 10
  alloc = deploy.allocate(blocks, budget, "hpa", gamma=gamma)
  assert (alloc.ranks["a/kernel"], alloc.ranks["b/kernel"]) == ranks
  assert (alloc.nnz["a/kernel"], alloc.nnz["b/kernel"]) == nnz
  assert alloc.params == p


def test_hand_worked_error_and_global_beats_hpa():
  _, blocks = _hand_blocks()
  h = deploy.allocate(blocks, 73, "hpa", gamma=0.0)
  # Dropped: a's 4th triplet and entries 3, 2, 1e-9; b's 2nd triplet and 0.5.
  want = 0.001**2 + 3**2 + 2**2 + 1e-18 + 0.002**2 + 0.5**2
  assert h.error == pytest.approx(want, rel=1e-9)
  g = deploy.allocate(blocks, 73, "global")
  assert g.params <= 73 and g.solver == "greedy"
  # Gain per parameter: a's entries 25, 16, 9, 4; a's triplets 36/16, 9/16,
  # 1/16; b's triplet 16/12, entries 1, 0.25.  Greedy takes them in that
  # order until a's third triplet (16) no longer fits the 63 left after
  # P_rest; b's second triplet (12) and a's 1e-9 entry fill the slack.
  assert (g.ranks["a/kernel"], g.ranks["b/kernel"]) == (2, 2)
  assert (g.nnz["a/kernel"], g.nnz["b/kernel"]) == (5, 2) and g.params == 73
  assert g.error == pytest.approx(1.0 + 0.001**2, rel=1e-9)


def test_accounting_formulas_by_hand():
  _, blocks = _hand_blocks()
  alloc = deploy.allocate(blocks, 73, "hpa", gamma=0.0)  # a: r 3, nnz 2; b: r 1, nnz 1
  got = {(f, d): deploy.account(None, alloc, f, d)
         for f in accounting.FORMATS for d in ("bfloat16", "float32")}
  assert got["coo", "bfloat16"]["params"] == 73
  # bf16: rest 10 * 2; low rank (48 + 12) * 2; COO (2 + 8) per entry.
  assert got["coo", "bfloat16"]["bytes"] == 20 + 120 + 3 * 10
  # CSR: (2 + 4) per entry plus (m + 1) * 4 row pointers per block with nnz > 0.
  assert got["csr", "bfloat16"]["bytes"] == 20 + 120 + 3 * 6 + 9 * 4 + 5 * 4
  # bitmap: 2 per entry plus ceil(m n / 8) bytes per block.
  assert got["bitmap", "float32"]["bytes"] == 40 + 240 + 3 * 4 + 8 + 4
  assert got["dense", "float32"]["bytes"] == 106 * 4
  assert got["dense", "bfloat16"]["params"] == 106
  assert got["coo", "float32"]["bytes"] == 40 + 240 + 3 * 12


# ---------------------------------------------------------------------------
# Property: global allocation meets the budget and never loses to HPA.
# ---------------------------------------------------------------------------


def _random_problem(seed, n_blocks, max_dim=10):
  rng = np.random.default_rng(seed)
  params, factors, sparse = {"rest": {"scale": np.zeros(int(rng.integers(1, 20)))}}, {}, {}
  for i in range(n_blocks):
    m, n = (int(x) for x in rng.integers(2, max_dim + 1, 2))
    r = min(m, n)
    sigma = rng.uniform(0.5, 3) * rng.uniform(0.2, 0.95) ** np.arange(r)
    u = np.linalg.qr(rng.normal(size=(m, r)))[0]
    v = np.linalg.qr(rng.normal(size=(n, r)))[0]
    # Unsorted, with a zero: the canonical SVD must sort and drop it.
    sigma[-1] = 0.0
    perm = rng.permutation(r)
    s = np.where(rng.random((m, n)) < rng.uniform(0.05, 0.5), rng.normal(size=(m, n)), 0.0)
    path = f"blk{i}/kernel"
    params[f"blk{i}"] = {"kernel": np.zeros((m, n))}
    factors[path] = Factors(u[:, perm] * 1.0, sigma[perm], v[:, perm])
    sparse[path] = s
  dec = deploy.Decomposition(factors, sparse)
  return params, dec, deploy.spectra(params, dec)


def _separable_error(dec, alloc):
  """sum ||L - best rank-r L||^2 + ||S - top-nnz S||^2 from dense matrices."""
  err = 0.0
  for b in alloc.blocks:
    f = dec.factors[b.path]
    sv = np.linalg.svd((f.u * f.s) @ f.v.T, compute_uv=False)
    err += float(np.sum(sv[b.rank:] ** 2))
    mags = np.sort(np.abs(np.asarray(dec.sparse[b.path])).reshape(-1))[::-1]
    err += float(np.sum(mags[b.nnz:] ** 2))
  return err


@settings(max_examples=60, deadline=None)
@given(seed=hst.integers(0, 2**31 - 1), n_blocks=hst.integers(1, 4),
       frac=hst.floats(0.0, 1.0), gamma=hst.floats(0.0, 1.0))
def test_global_meets_budget_and_beats_hpa(seed, n_blocks, frac, gamma):
  params, dec, blocks = _random_problem(seed, n_blocks)
  budget = blocks.rest_params + int(round(frac * (blocks.total_params - blocks.rest_params)))
  g = deploy.allocate(blocks, budget, "global", gamma=gamma)
  h = deploy.allocate(blocks, budget, "hpa", gamma=gamma)
  assert g.params <= budget and h.params <= budget
  assert deploy.account(params, g)["params"] == g.params
  assert g.error <= h.error + 1e-9 * max(1.0, h.error)
  # The reported error is the measured Frobenius error of the truncation.
  for a in (g, h):
    assert a.error == pytest.approx(_separable_error(dec, a), rel=1e-6, abs=1e-9)


def _brute_force_error(blocks, avail):
  """Exact optimum over all (rank, nnz) of two blocks, parameters unit."""
  tables = []
  for b in blocks.blocks:
    tail_l = np.concatenate([np.cumsum(b.triplet_gain[::-1])[::-1], [0.0]])
    tail_s = np.concatenate([np.cumsum(b.sparse_gain[::-1])[::-1], [0.0]])
    r, k = np.meshgrid(np.arange(tail_l.size), np.arange(tail_s.size), indexing="ij")
    tables.append(((b.m + b.n) * r + k, tail_l[r] + tail_s[k]))
  (c1, e1), (c2, e2) = ((c.reshape(-1), e.reshape(-1)) for c, e in tables)
  cost = c1[:, None] + c2[None, :]
  return float(np.min(np.where(cost <= avail, e1[:, None] + e2[None, :], np.inf)))


@settings(max_examples=40, deadline=None)
@given(seed=hst.integers(0, 2**31 - 1), frac=hst.floats(0.0, 1.0))
def test_greedy_is_optimal_up_to_one_item(seed, frac):
  _, _, blocks = _random_problem(seed, 2, max_dim=4)
  budget = blocks.rest_params + int(round(frac * (blocks.total_params - blocks.rest_params)))
  opt = _brute_force_error(blocks, budget - blocks.rest_params)
  g = deploy.greedy(blocks, budget)
  biggest = max(float(np.max(b.triplet_gain, initial=0.0)) for b in blocks.blocks)
  assert opt - 1e-9 <= g.error <= opt + biggest + 1e-9


@pytest.mark.parametrize("fmt", ["coo", "csr", "bitmap"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_byte_budget_is_met(fmt, dtype):
  params, _, blocks = _random_problem(3, 4)
  dense_bytes = blocks.total_params * deploy.value_bytes(dtype)
  for frac in (0.45, 0.6, 0.8, 1.0):
    alloc = deploy.allocate(blocks, frac, unit="bytes", fmt=fmt, dtype=dtype)
    spent = deploy.account(params, alloc, fmt, dtype)["bytes"]
    assert spent <= math.floor(frac * dense_bytes)
    assert alloc.unit == "bytes" and alloc.fmt == fmt
  # More bytes never hurt.
  errs = [deploy.allocate(blocks, f, unit="bytes", fmt=fmt, dtype=dtype).error
          for f in (0.5, 0.7, 0.9)]
  assert errs[0] >= errs[1] >= errs[2]


# ---------------------------------------------------------------------------
# A small SALAAD-trained model.
# ---------------------------------------------------------------------------

CFG = LlamaConfig(vocab_size=64, d_model=32, d_ff=48, n_heads=2, n_layers=1, max_len=16,
                  dtype="float32")
_DENSE_APPLY = jax.jit(Llama(CFG).apply)


@pytest.fixture(scope="module")
def params0():
  return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def trained(params0):
  params = params0
  model = Llama(CFG)
  tx = sj.salaad(optax.adamw(1e-2), every_k=1, rho=1.0, mode="fixed", alpha_init=0.1,
                 beta_init=0.02, svt="exact")
  state = tx.init(params)

  @jax.jit
  def step(p, s, t):
    def loss(p):
      logits = model.apply({"params": p}, t[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  rng = np.random.default_rng(0)
  for _ in range(4):
    params, state = step(params, state, jnp.asarray(rng.integers(0, 64, (4, 16)), jnp.int32))
  return params, state


def _tokens(seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 12)), jnp.int32)


@pytest.mark.parametrize("fmt", accounting.FORMATS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_exported_artifact_matches_accounting(trained, tmp_path, fmt, dtype):
  params, state = trained
  blocks = deploy.spectra(params, state)
  alloc = deploy.allocate(blocks, 0.6)
  manifest = deploy.export(tmp_path / "art", deploy.compress(params, blocks, alloc, fmt, dtype),
                           CFG)
  model, loaded, read = deploy.load(tmp_path / "art")
  assert read == json.loads(json.dumps(manifest))
  leaves = jax.tree.leaves(loaded)
  n_values = sum(x.size for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
  n_bytes = sum(x.nbytes for x in leaves)
  want = deploy.account(params, alloc, fmt, dtype)
  assert (n_values, n_bytes) == (want["params"], want["bytes"])
  assert (read["params"], read["bytes"]) == (want["params"], want["bytes"])
  assert all(jnp.dtype(x.dtype).name == dtype for x in leaves
             if jnp.issubdtype(x.dtype, jnp.floating))
  assert {p: (b["rank"], b["nnz"]) for p, b in read["blocks"].items()} == {
      b.path: (b.rank, b.nnz) for b in alloc.blocks}
  assert read["budget"]["value"] == alloc.budget and read["fmt"] == fmt
  assert deploy.Allocation.from_dict(read["allocation"]) == alloc
  if fmt != "dense":
    assert want["params"] < want["dense_params"]
  if dtype == "bfloat16" and fmt == "bitmap":
    # The loaded model evaluates and generates.
    logits = jax.jit(model.apply)({"params": loaded}, _tokens())
    assert logits.shape == (2, 12, 64) and bool(jnp.all(jnp.isfinite(logits)))
    out = generate(model, loaded, _tokens()[:, :4], 2, jax.random.key(0), temperature=0.0)
    assert out.shape == (2, 6)


def test_loaded_artifact_equals_dense_reconstruction(trained, tmp_path):
  params, state = trained
  for method in ("hpa", "global"):
    manifest = deploy.export_budget(tmp_path / method, params, state, 0.55, CFG,
                                    method=method, fmt="csr", dtype="float32")
    model, loaded, _ = deploy.load(tmp_path / method)
    alloc = deploy.Allocation.from_dict(manifest["allocation"])
    ref = _DENSE_APPLY({"params": deploy.dense_reconstruction(params, state, alloc)}, _tokens())
    np.testing.assert_allclose(jax.jit(model.apply)({"params": loaded}, _tokens()), ref,
                               atol=2e-5, rtol=1e-5)
  # Loaded in the runtime form: indices decoded at load, the same logits.
  model, loaded, _ = deploy.load(tmp_path / "global", product="ell")
  assert "sp_row_ptr" not in str(jax.tree_util.tree_structure(loaded))
  np.testing.assert_allclose(jax.jit(model.apply)({"params": loaded}, _tokens()), ref,
                             atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="product"):
    deploy.load(tmp_path / "global", product="bcsr")


def test_export_records_the_forward_time_when_asked(trained, tmp_path):
  params, state = trained
  timing = deploy.ForwardTiming(batch=2, seq=8, repeats=2)
  manifest = deploy.export_budget(tmp_path / "timed", params, state, 0.6, CFG,
                                  time_forward=timing)
  fwd = manifest["forward"]
  # Wall-clock numbers are not asserted, only that they were measured.
  assert min(fwd["forward_ms"], fwd["dense_forward_ms"], fwd["forward_vs_dense"]) > 0
  assert (fwd["product"], fwd["batch"], fwd["seq"], fwd["repeats"]) == ("adaptive", 2, 8, 2)
  assert fwd["device"] and fwd["backend"] == jax.default_backend()
  assert deploy.read_manifest(tmp_path / "timed")["forward"] == fwd
  assert "forward" not in deploy.export_budget(tmp_path / "untimed", params, state, 0.6, CFG)
  blocks = deploy.spectra(params, state)
  art = deploy.compress(params, blocks, deploy.allocate(blocks, 0.6), "coo")
  with pytest.raises(ValueError, match="needs the model config"):
    deploy.export(tmp_path / "no_config", art, time_forward=timing)
  assert not (tmp_path / "no_config").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0), "batch must be a positive integer"),
    (dict(seq=2.5), "seq must be a positive integer"),
    (dict(repeats=0), "repeats and warmup must be >= 1"),
    (dict(warmup=0), "repeats and warmup must be >= 1"),
    (dict(product="bcsr"), "product must be one of"),
])
def test_forward_timing_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    deploy.ForwardTiming(**kwargs)


def test_forward_timing_tokens_take_the_evaluation_batch_shape():
  like = np.arange(12, dtype=np.int32).reshape(3, 4)
  assert deploy.ForwardTiming().tokens(64, 16, like=like).tolist() == like.tolist()
  tiled = deploy.ForwardTiming(batch=5, seq=2).tokens(64, 16, like=like)
  assert tiled.tolist() == [[0, 1], [4, 5], [8, 9], [0, 1], [4, 5]]
  drawn = deploy.ForwardTiming(batch=2).tokens(64, 16)
  assert drawn.shape == (2, 16) and drawn.dtype == jnp.int32
  with pytest.raises(ValueError, match="exceeds the model's max_len 16"):
    deploy.ForwardTiming(seq=17).tokens(64, 16)


def _with_empty_blocks(alloc, empty):
  """``alloc`` with the blocks whose path contains one of ``empty`` kept at
  rank 0 and nnz 0."""
  blocks = tuple(dataclasses.replace(b, rank=0, nnz=0) if any(e in b.path for e in empty)
                 else b for b in alloc.blocks)
  return dataclasses.replace(alloc, blocks=blocks)


def _empty_dicts(tree, path=""):
  if not isinstance(tree, dict):
    return []
  if not tree:
    return [path]
  return [p for k, v in tree.items() for p in _empty_dicts(v, f"{path}/{k}")]


# q_proj alone leaves a module without parameters; all of the MLP leaves its
# parent module empty too; "proj" keeps no block part at all.
@pytest.mark.parametrize("empty", [("q_proj",), ("q_proj", "mlp/"), ("proj",)])
@pytest.mark.parametrize("fmt", ["coo", "csr", "bitmap"])
def test_block_at_rank_0_and_nnz_0_round_trips(trained, tmp_path, empty, fmt):
  params, state = trained
  blocks = deploy.spectra(params, state)
  alloc = _with_empty_blocks(deploy.allocate(blocks, 0.6), empty)
  zero = [b.path for b in alloc.blocks if (b.rank, b.nnz) == (0, 0)]
  assert zero and all(any(e in p for e in empty) for p in zero)
  art = deploy.compress(params, blocks, alloc, fmt, "float32")
  assert _empty_dicts(art.params) == []
  in_memory = Llama(CFG.replace(param_dtype="float32"), dense_cls=structured_dense(art.layouts))
  want = jax.jit(in_memory.apply)({"params": art.params}, _tokens())
  # The empty blocks apply as all-zero weights.
  ref = _DENSE_APPLY({"params": deploy.dense_reconstruction(params, blocks, alloc)}, _tokens())
  np.testing.assert_allclose(want, ref, atol=2e-5, rtol=1e-5)

  manifest = deploy.export(tmp_path / "art", art, CFG)
  assert all((manifest["blocks"][p]["rank"], manifest["blocks"][p]["nnz"]) == (0, 0)
             for p in zero)
  model, loaded, _ = deploy.load(tmp_path / "art")
  assert jax.tree.structure(loaded) == jax.tree.structure(art.params)
  jax.tree.map(np.testing.assert_array_equal, loaded, art.params)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": loaded}, _tokens()), want,
                             rtol=0, atol=0)


def test_load_reads_params_saved_with_empty_dicts(trained, tmp_path):
  # An artifact whose params were saved with an empty dict for every block
  # kept at rank 0 and nnz 0 (what export wrote before it dropped them).
  params, state = trained
  blocks = deploy.spectra(params, state)
  alloc = _with_empty_blocks(deploy.allocate(blocks, 0.6), ("q_proj", "mlp/"))
  art = deploy.compress(params, blocks, alloc, "csr", "float32")
  deploy.export(tmp_path / "art", art, CFG)
  stored = jax.tree.map(lambda x: x, art.params)
  stored["layers_0"]["attn"]["q_proj"] = {}
  stored["layers_0"]["mlp"] = {"down_proj": {}, "gate_proj": {}, "up_proj": {}}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "art" / "params", stored, force=True)
  ckpt.wait_until_finished()
  model, loaded, _ = deploy.load(tmp_path / "art")
  assert _empty_dicts(loaded) == []
  jax.tree.map(np.testing.assert_array_equal, loaded, art.params)
  in_memory = Llama(CFG.replace(param_dtype="float32"), dense_cls=structured_dense(art.layouts))
  np.testing.assert_array_equal(jax.jit(model.apply)({"params": loaded}, _tokens()),
                                jax.jit(in_memory.apply)({"params": art.params}, _tokens()))


def test_global_error_at_most_hpa_on_trained_model(trained):
  params, state = trained
  blocks = deploy.spectra(params, state)
  for frac in (0.45, 0.6, 0.8):
    g, h = (deploy.allocate(blocks, frac, m) for m in ("global", "hpa"))
    assert g.error <= h.error and max(g.params, h.params) <= g.budget


def test_budget_spectrum_is_monotone(trained):
  params, state = trained
  blocks = deploy.spectra(params, state)
  errs = [deploy.allocate(blocks, f).error for f in (0.4, 0.5, 0.7, 0.9, 1.0)]
  assert all(a >= b for a, b in zip(errs, errs[1:]))
  assert errs[0] > errs[-1]


# ---------------------------------------------------------------------------
# Post-hoc baseline and calibration.
# ---------------------------------------------------------------------------


def test_posthoc_factors_split_and_allocate(params0):
  params = params0
  dec = deploy.posthoc_factors(params, rank=0.25, density=0.1)
  x = np.asarray(params["layers_0"]["mlp"]["up_proj"]["kernel"])
  f, s = dec.factors["layers_0/mlp/up_proj/kernel"], np.asarray(
      dec.sparse["layers_0/mlp/up_proj/kernel"])
  assert f.s.shape == (8,)  # ceil(0.25 * 32)
  assert np.count_nonzero(s) == math.ceil(0.1 * x.size)
  l = np.asarray(sj.prox.dense(f))
  # The kept residual entries are the largest ones and reduce the error.
  resid = x - l
  assert np.min(np.abs(resid[s != 0])) >= np.max(np.abs(resid[s == 0])) - 1e-7
  assert np.linalg.norm(x - l - s) < np.linalg.norm(x - l)
  full = deploy.posthoc_factors(params, rank=1.0, density=0.0)
  np.testing.assert_allclose(sj.prox.dense(full.factors["layers_0/attn/q_proj/kernel"]),
                             params["layers_0"]["attn"]["q_proj"]["kernel"], atol=1e-5)
  blocks = deploy.spectra(params, dec)
  alloc = deploy.allocate(blocks, 0.7)
  assert alloc.params <= alloc.budget
  hat = deploy.dense_reconstruction(params, dec, alloc)
  assert jax.tree.structure(hat) == jax.tree.structure(params)


def test_activation_weights_and_weighted_error(params0):
  params = params0
  toks = [_tokens(s) for s in range(3)]
  d = deploy.activation_weights(Llama(CFG), params, toks)
  # q, k and v read the same normalised input.
  np.testing.assert_allclose(d["layers_0/attn/q_proj/kernel"], d["layers_0/attn/v_proj/kernel"])
  assert d["layers_0/mlp/down_proj/kernel"].shape == (48,)
  counts = np.bincount(np.concatenate([np.asarray(t).reshape(-1) for t in toks]), minlength=64)
  seen = counts > 0
  np.testing.assert_allclose(d["embed/embedding"][seen], np.sqrt(counts[seen] / counts.sum()),
                             rtol=1e-6)
  assert np.all(d["embed/embedding"] > 0)

  dec = deploy.posthoc_factors(params, rank=0.5, density=0.1)
  blocks = deploy.spectra(params, dec, row_weights=d)
  alloc = deploy.allocate(blocks, 0.6)
  assert alloc.weighted
  # The weighted error is ||diag(d) (L + S - X_hat)||^2 summed over blocks
  # when L and S parts are measured apart.
  art = deploy.compress(params, blocks, alloc, "coo", "float32")
  err = 0.0
  for b in alloc.blocks:
    node = art.params  # a block kept at rank 0 with nnz 0 has no entry
    for key in b.path.split("/")[:-1]:
      node = node.get(key, {})
    f = dec.factors[b.path]
    l_full = np.asarray(sj.prox.dense(f), np.float64)
    l_kept = (np.asarray(node["lr_a"]) @ np.asarray(node["lr_b"]).T if b.rank
              else np.zeros_like(l_full))
    s_full = np.asarray(dec.sparse[b.path], np.float64)
    s_kept = np.zeros_like(s_full)
    if b.nnz:
      s_kept[np.asarray(node["sp_rows"]), np.asarray(node["sp_cols"])] = node["sp_values"]
    w = d[b.path][:, None]
    err += np.sum((w * (l_full - l_kept)) ** 2) + np.sum((w * (s_full - s_kept)) ** 2)
  assert alloc.error == pytest.approx(err, rel=1e-4)
  with pytest.raises(ValueError, match="weights"):
    deploy.dense_reconstruction(params, dec, alloc)


# ---------------------------------------------------------------------------
# Bad input: a clear ValueError and nothing written.
# ---------------------------------------------------------------------------


def _p_rest(params):
  return sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if "proj" not in sj.structure.path_str(p))


@pytest.mark.parametrize("budget,match", [
    ("below", "below the minimum representable"),
    (1.5, "must lie in \\(0, 1\\]"),
    ("above", "above the dense model"),
    (0.0, "must lie in \\(0, 1\\]"),
    (True, "budget must be"),
])
def test_bad_budget_writes_nothing(trained, tmp_path, budget, match):
  params, state = trained
  rest = _p_rest(params)
  total = sum(x.size for x in jax.tree.leaves(params))
  budget = {"below": rest - 1, "above": total + 1}.get(budget, budget)
  with pytest.raises(ValueError, match=match):
    deploy.export_budget(tmp_path / "out", params, state, budget, CFG)
  assert not os.path.exists(tmp_path / "out")


def test_budget_equal_to_rest_keeps_no_block_part(trained):
  params, state = trained
  rest = _p_rest(params)
  alloc = deploy.allocate(deploy.spectra(params, state), rest)
  assert alloc.params == rest and not any(alloc.ranks.values()) and not any(alloc.nnz.values())


def test_no_salaad_state_writes_nothing(params0, tmp_path):
  params = params0
  state = optax.adamw(1e-3).init(params)
  with pytest.raises(ValueError, match="no SALAAD state"):
    deploy.export_budget(tmp_path / "out", params, state, 0.5, CFG)
  with pytest.raises(ValueError, match="no SALAAD state"):
    deploy.spectra(params, state)
  assert not os.path.exists(tmp_path / "out")


def test_artifact_that_does_not_fit_the_model_writes_nothing(params0, tmp_path):
  params = params0
  dec = deploy.posthoc_factors(params, include_embedding=True)
  with pytest.raises(ValueError, match="do not fit"):
    deploy.export_budget(tmp_path / "out", params, dec, 0.9, CFG)
  assert not os.path.exists(tmp_path / "out")


def test_other_bad_arguments(trained, tmp_path):
  params, state = trained
  blocks = deploy.spectra(params, state)
  with pytest.raises(ValueError, match="method"):
    deploy.allocate(blocks, 0.5, "uniform")
  with pytest.raises(ValueError, match="unit='params'"):
    deploy.allocate(blocks, 0.5, "hpa", unit="bytes")
  with pytest.raises(ValueError, match="storage format"):
    deploy.account(params, deploy.allocate(blocks, 0.5), "ell")
  with pytest.raises(ValueError, match="dtype"):
    deploy.compress(params, blocks, deploy.allocate(blocks, 0.5), "coo", "int8")
  with pytest.raises(ValueError, match="gamma"):
    deploy.allocate(blocks, 0.5, "hpa", gamma=1.5)
  deploy.export_budget(tmp_path / "a", params, state, 0.5, CFG)
  with pytest.raises(ValueError, match="not empty"):
    deploy.export_budget(tmp_path / "a", params, state, 0.5, CFG)
  deploy.export_budget(tmp_path / "a", params, state, 0.7, CFG, overwrite=True)
  assert deploy.read_manifest(tmp_path / "a")["budget"]["fraction"] == pytest.approx(0.7, 1e-3)
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not an artifact"):
    deploy.export_budget(tmp_path / "b", params, state, 0.5, CFG, overwrite=True)
  assert (tmp_path / "b" / "notes.txt").exists()
  with pytest.raises(ValueError, match="no exported artifact"):
    deploy.load(tmp_path / "b")


def test_export_without_model_config_round_trips(tmp_path):
  params, blocks = _hand_blocks()
  alloc = deploy.allocate(blocks, 73, "global")
  art = deploy.compress(params, blocks, alloc, "csr", "float32")
  deploy.export(tmp_path / "generic", art)
  model, loaded, manifest = deploy.load(tmp_path / "generic")
  assert model is None and manifest["model_config"] is None
  assert jax.tree.map(np.shape, loaded) == jax.tree.map(np.shape, art.params)
  jax.tree.map(np.testing.assert_array_equal, loaded, art.params)
  assert sum(np.asarray(x).nbytes for x in jax.tree.leaves(loaded)) == manifest["bytes"]


@settings(max_examples=40, deadline=None)
@given(seed=hst.integers(0, 2**31 - 1), n_blocks=hst.integers(1, 3),
       frac=hst.floats(0.0, 1.0), gamma=hst.floats(0.0, 1.0),
       fmt=hst.sampled_from(("coo", "csr", "bitmap")))
def test_global_byte_budget_beats_every_hpa_that_fits(seed, n_blocks, frac, gamma, fmt):
  from salaad_jax.deploy import allocation as alloc_lib  # pylint: disable=import-outside-toplevel
  params, _, blocks = _random_problem(seed, n_blocks)
  full, least = 2 * blocks.total_params, 2 * blocks.rest_params
  budget = least + int(round(frac * (full - least)))
  g = deploy.allocate(blocks, budget, "global", gamma=gamma, unit="bytes", fmt=fmt)
  used = alloc_lib.allocation_bytes(g, fmt, "bfloat16")
  assert used <= budget and g.unit == "bytes" and g.budget == budget
  assert deploy.account(params, g, fmt)["bytes"] == used
  # Oracle: HPA at every parameter budget, kept when its bytes fit.
  bases = alloc_lib._hpa_bases(blocks, gamma, 0.999, 1e-8)  # pylint: disable=protected-access
  fitting = [a for a in (alloc_lib._hpa_at(blocks, bases, p, gamma)  # pylint: disable=protected-access
                         for p in range(blocks.rest_params, blocks.total_params + 1))
             if alloc_lib.allocation_bytes(a, fmt, "bfloat16") <= budget]
  for a in fitting:
    assert g.error <= a.error + 1e-9 * max(1.0, a.error)
  best = alloc_lib.hpa_within_bytes(blocks, budget, gamma, fmt=fmt)
  assert (best is None) == (not fitting)
  if fitting:
    assert best.error == pytest.approx(min(a.error for a in fitting), rel=1e-12, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=hst.integers(0, 2**31 - 1), n_blocks=hst.integers(1, 3),
       frac=hst.floats(0.0, 1.0), method=hst.sampled_from(("global", "hpa_within_bytes")))
def test_auto_format_is_the_smallest_error_of_the_three(seed, n_blocks, frac, method):
  from salaad_jax.deploy import allocation as alloc_lib  # pylint: disable=import-outside-toplevel
  params, _, blocks = _random_problem(seed, n_blocks)
  full, least = 2 * blocks.total_params, 2 * blocks.rest_params
  budget = least + int(round(frac * (full - least)))

  def alloc(fmt):
    if method == "global":
      return deploy.allocate(blocks, budget, "global", unit="bytes", fmt=fmt)
    return alloc_lib.hpa_within_bytes(blocks, budget, fmt=fmt)

  each = {f: alloc(f) for f in ("coo", "csr", "bitmap")}
  auto = alloc("auto")
  fitting = {f: a for f, a in each.items() if a is not None}
  assert (auto is None) == (not fitting)
  if auto is None:
    return
  # Oracle: the explicit format of least error (ties: fewest bytes) is the one chosen.
  assert auto.fmt in fitting
  assert auto.error == min(a.error for a in fitting.values())
  assert _allocation_key(auto) == _allocation_key(fitting[auto.fmt])
  assert deploy.account(params, auto, auto.fmt)["bytes"] <= budget
  ties = [f for f, a in fitting.items() if a.error == auto.error]
  assert alloc_lib.allocation_bytes(auto, auto.fmt, "bfloat16") == min(
      alloc_lib.allocation_bytes(fitting[f], f, "bfloat16") for f in ties)


def _allocation_key(alloc):
  return [(b.path, b.rank, b.nnz) for b in alloc.blocks]


def test_auto_format_needs_a_byte_budget_for_hpa():
  _, _, blocks = _random_problem(0, 2)
  with pytest.raises(ValueError, match="method='hpa' allocates parameters"):
    deploy.allocate(blocks, 0.8, "hpa", unit="bytes", fmt="auto")


# ---------------------------------------------------------------------------
# The 'cut' allocation: the cut consolidation trains, deployed.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed, budget", [(0, 0.35), (1, 0.5), (2, 0.62), (3, 0.8)])
def test_cut_allocation_is_the_trained_cut(seed, budget):
  from salaad_jax import consolidate as cons  # pylint: disable=import-outside-toplevel
  params, dec, blocks = _random_problem(seed, 4)
  paths = [b.path for b in blocks.blocks]
  sigmas = [np.sort(np.asarray(dec.factors[p].s, np.float64))[::-1] for p in paths]
  sparses = [np.asarray(dec.sparse[p], np.float64) for p in paths]
  total, rest = blocks.total_params, blocks.rest_params
  shapes = [(b.m, b.n) for b in blocks.blocks]
  bitmaps = sum(math.ceil(m * n / 8) for m, n in shapes)

  def trained(keep):
    kept = cons.global_cut([jnp.asarray(s, jnp.float32) for s in sigmas],
                           [jnp.asarray(s, jnp.float32) for s in sparses], keep=keep)
    return {p: (int(kt.sum()), int(ks.sum())) for p, (kt, ks) in zip(paths, kept)}

  # in parameters: the transform's cut at the same parameter budget
  alloc = deploy.allocate(blocks, budget, "cut")
  assert {b.path: (b.rank, b.nnz) for b in alloc.blocks} == trained(
      math.floor(budget * total) - rest)
  assert alloc.params <= budget * total
  # in bytes (bitmap S): the harness's conversion of a byte budget, b less the
  # bitmaps' share of the dense bytes, and within the budget's bytes
  alloc = deploy.allocate(blocks, budget, "cut", unit="bytes", fmt="auto")
  assert alloc.fmt == "bitmap"
  assert {b.path: (b.rank, b.nnz) for b in alloc.blocks} == trained(
      math.floor((budget - bitmaps / (2 * total)) * total) - rest)
  assert deploy.account(params, alloc, fmt="bitmap")["bytes"] <= budget * 2 * total
  with pytest.raises(ValueError, match="method='cut' prices a byte budget"):
    deploy.allocate(blocks, budget, "cut", unit="bytes", fmt="coo")


def _cut_of(x, f, sp):
  """(k, nnz) with X the top k triplets of L (f) plus nnz entries of S (sp),
  read from X: the rank whose residual is, up to float32 rounding, S on the
  entries where it is nearer S than 0, and 0 elsewhere."""
  u, sig, v = (np.asarray(t, np.float64) for t in f)
  x, sp = np.asarray(x, np.float64), np.asarray(sp, np.float64)
  for k in range(int(np.sum(sig > 0)) + 1):
    rest = x - (u[:, :k] * sig[:k]) @ v[:, :k].T
    kept = (sp != 0) & (np.abs(rest - sp) < np.abs(rest))
    if np.allclose(rest, np.where(kept, sp, 0.0), atol=1e-6):
      return k, int(kept.sum())
  raise AssertionError("the params are not a cut of the state's L + S")


@pytest.mark.slow  # trains the tiny model
def test_a_run_that_trains_cuts_deploys_at_them(tmp_path):
  """A run in factors with --consolidate_cut_budgets: after its last step
  the params are the cut of the state's L + S its next step trains, at one
  of the budgets; deployed with allocation 'cut' at that budget (in bytes,
  S as bitmaps: as benchmarks.compare deploys such a run), every block keeps
  the ranks and entries of that cut."""
  config = tiny_config("salaad", steps=8, every_k=2, rank_target=0.4, density_target=0.05,
                       consolidate_from=0.5, consolidate_params="factors",
                       consolidate_cut_budgets="0.4,0.6")
  wd = str(tmp_path / "run")
  train_and_evaluate(config, wd, devices=jax.devices()[:1])
  run = load_run(wd)
  factors, sparse = sj.low_rank_factors(run.opt_state), sj.sparse_parts(run.opt_state)
  flat = {"/".join(str(k.key) for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(run.params)[0]}
  trained = {p: _cut_of(flat[p], factors[p], sparse[p]) for p in factors}
  whole = {p: (int(np.sum(np.asarray(f.s) > 0)), int(np.sum(np.asarray(sparse[p]) != 0)))
           for p, f in factors.items()}
  assert trained != whole  # the params are a strict cut
  blocks = deploy.spectra(run.params, run.opt_state)
  deployed = {}
  for budget in (0.4, 0.6):
    alloc = deploy.allocate(blocks, budget, "cut", unit="bytes", fmt="bitmap")
    deployed[budget] = {b.path: (b.rank, b.nnz) for b in alloc.blocks}
    spent = deploy.account(run.params, alloc, fmt="bitmap")["bytes"]
    assert spent <= budget * 2 * alloc.total_params
  assert deployed[0.4] != deployed[0.6]
  assert trained in deployed.values(), (trained, deployed)
