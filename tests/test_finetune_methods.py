"""Fine-tuning baselines (LoRA, SALR, LoSA) and their building blocks."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as hst

from salaad_jax.baselines import (accounting, bitmap, calibration, cka, lora, losa, pruning,
                                  salr)
from salaad_jax.models import Llama, cross_entropy_loss, get_config, init_params

CFG = get_config("tiny", dtype=jnp.float32, vocab_size=64, d_model=32, d_ff=48,
                 n_heads=2, n_layers=2, max_len=16)
TOKENS = jax.random.randint(jax.random.key(1), (4, 12), 0, CFG.vocab_size, jnp.int32)
FAST = settings(max_examples=30, deadline=None)


@pytest.fixture(scope="module")
def dense_params():
  return init_params(CFG, jax.random.key(0))


def _random_adapters(adapters, key, scale=0.1):
  """Adapters with every factor (B included) random, as after training."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# --------------------------------------------------------------------- LoRA


@pytest.mark.slow
def test_lora_starts_at_the_base_and_trains_only_adapters(dense_params):
  adapters = lora.init(dense_params, 4, jax.random.key(2))
  assert set(lora.flat(adapters)) == set(lora.target_paths(dense_params))
  assert "lm_head/kernel" not in lora.flat(adapters)
  tree = {"base": dense_params, "adapters": adapters}
  jax.tree.map(np.testing.assert_array_equal, lora.effective_params(tree, 8.0), dense_params)

  model = Llama(CFG)
  tx = lora.freeze(optax.adam(1e-2))

  def loss(t):
    logits = model.apply({"params": lora.effective_params(t, 8.0)}, TOKENS[:, :-1])
    return cross_entropy_loss(logits, TOKENS[:, 1:])[0]

  def body(carry, _):  # one optax step, scanned
    t, state = carry
    value, grads = jax.value_and_grad(loss)(t)
    updates, state = tx.update(grads, state, t)
    return (optax.apply_updates(t, updates), state), value

  state = tx.init(tree)
  # No optimiser moments are kept for the frozen base.
  moment_sizes = sum(x.size for x in jax.tree.leaves(state))
  adapter_size = sum(x.size for x in jax.tree.leaves(adapters))
  assert moment_sizes < 3 * adapter_size
  (tree, state), losses = jax.jit(
      lambda c: jax.lax.scan(body, c, None, length=4))((tree, state))
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, tree["base"], dense_params)
  b = tree["adapters"]["layers_0"]["attn"]["q_proj"]["kernel"].b
  assert float(jnp.max(jnp.abs(b))) > 0


def test_lora_merge_is_w_plus_scaled_product(dense_params):
  adapters = _random_adapters(lora.init(dense_params, 3, jax.random.key(3)), jax.random.key(4))
  merged = lora.merge(dense_params, adapters, alpha=6.0)
  pair = adapters["layers_1"]["mlp"]["down_proj"]["kernel"]
  w = dense_params["layers_1"]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_allclose(merged["layers_1"]["mlp"]["down_proj"]["kernel"],
                             w + 2.0 * pair.a @ pair.b, atol=1e-6)


# --------------------------------------------------------------------- SALR


def test_salr_prunes_half_of_each_base_kernel_by_magnitude(dense_params):
  tree = salr.init(dense_params, jax.random.key(5), lora_rank=2, residual_rank=2)
  for path, w in lora.flat(tree["base"]).items():
    if path not in lora.flat(tree["residual"]):
      np.testing.assert_array_equal(w, lora.flat(dense_params)[path])
      continue
    w0 = np.asarray(lora.flat(dense_params)[path])
    kept = np.asarray(w) != 0
    assert kept.sum() == w0.size - w0.size // 2
    assert np.abs(w0[kept]).min() >= np.abs(w0[~kept]).max()
    np.testing.assert_array_equal(np.asarray(w)[kept], w0[kept])


