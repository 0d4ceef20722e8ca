"""consolidation: the projection and factor steps, on the golden cases' model."""

import jax
import numpy as np
import optax

import golden_cases as gc
import salaad_jax as sj


def test_factors_keep_the_current_structure():
  """consolidate_structure='current' with factors: the first projection keeps
  the controller's rank and S's support, and the factor steps never leave
  them (L's rank at most that, S on that support, U zero)."""
  tx = sj.salaad(gc.adam(), consolidate_params="factors", consolidate_structure="current",
                 **gc.CONSOLIDATE)
  before = gc.run_transform(tx, gc.CONSOLIDATE_FROM)
  after = gc.run_transform(tx, 4, start=before)
  rank = lambda state: {p: int(np.sum(np.asarray(f.s) > 0))
                        for p, f in sj.low_rank_factors(state).items()}
  support = lambda state: {p: np.asarray(s) != 0 for p, s in sj.sparse_parts(state).items()}
  kept, omega = rank(before[1]), support(before[1])
  assert int(after[1].count) == gc.CONSOLIDATE_FROM + 4
  assert all(kept[p] > 0 for p in kept) and any(o.any() for o in omega.values())
  for p, r in rank(after[1]).items():
    assert 0 < r <= kept[p], (p, r, kept[p])
  for p, o in support(after[1]).items():
    assert not np.any(o & ~omega[p]), p
  for dual in jax.tree.leaves(after[1].dual):
    assert not np.any(np.asarray(dual))
  # the params are the surrogate L + S
  x_hat = sj.surrogate_params(after[0], after[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               after[0], x_hat)
