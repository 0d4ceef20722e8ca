"""Training compute (``salaad_jax.train.compute``) against hand counts, and
the step counts that match one run's FLOPs."""

import math

import pytest

from salaad_jax.train import TrainConfig, compute, presets
from salaad_jax.train.state import model_config

BASE = dict(model="tiny", steps=1000, batch_size=8, seq_len=64, vocab_size=256)
TINY = model_config(TrainConfig(**BASE))


def _hand_pass_flops_per_token(d=64, f=172, layers=2, vocab=256, seq=64, per_block=None):
  """6 x (the blocks' and the head's multiply-adds) + 12 L T d, written out
  for the tiny model: per layer q, k, v, o (d x d) and gate, up (d x f),
  down (f x d)."""
  per_block = per_block or (lambda m, n: m * n)
  blocks = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]
  macs = layers * sum(per_block(m, n) for m, n in blocks) + d * vocab
  return 6 * macs + 12 * layers * seq * d


def test_dense_pass_flops_are_the_hand_count():
  assert _hand_pass_flops_per_token() == 789_504  # the tiny model, written out once
  got = compute.train_compute(TrainConfig(method="dense", **BASE), TINY)
  assert got.pass_flops_per_token == _hand_pass_flops_per_token()
  assert (got.tokens, got.passes, got.structure_flops) == (1000 * 512, 1000, 0.0)
  assert got.train_flops == 1000 * 512 * 789_504


JOINT = dict(consolidate_cut_budgets="0.4,1", consolidate_cut_joint=0.6)  # two passes a step


def test_joint_cut_loss_counts_a_second_pass_on_every_factor_step():
  config = presets.config_with_preset("recommended", **JOINT, **BASE)
  got = compute.train_compute(config, TINY)
  # consolidate_from 0.01 x 1000 = 10: counts 0..10 are ADMM steps (the
  # last one projects), counts 11..999 (989 steps) train the factors, each
  # with the cut's second pass.
  assert compute.factor_steps(config) == 989
  assert got.passes == 1000 + 989
  assert got.model_flops == 1989 * 512 * _hand_pass_flops_per_token()
  # Structure work by hand: 1 ADMM round (count 10, K 10) with the fast SVT
  # (svt_iters 1: 2 products by X and 2 by X^T at the factor width
  # w = ceil(2 r* k) + 8), then per factor step 6 m n r + 6 (m + n) r^2 +
  # 22 r^3, and 6 m n r more for the cut's gradient, r = ceil(r* k).
  r_star, total = config.rank_target, 0.0
  for m, n in [(64, 64)] * 8 + [(64, 172)] * 4 + [(172, 64)] * 2:
    k = min(m, n)
    w = math.ceil(2 * r_star * k) + 8
    r = math.ceil(r_star * k - 1e-6)
    total += 1 * 2 * 2 * 2 * m * n * w
    total += 989 * (6 * m * n * r + 6 * (m + n) * r * r + 22 * r ** 3 + 6 * m * n * r)
  assert got.structure_flops == pytest.approx(total)
  assert got.train_flops == got.model_flops + got.structure_flops
  # one pass per step without the joint loss
  alternating = config.replace(consolidate_cut_joint=0.0)
  assert compute.train_compute(alternating, TINY).passes == 1000


def test_low_rank_and_sltrain_count_their_own_products():
  lowrank = TrainConfig(method="lowrank", method_options={"rank": "8"}, **BASE)
  assert compute.pass_flops_per_token(lowrank, TINY) == _hand_pass_flops_per_token(
      per_block=lambda m, n: 8 * (m + n))
  sltrain = TrainConfig(method="sltrain", method_options={"rank": "9"}, **BASE)
  got = compute.train_compute(sltrain, TINY)
  assert got.pass_flops_per_token == _hand_pass_flops_per_token()  # it multiplies by W
  blocks = 2 * (4 * 64 * 64 + 3 * 64 * 172)
  assert got.structure_flops == 1000 * 6 * 9 * blocks  # W = A B formed each pass


def test_matched_steps_spend_the_target_flops():
  salaad = presets.config_with_preset("recommended", **JOINT, **BASE)
  target = compute.train_compute(salaad, TINY).train_flops
  for config in (TrainConfig(method="dense", **BASE),
                 TrainConfig(method="sltrain", method_options={"rank": "9"}, **BASE),
                 salaad.replace(consolidate_cut_joint=0.0)):
    steps = compute.steps_for_flops(config, TINY, target)
    spent = compute.train_compute(config.replace(steps=steps), TINY).train_flops
    per_step = compute.train_compute(config.replace(steps=steps + 1), TINY).train_flops - spent
    assert abs(spent - target) <= per_step, config.method  # the closest step count
    assert 1.9 < steps / 1000 < 2.1  # about twice the joint run's steps
  assert compute.steps_for_flops(salaad, TINY, target) == 1000
  with pytest.raises(ValueError, match="positive"):
    compute.steps_for_flops(salaad, TINY, 0.0)