def test_salr_fused_gemm_equals_the_two_adapters_applied_separately(dense_params):
  tree = salr.init(dense_params, jax.random.key(6), lora_rank=3, residual_rank=5)
  tree["adapters"] = _random_adapters(tree["adapters"], jax.random.key(7))
  alpha = 12.0
  path = "layers_0/mlp/up_proj/kernel"
  w_s = lora.flat(tree["base"])[path]
  res, ada = lora.flat(tree["residual"])[path], lora.flat(tree["adapters"])[path]
  x = jax.random.normal(jax.random.key(8), (7, w_s.shape[0]))
  separate = x @ w_s + (x @ res.a) @ res.b + (alpha / 3) * ((x @ ada.a) @ ada.b)
  fused = salr.fuse(res, ada, alpha)
  assert fused.a.shape == (w_s.shape[0], 8) and fused.b.shape == (8, w_s.shape[1])
  np.testing.assert_allclose(salr.fused_apply(x, w_s, fused), separate, atol=1e-5)
  # And it is the kernel the model trains with.
  w_eff = lora.flat(salr.effective_params(tree, alpha))[path]
  np.testing.assert_allclose(x @ w_eff, separate, atol=1e-5)


def test_salr_residual_error_is_the_tail_singular_mass_and_falls_with_rank():
  w0 = jax.random.normal(jax.random.key(9), (12, 20))
  errors = []
  for r in range(0, 13):
    w_s, _, pair = salr.prune_and_recover(w0, 0.5, r)
    residual = np.asarray(w0, np.float64) - np.asarray(w_s, np.float64)
    sigma = np.linalg.svd(residual, compute_uv=False)
    err = np.sum((residual - np.asarray(pair.a @ pair.b, np.float64)) ** 2)
    np.testing.assert_allclose(err, np.sum(sigma[r:] ** 2), rtol=1e-4, atol=1e-5)
    errors.append(err)
  assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:]))
  assert errors[0] > 1.0 and errors[-1] < 1e-6


def test_salr_export_bytes_match_the_accounting(dense_params):
  tree = salr.init(dense_params, jax.random.key(10), lora_rank=2, residual_rank=3)
  alpha = 4.0
  exported = salr.export(tree, alpha)
  measured = 0
  for path, w in lora.flat(tree["base"]).items():
    if path in exported:
      packed, fused = exported[path]
      np.testing.assert_array_equal(bitmap.unpack(packed).astype(np.float32),
                                    np.asarray(w.astype(jnp.bfloat16), np.float32))
      measured += packed.nbytes + 2 * (fused.a.size + fused.b.size)
    else:
      measured += 2 * w.size
  assert salr.footprint(tree).bytes == measured
  m, n = 32, 48
  per_block = accounting.sparse_footprint(m, n, m * n - m * n // 2,
                                         accounting.ByteCosts(sparse_format="bitmap"))
  assert per_block.bytes == math.ceil(m * n / 8) + 2 * (m * n - m * n // 2)


# ------------------------------------------------------------------- bitmap


@FAST
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=19),
                  elements=hst.floats(-4, 4, width=32, allow_subnormal=False)),
       hst.data())
def test_bitmap_pack_round_trips(w, data):
  mask = data.draw(hnp.arrays(bool, w.shape))
  sparse = np.where(mask, w, 0).astype(np.float32)
  packed = bitmap.pack(sparse)
  np.testing.assert_array_equal(bitmap.unpack(packed), sparse)
  assert packed.nbytes == math.ceil(w.size / 8) + 4 * np.count_nonzero(sparse)
  # An explicit mask keeps stored zeros too.
  explicit = bitmap.pack(sparse, mask=mask)
  np.testing.assert_array_equal(bitmap.unpack_mask(explicit), mask)
  np.testing.assert_array_equal(bitmap.unpack(explicit), sparse)
  assert explicit.values.size == mask.sum()


# ---------------------------------------------------------------------- CKA


def _rep(seed, rows, cols):
  return np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)


# (rows, p, q) of the CKA properties: the smallest and largest sides, fewer
# samples than features, p < q and p > q.  CKA runs op by op and every shape
# compiles its ops anew, so the data vary from example to example and the
# shapes come from this set.
CKA_SHAPES = [(6, 2, 2), (6, 12, 5), (13, 7, 12), (40, 2, 12), (40, 12, 12)]


