"""Pretraining harness: config, method registry, sharded jit/pmap steps, Orbax
checkpoints with exact resume, metrics, and ``train_and_evaluate``.

    from salaad_jax.train import TrainConfig, train_and_evaluate, load_run
    metrics = train_and_evaluate(TrainConfig(model="tiny", ...), "/tmp/run")
    run = load_run("/tmp/run")        # .config .model .params .opt_state .step
"""

from salaad_jax.train.checkpoint import Checkpointer
from salaad_jax.train.config import RESUMABLE_FIELDS, TrainConfig, TrainError, read_config
from salaad_jax.train.evaluation import evaluate
from salaad_jax.train.executors import JitExecutor, PmapExecutor, make_executor
from salaad_jax.train.inputs import make_eval_dataset, make_train_dataset
from salaad_jax.train.loop import NonFiniteLossError, train_and_evaluate
from salaad_jax.train.methods import (Method, get_method, method_names, method_options,
                                      register_method)
from salaad_jax.train.optim import base_optimizer, make_schedule
from salaad_jax.train.run import Run, load_run
from salaad_jax.train.state import TrainState, build, build_model, init_state
from salaad_jax.train.steps import train_step

__all__ = [
    "Checkpointer", "JitExecutor", "Method", "NonFiniteLossError", "PmapExecutor",
    "RESUMABLE_FIELDS", "Run", "TrainConfig", "TrainError", "TrainState", "base_optimizer",
    "build", "build_model", "evaluate", "get_method", "init_state", "load_run",
    "make_eval_dataset", "make_executor", "make_schedule", "make_train_dataset",
    "method_names", "method_options", "read_config", "register_method",
    "train_and_evaluate", "train_step",
]
