"""Pretraining baselines: each method's defining property on a tiny Llama."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import GaLoreState

from salaad_jax import structure
from salaad_jax.baselines import (accounting, galore, lost, lowrank, make_method, match_rank,
                                  match_rank_target, sltrain, split_variables)
from salaad_jax.deploy import accounting as deploy_accounting
from salaad_jax.models import Llama, count_params, cross_entropy_loss, get_config

CFG = get_config("tiny", dtype=jnp.float32, vocab_size=64, d_model=32, d_ff=48,
                 n_heads=2, n_layers=1, max_len=16)
TOKENS = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size, jnp.int32)
RANK = 4


def _build(name, **hparams):
  spec = make_method(name, **hparams)
  model = Llama(CFG, dense_cls=spec.dense_cls(CFG))
  variables = jax.jit(model.init)(jax.random.key(0), TOKENS)
  return spec, model, variables


def _train(model, params, constants, tx, steps):
  """`steps` jitted optax steps of next-token loss on TOKENS."""

  def loss(p):
    logits = model.apply({"params": p, **constants}, TOKENS[:, :-1])
    return cross_entropy_loss(logits, TOKENS[:, 1:])[0]

  @jax.jit
  def step(p, state):
    value, grads = jax.value_and_grad(loss)(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, value

  state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
  return params, state, losses


def _layers(tree):
  """(path, layer dict) for every projection of a params/constants tree."""
  for i in range(CFG.n_layers):
    for group, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
      for name in names:
        yield f"layers_{i}/{group}/{name}_proj", tree[f"layers_{i}"][group][f"{name}_proj"]


# ------------------------------------------------------------------ SLTrain


@pytest.fixture(scope="module")
def sltrain_run():
  spec, model, variables = _build("sltrain", rank=RANK, density=0.03, seed=7)
  params, constants = split_variables(variables)
  trained, _, losses = _train(model, params, constants, spec.optimizer(3e-2), steps=4)
  return spec, variables, trained, losses


def test_sltrain_support_is_fixed_and_off_support_stays_zero(sltrain_run):
  spec, variables, trained, losses = sltrain_run
  assert np.isfinite(losses).all()
  # The support is not a parameter: nothing integer-valued reaches the optimiser.
  assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(trained))
  support = variables["sparsity"]
  moved = 0.0
  for path, layer in _layers(trained):
    index = _layers_get(support, path)["index"]
    m, n = layer["lora_a"].shape[0], layer["lora_b"].shape[1]
    # The index array is the one drawn from (seed, path) alone, sorted and distinct.
    expected = sltrain.random_support(sltrain.support_key(7, path), m * n,
                                      math.floor(0.03 * m * n))
    np.testing.assert_array_equal(index, expected)
    assert np.all(np.diff(np.asarray(index)) > 0)
    # Off the support S is exactly zero after training.
    s = np.asarray(sltrain.sparse_part(layer, {"index": index})).ravel()
    off = np.ones(m * n, bool)
    off[np.asarray(index)] = False
    assert np.all(s[off] == 0.0)
    np.testing.assert_array_equal(s[np.asarray(index)], layer["sparse_values"])
    before = _layers_get(variables["params"], path)
    moved += float(jnp.max(jnp.abs(layer["sparse_values"] - before["sparse_values"])))
    # W = (alpha / r) A B + S reconstructs the kernel the model uses.
    w = sltrain.kernel(layer, {"index": index}, 32.0 / RANK)
    np.testing.assert_allclose(
        np.asarray(w).ravel()[off],
        (32.0 / RANK * np.asarray(layer["lora_a"]) @ np.asarray(layer["lora_b"])).ravel()[off],
        rtol=1e-5, atol=1e-6)
  assert moved > 0  # the sparse values did train


def _layers_get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def test_sltrain_support_depends_on_seed_and_path_only():
  spec = make_method("sltrain", rank=RANK, seed=3)
  model = Llama(CFG, dense_cls=spec.dense_cls(CFG))
  init = jax.jit(model.init)
  a = init(jax.random.key(0), TOKENS)["sparsity"]
  b = init(jax.random.key(1), TOKENS)["sparsity"]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  other = Llama(CFG, dense_cls=make_method("sltrain", rank=RANK, seed=4).dense_cls(CFG))
  c = jax.jit(other.init)(jax.random.key(0), TOKENS)["sparsity"]
  q = lambda t: np.asarray(t["layers_0"]["attn"]["q_proj"]["index"])
  k = lambda t: np.asarray(t["layers_0"]["attn"]["k_proj"]["index"])
  assert not np.array_equal(q(a), q(c))
  assert not np.array_equal(q(a), k(a))


def test_sltrain_reference_init(sltrain_run):
  variables = sltrain_run[1]
  layer = variables["params"]["layers_0"]["mlp"]["up_proj"]
  m = layer["lora_a"].shape[0]
  assert np.all(np.asarray(layer["lora_b"]) == 0)
  for name in ("lora_a", "sparse_values"):
    assert np.max(np.abs(layer[name])) <= 1 / math.sqrt(m)
    assert np.std(layer[name]) > 0.3 / math.sqrt(m)


# --------------------------------------------------------- low rank and LOST


def _svd_truncate(w, r):
  u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r], s


def test_balanced_factors_are_the_best_rank_r_approximation():
  w = jax.random.normal(jax.random.key(2), (24, 40))
  a, b = lowrank.balanced_factors(w, 5)
  assert a.shape == (24, 5) and b.shape == (5, 40)
  best, sigma = _svd_truncate(w, 5)
  np.testing.assert_allclose(np.asarray(a @ b), best, atol=2e-5)
  # The split is even: ||A||_F^2 = ||B||_F^2 = sum of the kept singular values.
  np.testing.assert_allclose(float(jnp.sum(a * a)), sigma[:5].sum(), rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(b * b)), sigma[:5].sum(), rtol=1e-5)


def test_lowrank_layer_init_is_truncated_svd_of_its_dense_init():
  w0 = jax.random.normal(jax.random.key(3), (16, 24))
  layer = lowrank.LowRankDense(24, rank=3, kernel_init=lambda *_: w0)
  params = layer.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
  np.testing.assert_allclose(np.asarray(lowrank.kernel(params)), _svd_truncate(w0, 3)[0],
                             atol=2e-5)
  x = jax.random.normal(jax.random.key(4), (5, 16))
  np.testing.assert_allclose(layer.apply({"params": params}, x),
                             x @ lowrank.kernel(params), atol=1e-5)


def test_lost_decompose_reconstructs_w0_on_kept_channels():
  w0 = jax.random.normal(jax.random.key(5), (20, 30))
  rank, k = 4, 6
  parts = lost.decompose(w0, rank, k)
  low, _ = _svd_truncate(w0, rank)
  np.testing.assert_allclose(np.asarray(parts.a @ parts.b), low, atol=2e-5)
  # Kept channels: the k columns of the complement W0 - L0 with largest norm.
  complement = np.asarray(w0, np.float64) - low
  expected = np.sort(np.argsort(-np.linalg.norm(complement, axis=0))[:k])
  np.testing.assert_array_equal(parts.columns, expected)
  w = np.asarray(lost.kernel({"lowrank_a": parts.a, "lowrank_b": parts.b,
                              "sparse_columns": parts.values}, {"columns": parts.columns}))
  kept = np.zeros(30, bool)
  kept[expected] = True
  np.testing.assert_allclose(w[:, kept], np.asarray(w0)[:, kept], atol=1e-5)
  np.testing.assert_allclose(w[:, ~kept], low[:, ~kept], atol=2e-5)


def test_lost_layer_init_and_forward():
  w0 = jax.random.normal(jax.random.key(6), (16, 40))
  layer = lost.LostDense(40, rank=3, density=0.1, kernel_init=lambda *_: w0)
  variables = layer.init(jax.random.key(0), jnp.ones((1, 16)))
  parts = lost.decompose(w0, 3, 4)
  np.testing.assert_array_equal(variables["sparsity"]["columns"], parts.columns)
  np.testing.assert_allclose(variables["params"]["sparse_columns"], parts.values, atol=1e-6)
  x = jax.random.normal(jax.random.key(7), (2, 3, 16))
  w = lost.kernel(variables["params"], variables["sparsity"])
  np.testing.assert_allclose(layer.apply(variables, x), x @ w, atol=1e-5)


@pytest.mark.parametrize("name,hparams", [
    ("lowrank", {"rank": RANK}),
    ("sltrain", {"rank": RANK}),
    ("lost", {"rank": RANK, "density": 0.1}),
])
def test_structured_model_equals_its_dense_equivalent(name, hparams):
  spec, model, variables = _build(name, **hparams)
  params, constants = split_variables(variables)
  # Perturb every parameter so that no term is trivially zero (SLTrain's B).
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(8), len(leaves))
  params = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape)
                              for x, k in zip(leaves, keys)])
  logits = model.apply({"params": params, **constants}, TOKENS)
  dense = spec.to_dense({"params": params, **constants})
  reference = Llama(CFG).apply({"params": dense}, TOKENS)
  np.testing.assert_allclose(logits, reference, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------- accounting


def _sparse_bytes(m, n, nnz, fmt):
  if nnz == 0:
    return 0
  return {"coo": nnz * 10, "csr": nnz * 6 + 4 * (m + 1),
          "bitmap": 2 * nnz + math.ceil(m * n / 8)}[fmt]


def _closed_form(name, rank=RANK, density=0.03, fmt="coo"):
  d, ff, v, n_layers = CFG.d_model, CFG.d_ff, CFG.vocab_size, CFG.n_layers
  rest = 2 * v * d + (2 * n_layers + 1) * d
  shapes = n_layers * ([(d, d)] * 4 + [(d, ff), (d, ff), (ff, d)])
  if name in ("dense", "galore"):
    p = rest + sum(m * n for m, n in shapes)
    return p, 2 * p
  low = sum((m + n) * rank for m, n in shapes)
  if name == "lowrank":
    return rest + low, 2 * (rest + low)
  if name == "sltrain":
    nnz = [int(density * m * n) for m, n in shapes]
    return (rest + low + sum(nnz),
            2 * (rest + low) + sum(_sparse_bytes(m, n, k, fmt) for (m, n), k in zip(shapes, nnz)))
  cols = [(m, int(density * n)) for m, n in shapes]
  nnz = sum(m * k for m, k in cols)
  return rest + low + nnz, 2 * (rest + low + nnz) + 4 * sum(k for _, k in cols)


@pytest.mark.parametrize("name,hparams", [
    ("dense", {}),
    ("lowrank", {"rank": RANK}),
    ("sltrain", {"rank": RANK, "density": 0.03}),
    ("lost", {"rank": RANK, "density": 0.1}),
    ("galore", {"rank": RANK}),
])
def test_footprint_matches_formula_and_parameter_tree(name, hparams):
  spec = make_method(name, **hparams)
  density = hparams.get("density", 0.03)
  params, bytes_ = _closed_form(name, density=density)
  fp = spec.footprint(CFG)
  assert fp == (params, bytes_)
  abstract = jax.eval_shape(Llama(CFG, dense_cls=spec.dense_cls(CFG)).init,
                            jax.random.key(0), TOKENS)
  assert count_params(abstract["params"]) == params
  if name == "sltrain":
    for fmt in ("csr", "bitmap"):
      fp = spec.footprint(CFG, accounting.ByteCosts(sparse_format=fmt))
      assert fp == _closed_form(name, density=density, fmt=fmt)


@pytest.mark.parametrize("name,hparams", [("lowrank", {}), ("sltrain", {}),
                                          ("lost", {"density": 0.1})])
def test_match_rank_is_the_largest_rank_within_budget(name, hparams):
  target = make_method("dense").footprint(CFG).params // 2
  r = match_rank(name, CFG, target, **hparams)
  count = lambda rank: make_method(name, rank=rank, **hparams).footprint(CFG).params
  assert count(r) <= target < count(r + 1)


@pytest.mark.parametrize("fraction,density", [(0.5, 0.05), (0.7, 0.0), (0.4, 0.1)])
def test_match_rank_target_fills_the_budget_on_salaads_own_blocks(fraction, density):
  """Oracle: SALAAD's default block selection on the real parameter tree and
  the deployment accounting, at rank r* min(m, n) (fractional) and nnz d* m n."""
  params = jax.eval_shape(Llama(CFG).init, jax.random.key(0), TOKENS)["params"]
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  target = int(fraction * total)
  rate = match_rank_target(CFG, target, density)
  assert 0 < rate <= 1
  blocks = structure.block_list(structure.select_blocks(params))
  kept = total
  for b in blocks:
    m = math.prod(b.shape[:b.row_axes])
    n = math.prod(b.shape[b.row_axes:])
    kept += deploy_accounting.block_params(m, n, rate * min(m, n), density * m * n) - m * n
  assert kept == pytest.approx(target, rel=1e-9)


def test_match_rank_target_errors():
  total = make_method("dense").footprint(CFG).params
  with pytest.raises(ValueError, match="no rank target"):
    match_rank_target(CFG, total // 10, 0.05)   # below P_rest
  with pytest.raises(ValueError, match="no rank target"):
    match_rank_target(CFG, total, 1.0)          # S alone fills the budget


def test_match_rank_errors():
  with pytest.raises(ValueError, match="does not depend on its rank"):
    match_rank("galore", CFG, 10**6)
  with pytest.raises(ValueError, match="below the smallest model"):
    match_rank("lowrank", CFG, 10)
  with pytest.raises(ValueError, match="no rank"):
    match_rank("dense", CFG, 10**6)


def test_unknown_method_or_hyperparameter_and_bad_rank():
  with pytest.raises(ValueError, match="Unknown pretraining method"):
    make_method("sparsegpt")
  with pytest.raises(ValueError, match="no hyperparameter"):
    make_method("lowrank", rnk=3)
  spec = make_method("lowrank", rank=CFG.d_model + 1)
  with pytest.raises(ValueError, match="rank=33 is invalid"):
    Llama(CFG, dense_cls=spec.dense_cls(CFG)).init(jax.random.key(0), TOKENS)


def test_accounting_formulas():
  assert accounting.lowrank_footprint(10, 20, 3) == (90, 180)
  costs = accounting.ByteCosts
  assert accounting.sparse_footprint(3, 5, 7) == (7, 7 * 10)
  assert accounting.sparse_footprint(3, 5, 7, costs(sparse_format="csr")) == (7, 7 * 6 + 16)
  assert accounting.sparse_footprint(3, 5, 4, costs(sparse_format="bitmap")) == (4, 2 + 8)
  assert accounting.sparse_footprint(3, 5, 0, costs(sparse_format="bitmap")) == (0, 0)
  assert accounting.column_sparse_footprint(10, 3) == (30, 60 + 12)
  assert accounting.total(accounting.dense_footprint(5), accounting.dense_footprint(6)) == (11, 22)
  with pytest.raises(ValueError, match="density"):
    accounting.kept_count(10, 1.5)
  with pytest.raises(ValueError, match="sparse_format"):
    accounting.sparse_footprint(3, 5, 7, costs(sparse_format="ell"))


@pytest.mark.parametrize("fmt", ["coo", "csr", "bitmap"])
def test_sparse_bytes_agree_with_the_deployment_accounting(fmt):
  deploy = pytest.importorskip("salaad_jax.deploy.accounting")
  for m, n, nnz in [(32, 48, 0), (32, 48, 46), (172, 64, 5000)]:
    ours = accounting.sparse_footprint(m, n, nnz, accounting.ByteCosts(sparse_format=fmt))
    assert ours.bytes == deploy.sparse_bytes(fmt, m, n, nnz, 2)


# ------------------------------------------------------------------- GaLore


def test_galore_runs_in_a_jitted_train_step():
  spec, model, variables = _build("galore", rank=RANK, update_proj_gap=2)
  params = variables["params"]
  trained, state, losses = _train(model, params, {}, spec.optimizer(1e-2), steps=5)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  galore_state = next(s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, GaLoreState)) if isinstance(s, GaLoreState))
  assert int(galore_state.count) == 5
  proj = galore_state.projector
  # Block kernels get a rank-r projector on their longer side; others none.
  assert proj["layers_0"]["attn"]["q_proj"]["kernel"].shape == (CFG.d_model, RANK)
  assert proj["layers_0"]["mlp"]["down_proj"]["kernel"].shape == (CFG.d_ff, RANK)
  assert proj["embed"]["embedding"].shape == (0, 0)
  assert proj["lm_head"]["kernel"].shape == (0, 0)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), trained, params)
  assert min(jax.tree.leaves(moved)) > 0


def test_galore_block_selection():
  params = {"dense": {"kernel": jnp.ones((4, 6))}, "lm_head": {"kernel": jnp.ones((6, 3))},
            "norm": {"scale": jnp.ones((4,))}}
  dims = galore.projected_leaves(params)
  assert dims["dense"]["kernel"] is not None
  assert dims["lm_head"]["kernel"] is None and dims["norm"]["scale"] is None


def test_dense_cls_contract_with_bias():
  x = jax.random.normal(jax.random.key(9), (3, 8))
  for cls in (lowrank.LowRankDense, functools.partial(sltrain.SLTrainDense, density=0.2),
              functools.partial(lost.LostDense, density=0.2)):
    layer = cls(12, use_bias=True, rank=2, bias_init=nn.initializers.ones)
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["bias"].shape == (12,)
    y0 = layer.apply(variables, x)
    params = dict(variables["params"], bias=jnp.zeros(12))
    np.testing.assert_allclose(y0 - layer.apply(dict(variables, params=params), x), 1.0,
                               atol=1e-5)
