"""The structured inference layer against the dense reconstruction X_hat = L + S."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import salaad_jax as sj
from salaad_jax import deploy
from salaad_jax.models import (BlockLayout, Llama, LlamaConfig, StructuredDense, generate,
                               generate_uncached, init_params, runtime, structured_dense,
                               timing)
from salaad_jax.models import structured
from salaad_jax.models.structured import ell_product

FORMATS = ("coo", "csr", "bitmap")


def _block(m=12, n=10, rank=3, density=0.3, seed=0, empty_rows=(2, 5)):
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(m, rank)), rng.normal(size=(n, rank))
  s = np.where(rng.random((m, n)) < density, rng.normal(size=(m, n)), 0.0)
  s[list(empty_rows)] = 0.0  # rows without entries: CSR pointers repeat
  return a, b, s


def _arrays(a, b, s, fmt):
  """Parameters of one structured block, built independently of deploy."""
  rows, cols = np.nonzero(s)  # row-major order
  out = {"lr_a": a, "lr_b": b, "sp_values": s[rows, cols]}
  if fmt == "coo":
    out.update(sp_rows=rows.astype(np.int32), sp_cols=cols.astype(np.int32))
  elif fmt == "csr":
    ptr = np.searchsorted(rows, np.arange(s.shape[0] + 1)).astype(np.int32)
    out.update(sp_cols=cols.astype(np.int32), sp_row_ptr=ptr)
  else:
    out.update(sp_bitmap=np.packbits((s != 0).reshape(-1).astype(np.uint8)))
  return {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else v.dtype)
          for k, v in out.items()}


def _runtime_arrays(a, b, s, fmt):
  """A block's parameters in a runtime format ('ell' or 'flat')."""
  rows, cols = (x.astype(np.int32) for x in np.nonzero(s))
  values = s[rows, cols].astype(np.float32)
  out = {"lr_a": jnp.asarray(a, jnp.float32), "lr_b": jnp.asarray(b, jnp.float32)}
  if fmt == "flat":
    return out | {"sp_flat": jnp.asarray(rows * s.shape[1] + cols, jnp.int32),
                  "sp_values": jnp.asarray(values)}, 0
  ell_rows, ell_values = runtime.ell_arrays(rows, cols, values, s.shape[1])
  return out | {"sp_ell_rows": jnp.asarray(ell_rows),
                "sp_values": jnp.asarray(ell_values)}, ell_rows.shape[1]


