"""cut_schedule.CutSchedule: which cut each factor step trains."""

import numpy as np

from salaad_jax.cut_schedule import CutSchedule

TOTAL, OUTSIDE = 1000, 100  # a model's parameters, those outside the blocks


def _keeps(schedule, counts=range(60), whole=False):
  return [float(schedule.keep(c, TOTAL, OUTSIDE, whole)) for c in counts]


def test_budget_draws_depend_on_the_seed_and_the_count_only():
  budgets = (0.3, 0.6, 1.0)
  keeps = _keeps(CutSchedule(seed=3, budgets=budgets))
  # A resumed run rebuilds the schedule: the same draws at the same counts.
  assert keeps == _keeps(CutSchedule(seed=3, budgets=budgets))
  assert keeps[20:] == _keeps(CutSchedule(seed=3, budgets=budgets), range(20, 60))
  # b total - outside for every budget, each drawn.
  np.testing.assert_allclose(sorted(set(np.round(keeps, 3))), [200.0, 500.0, 900.0])
  assert keeps != _keeps(CutSchedule(seed=4, budgets=budgets))


def test_the_whole_structure_is_kept_when_asked():
  assert _keeps(CutSchedule(seed=0, budgets=(0.3, 1.0)), range(5), whole=True) == [np.inf] * 5
  schedule = CutSchedule(seed=0, global_dropout=0.5)
  assert [float(schedule.drop(c, True)) for c in range(5)] == [0.0] * 5
  drops = [float(schedule.drop(c, False)) for c in range(200)]
  assert 0.0 <= min(drops) and max(drops) <= 0.5 and max(drops) > 0.4


def test_jitter_moves_the_budgets_below_one_only():
  j = 0.05
  keeps = _keeps(CutSchedule(seed=1, budgets=(0.4, 1.0), jitter=j), range(200))
  whole = [k for k in keeps if k == TOTAL - OUTSIDE]
  cut = [(k + OUTSIDE) / TOTAL for k in keeps if k != TOTAL - OUTSIDE]
  assert whole and cut
  assert min(cut) >= 0.4 - j - 1e-6 and max(cut) <= 0.4 + j + 1e-6
  assert max(cut) - min(cut) > j  # it does move them


def test_the_joint_loss_draws_among_the_budgets_below_one():
  schedule = CutSchedule(seed=2, budgets=(0.3, 0.5, 1.0), joint=0.5)
  assert schedule.drawn_budgets == (0.3, 0.5)
  fractions = {round((k + OUTSIDE) / TOTAL, 3) for k in _keeps(schedule)}
  assert fractions == {0.3, 0.5}


def test_no_cut_without_cut_options():
  assert not CutSchedule(seed=0).active
  assert CutSchedule(seed=0).cuts({}, {}, 3, TOTAL, OUTSIDE, False) is None