@FAST
@given(hst.integers(0, 2**31 - 1), hst.sampled_from(CKA_SHAPES), hst.floats(0.01, 100.0))
def test_cka_identity_orthogonal_and_scale_invariance(seed, shape, scale):
  rows, p, q = shape
  x, y = _rep(seed, rows, p), _rep(seed + 1, rows, q)
  np.testing.assert_allclose(cka.linear_cka(x, x), 1.0, atol=1e-5)
  base = float(cka.linear_cka(x, y))
  assert -1e-6 <= base <= 1 + 1e-6
  rotation, _ = np.linalg.qr(_rep(seed + 2, p, p))
  np.testing.assert_allclose(cka.linear_cka(scale * x @ rotation, y), base, atol=1e-4)
  np.testing.assert_allclose(cka.linear_cka(y, x), base, atol=1e-5)
  # Centred: a constant shift of every sample changes nothing.
  shift = 3.0 * _rep(seed + 3, 1, p)
  np.testing.assert_allclose(cka.linear_cka(x + shift, y), base, atol=1e-4)


def test_cka_detects_unrelated_representations():
  x = _rep(0, 2000, 4)
  assert float(cka.linear_cka(x, _rep(1, 2000, 4))) < 0.05
  assert float(cka.linear_cka(x, np.tanh(x))) > 0.9
  matrix = cka.cka_matrix([x, np.tanh(x), _rep(1, 2000, 4)])
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
  np.testing.assert_allclose(matrix, matrix.T)


# --------------------------------------------------------- LoSA allocations


@FAST
@given(hst.floats(0.05, 0.95), hst.integers(1, 12))
def test_cubic_schedule_reaches_target_and_is_monotone(target, rounds):
  values = [losa.cubic_sparsity(target, t, rounds) for t in range(rounds + 1)]
  np.testing.assert_allclose(
      values, [target * (1 - (1 - t / rounds) ** 3) for t in range(rounds + 1)], rtol=1e-12)
  assert values[0] == 0.0
  assert values[-1] == pytest.approx(target, abs=1e-12)
  assert all(b > a for a, b in zip(values, values[1:]))
  # Cubic: most of the pruning happens early.
  if rounds >= 2:
    assert values[1] >= target / rounds


@FAST
@given(hnp.arrays(np.float64, hst.integers(2, 24), elements=hst.floats(0, 1)),
       hst.floats(0.2, 0.8), hst.floats(0.01, 0.03))
def test_layer_sparsities_hold_the_mean_within_bounds(redundancy, mean, max_dev):
  s = losa.layer_sparsities(redundancy, mean, max_dev)
  assert s.mean() == pytest.approx(mean, abs=1e-9)
  assert np.all(np.abs(s - mean) <= max_dev + 1e-12)
  order = np.argsort(redundancy, kind="stable")
  assert np.all(np.diff(s[order]) >= -1e-12)  # more redundant, sparser


@FAST
@given(hnp.arrays(np.float64, hst.integers(1, 16), elements=hst.floats(0, 10)),
       hst.integers(16, 200))
def test_rank_allocation_is_proportional_and_sums_to_budget(errors, total):
  ranks = losa.allocate_ranks(errors, total, min_rank=1)
  assert ranks.sum() == total and ranks.min() >= 1
  smaller = errors[:, None] < errors[None, :]  # e_i < e_j  =>  r_i <= r_j
  assert np.all((ranks[:, None] <= ranks[None, :])[smaller])
  spare = total - errors.size
  if errors.sum() > 0:
    assert np.all(np.abs(ranks - 1 - spare * errors / errors.sum()) < 1.0 + 1e-9)


@FAST
@given(hst.integers(0, 2**31 - 1),  # (m, n) of a few shapes, as CKA_SHAPES
       hst.sampled_from([(2, 1), (3, 8), (7, 5), (16, 1), (16, 8)]), hst.floats(0.0, 0.9))
def test_wanda_mask_prunes_each_output_channel_by_score(seed, shape, sparsity):
  m, n = shape
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(m, n)).astype(np.float32)
  sq_norm = rng.uniform(0.1, 4.0, size=m).astype(np.float32)
  mask = np.asarray(pruning.wanda_mask(w, sq_norm, sparsity))
  scores = np.abs(w) * np.sqrt(sq_norm)[:, None]
  assert np.all(mask.sum(axis=0) == m - math.floor(sparsity * m + 1e-9))
  for j in range(n):
    if 0 < mask[:, j].sum() < m:
      assert scores[mask[:, j], j].min() >= scores[~mask[:, j], j].max()