@pytest.mark.parametrize("dense_rows", [0, 6])  # factored, and materialised from 6 rows
@pytest.mark.parametrize("fmt", FORMATS + ("ell", "flat"))
def test_block_matches_the_matrix_factored_and_materialised(fmt, dense_rows):
  a, b, s = _block()
  if fmt in FORMATS:
    params, width = _arrays(a, b, s, fmt), 0
  else:
    params, width = _runtime_arrays(a, b, s, fmt)
  layout = BlockLayout(12, 10, 3, int(np.count_nonzero(s)), fmt, width, dense_rows)
  layer = StructuredDense(10, layouts=(("", layout),), dtype=jnp.float32)
  for rows in (1, 5, 6, 9):  # under and over the materialising threshold
    x = np.random.default_rng(rows).normal(size=(rows, 12)).astype(np.float32)
    y = jax.jit(layer.apply)({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(y, x @ (a @ b.T + s), atol=1e-4, rtol=1e-5)
  kernel = structured.materialise(layout, params["lr_a"], params["lr_b"], params["sp_values"],
                                  {k: v for k, v in params.items() if k.startswith("sp_")
                                   and k != "sp_values"})
  np.testing.assert_allclose(kernel, a @ b.T + s, atol=1e-5)


def test_materialised_product_is_the_path_above_dense_rows():
  """The layer switches on the (static) rows of x: under ``dense_rows`` the
  factored product (x A) B^T, from ``dense_rows`` on A B^T and then x X_hat
  (read from the products in the traced program)."""
  a, b, s = _block()
  params, _ = _runtime_arrays(a, b, s, "flat")
  layout = BlockLayout(12, 10, 3, int(np.count_nonzero(s)), "flat", 0, 6)
  layer = StructuredDense(10, layouts=(("", layout),), dtype=jnp.float32)

  def products(rows):
    jaxpr = jax.make_jaxpr(layer.apply)({"params": params}, jnp.ones((rows, 12)))
    return [tuple(e.outvars[0].aval.shape) for e in jaxpr.jaxpr.eqns
            if e.primitive.name == "dot_general"]

  assert products(5) == [(5, 3), (5, 10)]  # (x A) B^T (and S by a scatter-add)
  assert products(6) == [(12, 10), (6, 10)]  # A B^T, then x X_hat


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_matches_dense_matrix(fmt):
  a, b, s = _block()
  layout = BlockLayout(12, 10, 3, int(np.count_nonzero(s)), fmt)
  layer = StructuredDense(10, layouts=(("", layout),), dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 12)), jnp.float32)
  params = _arrays(a, b, s, fmt)
  abstract = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  assert jax.tree.map(lambda t: (t.shape, t.dtype), abstract) == jax.tree.map(
      lambda t: (t.shape, t.dtype), params)
  y = jax.jit(layer.apply)({"params": params}, x)
  np.testing.assert_allclose(y, np.asarray(x) @ (a @ b.T + s), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rank,density", [(0, 0.3), (3, 0.0)])
def test_layer_with_an_empty_part_has_no_parameters_for_it(rank, density):
  a, b, s = _block(rank=rank, density=density)
  layout = BlockLayout(12, 10, rank, int(np.count_nonzero(s)), "coo")
  layer = StructuredDense(10, layouts=(("", layout),), dtype=jnp.float32)
  x = jnp.ones((3, 12), jnp.float32)
  names = set(layer.init(jax.random.key(0), x)["params"])
  assert ("lr_a" in names) == (rank > 0) and ("sp_values" in names) == (density > 0)
  params = {k: v for k, v in _arrays(a, b, s, "coo").items() if k in names}
  np.testing.assert_allclose(layer.apply({"params": params}, x),
                             np.asarray(x) @ (a @ b.T + s), atol=1e-4)


def test_layer_outside_the_table_is_a_plain_dense():
  layer = StructuredDense(7, layouts=(("other", BlockLayout(4, 7, 1, 0)),), use_bias=True)
  x = jnp.ones((2, 4))
  params = layer.init(jax.random.key(0), x)["params"]
  assert set(params) == {"kernel", "bias"}
  ref = nn.Dense(7).apply({"params": params}, x)
  np.testing.assert_allclose(layer.apply({"params": params}, x), ref, atol=1e-6)


def test_layer_rejects_a_layout_of_another_shape():
  layer = StructuredDense(10, layouts=(("", BlockLayout(12, 9, 2, 0)),))
  with pytest.raises(ValueError, match="stores a \\(12, 9\\) matrix"):
    layer.init(jax.random.key(0), jnp.ones((1, 12)))
  with pytest.raises(ValueError, match="sparse format"):
    BlockLayout(4, 4, 1, 1, "csc")
  with pytest.raises(ValueError, match="width"):
    BlockLayout(4, 4, 1, 5, "ell", width=1)


# ---------------------------------------------------------------------------
# Whole model.
# ---------------------------------------------------------------------------

CFG = LlamaConfig(vocab_size=48, d_model=32, d_ff=40, n_heads=2, n_layers=1, max_len=16,
                  dtype="float32")
_DENSE_APPLY = jax.jit(Llama(CFG).apply)


@pytest.fixture(scope="module")
def model_and_blocks():
  params = init_params(CFG, jax.random.key(0))
  dec = sj.deploy.posthoc_factors(params, rank=0.5, density=0.15)
  return params, deploy.spectra(params, dec)


def _tokens():
  return jnp.asarray(np.random.default_rng(2).integers(0, 48, (2, 10)), jnp.int32)


def _with_empty_parts(alloc):
  """The first block keeps no triplet, the second no sparse entry."""
  blocks = list(alloc.blocks)
  blocks[0] = dataclasses.replace(blocks[0], rank=0)
  blocks[1] = dataclasses.replace(blocks[1], nnz=0)
  return dataclasses.replace(alloc, blocks=tuple(blocks))


@pytest.mark.parametrize("fmt", FORMATS)
def test_model_logits_match_dense_reconstruction(model_and_blocks, fmt):
  params, blocks = model_and_blocks
  alloc = _with_empty_parts(deploy.allocate(blocks, 0.7))
  art = deploy.compress(params, blocks, alloc, fmt, "float32")
  model = Llama(CFG, dense_cls=structured_dense(art.layouts))
  got = jax.jit(model.apply)({"params": art.params}, _tokens())
  ref = _DENSE_APPLY({"params": deploy.dense_reconstruction(params, blocks, alloc)}, _tokens())
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
  # And the comparison can fail: the logits move with the allocation.
  other = deploy.dense_reconstruction(params, blocks, deploy.allocate(blocks, 0.9))
  assert float(jnp.max(jnp.abs(_DENSE_APPLY({"params": other}, _tokens()) - ref))) > 1e-3


def test_bfloat16_artifact_is_close_to_the_reference(model_and_blocks):
  params, blocks = model_and_blocks
  alloc = deploy.allocate(blocks, 0.7)
  art = deploy.compress(params, blocks, alloc, "csr", "bfloat16")
  cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
  got = jax.jit(Llama(cfg, dense_cls=structured_dense(art.layouts)).apply)(
      {"params": art.params}, _tokens())
  ref = _DENSE_APPLY({"params": deploy.dense_reconstruction(params, blocks, alloc)}, _tokens())
  scale = float(jnp.max(jnp.abs(ref)))
  assert float(jnp.max(jnp.abs(got - ref))) < 0.05 * scale


def test_greedy_generation_matches_dense_reconstruction(model_and_blocks):
  params, blocks = model_and_blocks
  alloc = deploy.allocate(blocks, 0.8)
  art = deploy.compress(params, blocks, alloc, "bitmap", "float32")
  model = Llama(CFG, dense_cls=structured_dense(art.layouts))
  prompt = _tokens()[:, :3]
  got = generate(model, art.params, prompt, 3, jax.random.key(0), temperature=0.0)
  ref = generate(Llama(CFG), deploy.dense_reconstruction(params, blocks, alloc), prompt, 3,
                 jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(got, ref)


def test_artifact_stores_compact_arrays(model_and_blocks):
  params, blocks = model_and_blocks
  alloc = deploy.allocate(blocks, 0.6)
  art = deploy.compress(params, blocks, alloc, "coo", "float32")
  node = art.params["layers_0"]["mlp"]["up_proj"]
  b = {x.path: x for x in alloc.blocks}["layers_0/mlp/up_proj/kernel"]
  assert "kernel" not in node
  assert node.get("lr_a", jnp.zeros((32, 0))).shape == (32, b.rank)
  assert node.get("sp_values", jnp.zeros(0)).shape == (b.nnz,)
  assert art.layouts["layers_0/mlp/up_proj"] == BlockLayout(32, 40, b.rank, b.nnz, "coo")


# ---------------------------------------------------------------------------
# The runtime form: indices decoded at load, the faster products.
# ---------------------------------------------------------------------------

PRODUCTS = ("coo", "ell", "dense", "auto", "adaptive")


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_runtime_products_match_dense_reconstruction(model_and_blocks, fmt, product):
  params, blocks = model_and_blocks
  alloc = _with_empty_parts(deploy.allocate(blocks, 0.7))
  art = deploy.compress(params, blocks, alloc, fmt, "float32")
  rt_params, rt_layouts = runtime.prepare(art.params, art.layouts, product, auto_rows=4,
                                          auto_repeats=1)
  model = Llama(CFG, dense_cls=structured_dense(rt_layouts))
  tokens = _tokens()
  ref = _DENSE_APPLY({"params": deploy.dense_reconstruction(params, blocks, alloc)}, tokens)
  got = jax.jit(model.apply)({"params": rt_params}, tokens)
  np.testing.assert_allclose(got, ref, atol=3e-5, rtol=1e-5)
  if product == "ell":  # every structured block with entries reads ELL arrays
    assert {lay.fmt for lay in rt_layouts.values() if lay.nnz} == {"ell"}
    assert not any("sp_bitmap" in str(p) or "sp_row_ptr" in str(p)
                   for p in jax.tree_util.tree_flatten_with_path(rt_params)[0])
  if product == "dense":  # only the all-empty block stays structured
    assert all(lay.rank == lay.nnz == 0 for lay in rt_layouts.values())
  if product == "adaptive":  # entries as flat positions, a threshold from the ladder
    assert {lay.fmt for lay in rt_layouts.values()} == {"flat"}
    assert {lay.dense_rows for lay in rt_layouts.values()} <= {0, *runtime.LADDER}
    leaves = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(rt_params)[0]
              if "layers_" in str(p[0])}
    assert leaves <= {"lr_a", "lr_b", "sp_values", "sp_flat", "scale"}


@pytest.mark.parametrize("product,dense_rows", [("ell", None), ("adaptive", 0),
                                                ("adaptive", 1)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_runtime_products_in_bfloat16_are_within_bf16_tolerance(model_and_blocks, fmt, product,
                                                                dense_rows):
  """bf16 runtime forms against the float32 dense reconstruction; 'adaptive'
  with its factored (dense_rows 0) and its materialised product (1)."""
  params, blocks = model_and_blocks
  alloc = deploy.allocate(blocks, 0.7)
  art = deploy.compress(params, blocks, alloc, fmt, "bfloat16")
  rt_params, rt_layouts = runtime.prepare(art.params, art.layouts, product, ladder=(1,),
                                          auto_repeats=1)
  if dense_rows is not None:
    rt_layouts = {k: dataclasses.replace(v, dense_rows=dense_rows) for k, v in rt_layouts.items()}
  cfg = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
  got = jax.jit(Llama(cfg, dense_cls=structured_dense(rt_layouts)).apply)(
      {"params": rt_params}, _tokens())
  ref = _DENSE_APPLY({"params": deploy.dense_reconstruction(params, blocks, alloc)}, _tokens())
  assert float(jnp.max(jnp.abs(got - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("rows", [3, 40])  # the direct gather and the x^T row gather
def test_ell_product_matches_the_matrix(rows):
  a, b, s = _block(m=12, n=10, density=0.4)
  r, c = np.nonzero(s)
  ell_rows, ell_values = runtime.ell_arrays(r.astype(np.int32), c.astype(np.int32),
                                            s[r, c].astype(np.float32), 10)
  assert ell_rows.shape == (10, np.bincount(c, minlength=10).max())
  x = np.random.default_rng(3).normal(size=(rows, 12)).astype(np.float32)
  got = jax.jit(ell_product)(jnp.asarray(x), jnp.asarray(ell_rows), jnp.asarray(ell_values))
  np.testing.assert_allclose(got, x @ s, atol=1e-5)


def test_dense_rows_is_the_count_from_which_on_the_materialised_product_is_faster(
    monkeypatch):
  """``runtime.dense_rows`` on scripted timings: the smallest ladder count
  from which on (every larger count too) X_hat materialised was faster."""
  a, b, s = _block()
  params, _ = _runtime_arrays(a, b, s, "flat")
  layout = BlockLayout(12, 10, 3, int(np.count_nonzero(s)), "flat")

  def scripted(wins):  # wins[rows]: the materialised product is faster at rows
    def time_rounds(calls, repeats):  # (factored, materialised), ladder descending
      assert len(calls) == 2 and repeats == 5
      return [[1.0], [0.5 if wins[order.pop(0)] else 2.0]]
    return time_rounds

  for wins, expected, untimed in [({16: 0, 64: 1, 256: 1, 1024: 1}, 64, 0),
                                  ({16: 1, 64: 0, 256: 1, 1024: 1}, 256, 1),  # 64 loses
                                  ({16: 1, 64: 1, 256: 1, 1024: 0}, 0, 3),
                                  ({16: 1, 64: 1, 256: 1, 1024: 1}, 16, 0)]:
    order = [1024, 256, 64, 16]
    monkeypatch.setattr(runtime.timing, "time_rounds", scripted(wins))
    assert runtime.dense_rows(params, layout, jnp.float32) == expected
    assert len(order) == untimed  # the search stops at the first count that loses


def test_prepare_rejects_an_unknown_product(model_and_blocks):
  params, blocks = model_and_blocks
  art = deploy.compress(params, blocks, deploy.allocate(blocks, 0.7), "coo", "float32")
  with pytest.raises(ValueError, match="structured product"):
    runtime.prepare(art.params, art.layouts, "bcsr")


def test_time_rounds_interleaves_warm_up_then_rounds():
  """``models.timing``: the calls it makes and the statistics of its times
  (what is measured is not asserted: wall-clock times are not a test)."""
  calls = []
  fns = [lambda: calls.append("a"), lambda: calls.append("b")]
  times = timing.time_rounds(fns, repeats=3, warmup=2)
  assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
  assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)
  assert timing.median_ms([0.001, 0.003, 0.002]) == pytest.approx(2.0)
  assert timing.median_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="repeats must be >= 1"):
    timing.time_rounds(fns, repeats=0)
  with pytest.raises(ValueError, match="as many reference times"):
    timing.median_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize("product", ("ell", "dense", "adaptive"))
def test_structured_kv_cache_generation_matches_uncached(model_and_blocks, product):
  params, blocks = model_and_blocks
  art = deploy.compress(params, blocks, deploy.allocate(blocks, 0.7), "bitmap", "float32")
  rt_params, rt_layouts = runtime.prepare(art.params, art.layouts, product)
  model = Llama(CFG, dense_cls=structured_dense(rt_layouts))
  prompt = _tokens()[:, :3]
  args = (model, rt_params, prompt, 10, jax.random.key(0), 0.0)
  np.testing.assert_array_equal(generate(*args), generate_uncached(*args))


class _Chain(nn.Module):
  """``depth`` materialised (m, m) blocks applied in turn."""
  layouts: tuple
  depth: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = StructuredDense(x.shape[-1], layouts=self.layouts, dtype=jnp.float32,
                          name=f"b{i}")(x)
    return x


def _chain(depth, m=256, rank=8):
  rng = np.random.default_rng(0)
  layouts = tuple((f"b{i}", BlockLayout(m, m, rank, 0, "flat", 0, 1)) for i in range(depth))
  params = {f"b{i}": {"lr_a": jnp.asarray(rng.normal(size=(m, rank)) / 4, jnp.float32),
                      "lr_b": jnp.asarray(rng.normal(size=(m, rank)) / 4, jnp.float32)}
            for i in range(depth)}
  return _Chain(layouts, depth), params


def test_materialised_blocks_are_built_one_at_a_time():
  """X_hat of a block is built when its input is ready, not all up front:
  the compiled program's temporary bytes grow by less than one (m, m)
  float32 X_hat per extra block."""
  x = jnp.ones((16, 256), jnp.float32)
  temp = {}
  for depth in (1, 4):
    model, params = _chain(depth)
    stats = jax.jit(model.apply).lower({"params": params}, x).compile().memory_analysis()
    if stats is None:
      pytest.skip("this backend reports no memory analysis")
    temp[depth] = stats.temp_size_in_bytes
  assert temp[4] - temp[1] < 256 * 256 * 4


def test_materialised_block_keeps_a_nan_in_its_row():
  """The tie of X_hat to x is an exact zero: a NaN in x's first row gives
  NaN in that output row only."""
  model, params = _chain(2, m=16)
  x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
  ref = jax.jit(model.apply)({"params": params}, jnp.asarray(x))
  x[0, 0] = np.nan
  got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x)))
  assert np.isnan(got[0]).all()
  np.testing.assert_allclose(got[1:], np.asarray(ref)[1:], rtol=1e-6)


def test_an_empty_block_above_its_dense_rows_gives_zeros():
  """Rank 0 and no entry: no parameters, and the materialised product is 0."""
  layer = StructuredDense(5, layouts=(("", BlockLayout(4, 5, 0, 0, "flat", 0, 1)),))
  x = jnp.ones((3, 4))
  variables = layer.init(jax.random.key(0), x)
  assert not variables.get("params")
  np.testing.assert_array_equal(layer.apply(variables, x), np.zeros((3, 5)))
