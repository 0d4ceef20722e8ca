"""Starting a run from trained weights: another run's (``--init_from``) or a
Hugging Face LLaMA checkpoint's (``--init_from_hf``, read by
``salaad_jax.deploy.hf.import_hf``).

The run in ``init_from`` (any workdir of ``train_and_evaluate`` whose model
is a dense Llama: dense, salaad, galore or a fine-tuning method) is restored
and reduced to the Llama params it applies; the new run starts from those
(``Method.from_pretrained`` maps them to what the method trains, e.g.
frozen base plus LoRA adapters).  The new run's own checkpoints make it
resumable as usual, and a resumed or loaded run reads its shapes from its
own checkpoint (the ``init_from`` run is then not needed).  A Hugging Face
checkpoint must have this run's model shape (vocabulary, widths, heads,
layers, tied head); its weights are cast to the run's parameter dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np

from salaad_jax.models import Llama, LlamaConfig
from salaad_jax.train.checkpoint import UnreadableCheckpointError
from salaad_jax.train.config import TrainConfig, TrainError, starts_pretrained
from salaad_jax.train.methods import Method
from salaad_jax.train.run import load_run
from salaad_jax.train.state import applied_params

Params = Any


def _check_compatible(source: TrainConfig, params: Params, model_config: LlamaConfig,
                      workdir: str) -> None:
  expected = jax.eval_shape(
      lambda: Llama(model_config).init(jax.random.key(0), np.zeros((1, 1), np.int32)))["params"]
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  if jax.tree.structure(expected) != jax.tree.structure(got) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got))):
    raise TrainError(
        f"--init_from={workdir}: its model (--model={source.model}, vocab_size "
        f"{source.vocab_size}) has other parameter shapes than this run's (vocab_size "
        f"{model_config.vocab_size}); fine-tune with the same --model and tokenizer")


def pretrained_params(workdir: str, model_config: LlamaConfig) -> Params:
  """The dense Llama params of the latest checkpoint in ``workdir``.

  Raises:
    TrainError: no run there, or a model that is not this dense Llama.
  """
  try:
    run = load_run(workdir)
  except UnreadableCheckpointError as e:
    raise TrainError(f"--init_from={workdir}: {e}; to start from an earlier step, rename "
                     "the unreadable one (e.g. to <step>.corrupt)") from None
  except TrainError as e:
    raise TrainError(f"--init_from={workdir}: {e}") from None
  if run.method.dense_cls is not None:
    raise TrainError(f"--init_from={workdir}: a {run.config.method!r} run trains "
                     "structured projections, not a dense Llama; start from a dense, "
                     "salaad or galore run")
  params = applied_params(run.config, run.method, run.params)
  _check_compatible(run.config, params, model_config, workdir)
  return params


def hf_params(directory: str, model_config: LlamaConfig) -> Params:
  """The Llama params of a Hugging Face LLaMA directory of this model's
  shape, in the run's parameter dtype; TrainError otherwise."""
  from salaad_jax.deploy.hf import HFError, import_hf  # pylint: disable=import-outside-toplevel
  try:
    _, params = import_hf(directory, model_config)
  except (HFError, ImportError) as e:
    raise TrainError(f"--init_from_hf={directory}: {e}") from None
  return jax.tree.map(lambda x: jax.numpy.asarray(x, model_config.param_dtype), params)


def initial_params(config: TrainConfig, method: Method, model_config: LlamaConfig,
                   next_batch: Callable[[], dict], saved: Optional[Params] = None
                   ) -> Optional[Params]:
  """The starting ``TrainState.params`` of ``config``: None for a run from
  the initialiser, else built from the ``--init_from`` run or the
  ``--init_from_hf`` checkpoint.  ``saved``: the
  abstract params of the run's own checkpoint, when it has one
  (``checkpoint.saved_params``); a resumed run takes its shapes from there,
  without the ``--init_from`` run.

  Raises:
    TrainError: a fine-tuning method without ``--init_from``, or a bad one.
  """
  if not starts_pretrained(config):
    if method.from_pretrained is not None:
      raise TrainError(f"--method={method.name} fine-tunes a trained model: give "
                       "--init_from=<workdir of a dense or salaad run> or "
                       "--init_from_hf=<Hugging Face LLaMA directory>")
    return None
  if saved is not None:
    return saved
  if config.init_from_hf:
    params = hf_params(config.init_from_hf, model_config)
  else:
    params = pretrained_params(config.init_from, model_config)
  if method.from_pretrained is None:
    return params
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  return method.from_pretrained(config, params, rng, next_batch)


def calibration_batches(make_dataset: Callable[[], Any]) -> Callable[[], dict]:
  """``next_batch()`` over a dataset made on the first call (so runs that
  need no calibration build none)."""
  holder: list = []

  def next_batch() -> dict:
    if not holder:
      holder.append(make_dataset())
    return next(holder[0])

  return next_batch
