"""The dense weights a trained run deploys at a budget, for any method.

* A SALAAD run at a budget below 100 %: per block X_hat_i = L_i,r + S_i,nnz
  of the allocation (``allocate`` then ``dense_reconstruction``, SALAAD.md
  §6); every other parameter as trained.  At 100 % (``budget=1.0``): its
  trained weights X.
* A run of fixed size (dense, GaLore, low-rank, SLTrain, LOST, the
  fine-tuning methods): the dense Llama computing the same function (the
  baselines' ``MethodSpec.to_dense``, the fine-tuning methods' merged
  weights); only ``budget=1.0`` is meaningful.

The result is a plain ``Llama(config)`` params tree, what
``hf.export_hf`` writes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from salaad_jax import stats
from salaad_jax.deploy import accounting as acc
from salaad_jax.deploy.allocation import allocate
from salaad_jax.deploy.compress import dense_reconstruction
from salaad_jax.deploy.spectra import spectra
from salaad_jax.models.configs import LlamaConfig


class DeployError(ValueError):
  """A user-caused problem (no run, bad budget, ...); one line of text."""


@dataclasses.dataclass(frozen=True)
class Deployed:
  """A run's deployed model.

  Attributes:
    config: its LlamaConfig (the run's, with its compute and param dtypes).
    params: the dense Llama params tree.
    info: JSON-able facts: run method, step, workdir, budget, allocation
      method, params and bytes of the deployment (for SALAAD budgets), tokenizer.
    tokenizer: the run's tokenizer spec ('byte' or a .model path).
  """

  config: LlamaConfig
  params: Any
  info: dict
  tokenizer: str


def _load(workdir: str, step: Optional[int]):
  from salaad_jax.train import TrainError, load_run  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(workdir):
    raise DeployError(f"workdir '{workdir}' does not exist")
  try:
    return load_run(workdir, step)
  except TrainError as e:
    raise DeployError(f"workdir '{workdir}': {e}") from None


def _is_salaad(run) -> bool:
  try:
    stats.find_state(run.opt_state)
    return True
  except ValueError:
    return False


def fixed_size_params(run):
  """The dense Llama params of a run that is not deployed at a budget."""
  from salaad_jax.train.state import model_variables  # pylint: disable=import-outside-toplevel
  if run.method.dense_cls is not None:  # structured baselines: their own dense form
    from salaad_jax.baselines.harness import spec_for  # pylint: disable=import-outside-toplevel
    return spec_for(run.config).to_dense(model_variables(run.params))
  return run.llama_params


def deployed(run_or_workdir, budget=1.0, *, unit: str = "params", method: str = "global",
             fmt: str = "coo", dtype="bfloat16", gamma: float = 0.5,
             step: Optional[int] = None) -> Deployed:
  """The dense weights of a run deployed at ``budget``.

  Args:
    run_or_workdir: a ``salaad_jax.train.Run`` or a run's workdir.
    budget: 1.0 (the whole model), or for a SALAAD run a fraction in (0, 1)
      of the dense parameters / bytes, or an absolute count (int).
    unit: 'params' or 'bytes' (bytes stored as ``fmt`` in ``dtype``).
    method: allocation method, 'global' or 'hpa' ('hpa': parameters only).
    fmt, dtype: the storage that prices a byte budget.
    gamma: HPA's low-rank share of the cut.
    step: checkpoint step (default: the latest).

  Raises:
    DeployError: no run, a bad budget (below what the parameters outside the
      blocks take, above 100 %), a budget below 100 % for a run of fixed size.
  """
  if isinstance(run_or_workdir, (str, os.PathLike)):
    workdir = os.path.abspath(os.fspath(run_or_workdir))
    run = _load(workdir, step)
  else:
    run, workdir = run_or_workdir, ""
  info: dict[str, Any] = dict(run_method=run.config.method, step=int(run.step),
                              workdir=workdir, budget=budget, unit=unit)
  whole = isinstance(budget, float) and budget == 1.0
  if not _is_salaad(run):
    if not whole:
      raise DeployError(f"a {run.config.method!r} run has a fixed size and no L + S to cut; "
                        "export it whole with budget 1.0 (--budget=1)")
    return Deployed(run.model_config, fixed_size_params(run), info, run.config.tokenizer)
  if whole:
    return Deployed(run.model_config, run.params, dict(info, allocation=None),
                    run.config.tokenizer)
  try:
    blocks = spectra(run.params, run.opt_state)
    alloc = allocate(blocks, budget, method, gamma=gamma, unit=unit, fmt=fmt, dtype=dtype)
    counts = acc.account(run.params, alloc, alloc.fmt or fmt, dtype)
  except ValueError as e:
    raise DeployError(str(e)) from None
  info.update(allocation=method, fmt=alloc.fmt or fmt, dtype=acc.dtype_name(dtype),
              params=counts["params"], bytes=counts["bytes"],
              params_fraction=counts["params_fraction"],
              bytes_fraction=counts["bytes_fraction"],
              ranks=dict(alloc.ranks), nnz=dict(alloc.nnz))
  return Deployed(run.model_config, dense_reconstruction(run.params, blocks, alloc), info,
                  run.config.tokenizer)