def test_magnitude_mask_exact_count_with_ties():
  w = jnp.ones((4, 5))
  assert int(pruning.magnitude_mask(w, 0.5).sum()) == 10


# ----------------------------------------------------------- LoSA, end to end


def test_calibration_statistics(dense_params):
  calib = calibration.collect(CFG, dense_params, TOKENS)
  assert len(calib.hidden) == CFG.n_layers + 1
  np.testing.assert_allclose(
      calib.hidden[0],
      dense_params["embed"]["embedding"][TOKENS].reshape(-1, CFG.d_model), atol=1e-6)
  norms = {p.rsplit("/", 2)[-2]: v for p, v in calib.sq_norms.items() if "layers_0/" in p}
  assert norms["down_proj"].shape == (CFG.d_ff,)
  # q, k and v read the same normalised input.
  np.testing.assert_allclose(norms["q_proj"], norms["k_proj"], rtol=1e-6)
  np.testing.assert_allclose(norms["q_proj"], norms["v_proj"], rtol=1e-6)
  assert set(calib.sq_norms) == set(lora.target_paths(dense_params))


@pytest.mark.slow
def test_losa_rounds_keep_the_sparsity_mask_exactly(dense_params):
  alpha, target, rounds = 8.0, 0.5, 3
  state = losa.init(dense_params)
  previous_zero = None
  for t in range(1, rounds + 1):
    calib = calibration.collect(CFG, losa.effective_params(state, alpha), TOKENS)
    state = losa.next_round(state, calib, jax.random.key(11), target=target, alpha=alpha,
                            mean_rank=3, rounds=rounds, max_deviation=0.02)
    s_t = losa.cubic_sparsity(target, t, rounds)
    assert state.round == t
    assert state.layer_sparsity.mean() == pytest.approx(s_t, abs=1e-6)
    assert np.all(np.abs(state.layer_sparsity - s_t) <= 0.02 + 1e-6)
    assert state.layer_rank.sum() == 3 * CFG.n_layers
    # Simulate a round of training: every adapter factor becomes non-zero.
    state = state._replace(adapters=_random_adapters(state.adapters, jax.random.key(t)))
    effective = lora.flat(losa.effective_params(state, alpha))
    base, masks = lora.flat(state.base), lora.flat(state.masks)
    adapters = lora.flat(state.adapters)
    zero_now = {}
    for path, mask in masks.items():
      mask = np.asarray(mask)
      w = np.asarray(effective[path])
      assert np.all(w[~mask] == 0.0)  # the merge keeps the pattern exactly
      assert np.all(np.asarray(base[path])[~mask] == 0.0)
      expected = np.asarray(base[path]) + mask * np.asarray(lora.delta(adapters[path], alpha))
      np.testing.assert_allclose(w, expected, atol=1e-6)
      rows = w.shape[0]
      s_l = state.layer_sparsity[losa.layer_of(path)]
      assert np.all((~mask).sum(axis=0) == math.floor(s_l * rows + 1e-9))
      zero_now[path] = ~mask
      if previous_zero is not None:  # pruned weights were merged as zeros
        assert np.all(np.asarray(base[path])[previous_zero[path]] == 0.0)
    previous_zero = zero_now
  assert state.layer_sparsity.mean() == pytest.approx(target, abs=1e-6)


def test_losa_redundancy_orders_layers_by_input_output_similarity():
  h0 = _rep(0, 500, 6)
  hidden = [h0, h0 + 0.01 * _rep(1, 500, 6), _rep(2, 500, 6)]
  rho = losa.layer_redundancy(hidden)
  assert rho[0] > 0.99 and rho[1] < 0.2
  s = losa.layer_sparsities(rho, 0.5, 0.03)
  np.testing.assert_allclose(s, [0.53, 0.47])


def test_losa_rejects_blocks_outside_decoder_layers():
  with pytest.raises(ValueError, match="layers_<i>"):
    losa.layer_of("lm_head/kernel")
