"""train.programs and the executors built on it: the seed and the peak learning
rate are inputs of a run's compiled initialisation and step, host fields do
not reach them, and one process keeps the programs, so a seed or
learning-rate sweep traces and compiles them once and trains as a run with
the values compiled in does."""

import jax
import numpy as np
import pytest

from helpers import tiny_config
from salaad_jax.train import build, get_method, programs
from salaad_jax.train.executors import make_executor

# SALAAD's ADMM rounds alone (every 2 steps): a small step to compile.
SALAAD = dict(every_k=2, rank_target=0.3, density_target=0.05, svt="fast", init_iters=1,
              vocab_size=256)


def _config(method="salaad", **kw):
  return tiny_config(method, **({**SALAAD, **kw} if method == "salaad" else
                                {"vocab_size": 256, **kw}))


def _key(config):
  return programs.program_key(config, get_method(config.method))


def test_runtime_and_host_fields_do_not_shape_the_programs():
  base = _config()
  for change in (dict(seed=3), dict(lr=0.5), dict(data_seed=9), dict(log_every=1),
                 dict(source="synthetic:order=2"), dict(checkpoint_every=5),
                 dict(eval_batches=7)):
    assert _key(base.replace(**change)) == _key(base), change
  for change in (dict(steps=13), dict(every_k=3), dict(batch_size=8), dict(min_lr_ratio=0.5),
                 dict(warmup_steps=2), dict(rho=0.5)):
    assert _key(base.replace(**change)) != _key(base), change
  # SLTrain draws its support from the seed as a Python int: a compiled constant.
  sl = _config("sltrain")
  assert "seed" not in programs.runtime_fields(sl, get_method("sltrain"))
  assert _key(sl.replace(seed=3)) != _key(sl) and _key(sl.replace(lr=0.5)) == _key(sl)
  # A seed an int32 input would wrap stays a constant.
  big = base.replace(seed=2 ** 31 - 1)
  assert programs.runtime_fields(big, get_method("salaad")) == ("lr",)
  assert _key(big) != _key(base)
  assert programs.runtime_values(base.replace(seed=5, lr=0.25), get_method("salaad")) == {
      "lr": np.float32(0.25), "seed": np.int32(5)}


def _train(config, steps=3, explicit_tx=False):
  """(executor, state after ``steps`` steps on fixed batches)."""
  parts = build(config)
  ex = make_executor(config, parts.model, parts.method,
                     parts.tx if explicit_tx else None, devices=jax.devices()[:1])
  state = ex.init()
  rng = np.random.default_rng(0)
  for _ in range(steps):
    tokens = rng.integers(0, 256, (config.batch_size, config.seq_len + 1), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "mask": np.ones((config.batch_size, config.seq_len), np.float32)}
    state, _ = ex.step(state, ex.put_batch(batch))
  return ex, jax.device_get(state)


@pytest.fixture(scope="module")
def sweep():
  """Runs of one configuration at two seeds and two learning rates, and the
  second with its values compiled in."""
  programs.clear_cache()
  runs = {(s, lr): _train(_config(seed=s, lr=lr)) for s, lr in ((0, 1e-2), (1, 7e-3))}
  constant = _train(_config(seed=1, lr=7e-3), explicit_tx=True)[1]
  return runs, constant


@pytest.mark.slow  # trains
def test_a_seed_and_lr_sweep_compiles_once(sweep):
  runs, _ = sweep
  (e0, _), (e1, _) = runs.values()
  assert e0._step is e1._step and e0._init is e1._init
  assert e0._step._cache_size() == 1 and e0._init._cache_size() == 1


@pytest.mark.slow  # trains
def test_inputs_train_as_the_values_compiled_in(sweep):
  runs, constant = sweep
  (_, a), (_, b) = runs.values()
  # The second run of the sweep (its seed and rate passed in) as one compiled with them.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7),
               b, constant)
  emb = lambda s: s.params["embed"]["embedding"]
  assert not np.allclose(emb(a), emb(b))  # another seed, other weights


def test_cache_keeps_the_latest_programs_and_builds_unhashable_keys_each_time():
  programs.clear_cache()
  built = []
  build = lambda: built.append(1) or len(built)
  assert programs.cached(("a",), build) == programs.cached(("a",), build) == 1
  assert programs.cached(["unhashable"], build) == 2
  assert programs.cached(["unhashable"], build) == 3
  for i in range(programs.CACHE_SIZE):
    programs.cached(("k", i), build)
  assert programs.cached(("a",), build) == 4 + programs.CACHE_SIZE  # evicted, built again
  programs.clear_cache()
