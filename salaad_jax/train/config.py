"""``TrainConfig``: every setting of a pretraining run, as one JSON-able dataclass.

The fields are the flags of ``experiments/pretrain.py`` (see
:mod:`salaad_jax.train.flags`); each field's ``metadata`` holds its help text,
its allowed values (``choices``) or its lower bound (``min``). A run writes its
resolved config to ``<workdir>/config.json``; resuming a workdir requires the
fields that shape the computation (everything outside ``RESUMABLE_FIELDS``) to
match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

from salaad_jax import options
from salaad_jax.models.configs import CONFIGS


class TrainError(Exception):
  """A user-caused problem that stops a run: bad setting, data or workdir.

  ``str(error)`` is one line meant to be shown as it is.
  """


def _f(default, help: str, **meta):  # pylint: disable=redefined-builtin
  if isinstance(default, dict):
    return dataclasses.field(default_factory=lambda: dict(default),
                             metadata=dict(help=help, **meta))
  return dataclasses.field(default=default, metadata=dict(help=help, **meta))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a pretraining run (defaults: the 60M reference, SALAAD.md §7)."""

  # --- what is trained -----------------------------------------------------
  method: str = _f("salaad", "training method (a registered name; --helpfull lists them)")
  method_options: dict = _f({}, "method-specific options, key=value (see the method)")
  model: str = _f("60m", "model preset", choices=tuple(CONFIGS))
  dtype: str = _f("bfloat16", "compute dtype of activations and matmuls",
                  choices=("float32", "bfloat16", "float16"))
  param_dtype: str = _f("float32", "storage dtype of the parameters",
                        choices=("float32", "bfloat16"))
  vocab_size: int = _f(0, "model vocabulary; 0: the tokenizer's", min=0)
  seed: int = _f(0, "seed of the parameter initialisation")
  init_from: str = _f("", "workdir of a trained run whose final parameters start this "
                      "one (fine-tuning; same model and vocabulary); '': the initialiser")
  init_from_hf: str = _f("", "a Hugging Face LLaMA directory (config.json and safetensors "
                         "weights, e.g. one experiments.export wrote) whose weights start "
                         "this run (same model shape); '': the initialiser")

  # --- data ------------------------------------------------------------------
  source: str = _f("synthetic", "data: 'synthetic[:k=v,...]', 'tfds:<name>' (e.g. "
                   "tfds:c4/en), 'text:<path or glob>' or a path to text files")
  tokenizer: str = _f("byte", "'byte' or the path of a SentencePiece .model (T5: "
                      "the spiece.model of t5-base)")
  data_dir: str = _f("", "TFDS data directory ('' = the TFDS default)")
  train_split: str = _f("train", "split to train on")
  eval_split: str = _f("validation", "held-out split for evaluation")
  seq_len: int = _f(256, "tokens per sequence T", min=1)
  batch_size: int = _f(512, "global batch in sequences (over all devices and hosts)", min=1)
  grad_accum: int = _f(1, "micro-batches per step (gradient accumulation)", min=1)
  eval_batch_size: int = _f(0, "evaluation batch; 0: batch_size", min=0)
  data_seed: int = _f(0, "seed of the data order / synthetic sampling")

  # --- base optimiser (AdamW, clip, cosine schedule) -------------------------
  steps: int = _f(11000, "training steps", min=1)
  lr: float = _f(3e-3, "peak learning rate", min=0.0)
  warmup_steps: int = _f(2200, "linear warm-up steps", min=0)
  min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak", min=0.0)
  schedule: str = _f("cosine", "learning-rate schedule after warm-up",
                     choices=("cosine", "constant"))
  b1: float = _f(0.9, "AdamW beta1", min=0.0)
  b2: float = _f(0.95, "AdamW beta2", min=0.0)
  eps: float = _f(1e-8, "AdamW epsilon", min=0.0)
  weight_decay: float = _f(0.0, "AdamW decoupled weight decay", min=0.0)
  clip_norm: float = _f(1.0, "global-norm gradient clip; 0: off", min=0.0)

  # --- SALAAD (SALAAD.md §2-§5) ----------------------------------------------
  every_k: int = _f(10, "K: steps between ADMM rounds", min=1)
  rho: float = _f(1e-6, "rho: ADMM penalty of the attention/MLP blocks", min=0.0)
  rho_embed: float = _f(3e-7, "rho of the embedding and output head blocks", min=0.0)
  rank_target: float = _f(0.15, "r*: target rank rate of every L", min=0.0)
  density_target: float = _f(0.05, "d*: target density of every S", min=0.0)
  k_alpha: float = _f(0.2, "controller gain of alpha (rank)", min=0.0)
  k_beta: float = _f(0.002, "controller gain of beta (density)", min=0.0)
  k_d: float = _f(0.01, "one-sided derivative gain", min=0.0)
  k_d_embed: float = _f(1.0, "derivative gain for the embedding/head blocks", min=0.0)
  deriv_start: int = _f(1500, "n_d: ADMM rounds before the derivative term acts", min=0)
  energy: float = _f(0.999, "e: energy fraction of the effective rank", min=0.0)
  salaad_mode: str = _f("adaptive", "controller mode",
                        choices=("adaptive", "fixed", "hard_cut"))
  sparse_mode: str = _f("soft", "sparse prox: soft, topk, rows, cols or N:M (e.g. 2:4)")
  svt: str = _f("fast", "singular value thresholding", choices=("fast", "exact"))
  svt_iters: int = _f(1, "subspace iterations per ADMM round (fast SVT)", min=1)
  init_iters: int = _f(4, "subspace iterations of the initial SVD (fast SVT)", min=1)
  max_rank: int = _f(0, "bound on the factor rank of L; 0: automatic", min=0)
  alpha_init: str = _f("zero", "alpha_0: 'zero', 'sigma_k' or a number")
  beta_init: float = _f(0.0, "beta_0", min=0.0)
  include_embedding: bool = _f(False, "make the token embedding a SALAAD block")
  include_head: bool = _f(False, "make the output head a SALAAD block")
  state_dtype: str = _f("float32", "storage dtype of S", choices=("float32", "bfloat16"))
  dual_dtype: str = _f("float32", "storage dtype of the scaled dual U",
                       choices=("float32", "bfloat16"))
  sparse_capacity: str = _f("auto", "storage of S: 'auto' (values + int32 indices of at "
                            "most 3 d* of each block's entries), a fraction in (0, 1] "
                            "(that capacity) or 'none' (dense in the param's shape)")
  coupling: str = _f("coupled", "coupled (penalty gradient before AdamW) or decoupled",
                     choices=("coupled", "decoupled"))
  salaad_preset: str = _f("", "named SALAAD settings applied before the explicit flags "
                          "(explicit flags win): '', reference or recommended (salaad_jax.train.presets)")
  deploy_budgets: str = _f("0.4,0.5,0.6", "the deployment budgets (comma-separated fractions "
                           "of the dense model's bytes) --salaad_preset=recommended sizes the "
                           "run for: its structure fills the largest, the others are trained "
                           "cuts")
  target_schedule_end: float = _f(0.0, "targets start loose (r*, d* at 1) and reach r*, d* "
                                  "along a cubic schedule at this fraction of --steps; "
                                  "0: constant targets", min=0.0)
  rho_mode: str = _f("fixed", "rho over training: fixed, shape_dependent (rho_i = 1 / "
                     "(n_blocks sqrt(m n))), tanh (ramp to --rho_ramp_factor x rho)",
                     choices=("fixed", "shape_dependent", "tanh"))
  rho_ramp_center: float = _f(0.5, "tanh rho mode: centre of the ramp, fraction of --steps",
                              min=0.0)
  rho_ramp_width: float = _f(0.1, "tanh rho mode: width of the ramp, fraction of --steps",
                             min=0.0)
  rho_ramp_factor: float = _f(10.0, "tanh rho mode: final rho / initial rho", min=0.0)
  consolidate_from: float = _f(0.0, "from this fraction of --steps on, train the surrogate "
                               "L + S itself at a fixed structure; 0: off", min=0.0)
  consolidate_dropout: float = _f(0.0, "consolidation with nested dropout: each step the "
                                  "model drops a random share in [0, p) of every block's "
                                  "trailing singular triplets and smallest S entries; 0: off",
                                  min=0.0)
  consolidate_structure: str = _f("target", "consolidated structure: target (rank "
                                  "ceil(r* min(m,n)), the d* largest entries) or current "
                                  "(the controller's)", choices=("target", "current"))
  consolidate_support: str = _f("largest", "consolidated structure 'target': S's support, "
                                "the d* largest |X - L| entries (largest) or d* m n entries "
                                "drawn at random (random: a control)",
                                choices=("largest", "random"))
  consolidate_params: str = _f("projection", "how consolidation trains L + S: projection (a "
                               "dense AdamW step, then the projection onto the structure) "
                               "or factors (L's factors and S's values trained directly, "
                               "with their own AdamW moments; coupled only)",
                               choices=("projection", "factors"))
  consolidate_factor_lr: float = _f(1.0, "consolidation in factors: the factors' learning "
                                    "rate as a multiple of the run's (S's values keep the "
                                    "run's); 1: the same; unused with projection", min=0.0)
  consolidate_global_dropout: float = _f(0.0, "consolidation in factors with nested dropout: "
                                         "each step trains the global allocator's cut of L + S "
                                         "to a random share 1 - q, q ~ U(0, p), of its "
                                         "parameters; 0: off", min=0.0)
  consolidate_cut_budgets: str = _f("", "consolidation in factors trained at its deployments: "
                                    "comma-separated fractions of the dense model's bytes "
                                    "(bf16 values, S as a bitmap); each step trains the "
                                    "global allocator's cut of L + S to one of them, drawn "
                                    "uniformly (a budget the whole structure fits in trains "
                                    "all of it); empty: off")
  consolidate_cut_bitmaps: bool = _f(False, "--consolidate_cut_budgets: price each block's "
                                     "bitmap as a fixed cost of its S, as the deployment's "
                                     "allocator does (the cut is then exactly the "
                                     "deployment's); false: every block's bitmap counted as "
                                     "kept (measured better, benchmarks/RESULTS.md)")
  consolidate_cut_jitter: float = _f(0.0, "--consolidate_cut_budgets: each drawn budget "
                                     "below 1 moves by U(-j, j) (fractions of the dense size), "
                                     "so the cuts around it are trained; 0: off", min=0.0)
  consolidate_cut_joint: float = _f(0.0, "--consolidate_cut_budgets: every step's loss is "
                                    "(1 - w) the whole structure's plus w one cut's (drawn "
                                    "among the budgets below 1; two passes per step) "
                                    "instead of the steps alternating between them; unused "
                                    "without cut budgets; 0: off",
                                    min=0.0)

  # --- devices -----------------------------------------------------------------
  parallelism: str = _f("jit", "jit (NamedSharding over a mesh) or pmap",
                        choices=("jit", "pmap"))
  mesh_data: int = _f(-1, "devices on the 'data' mesh axis; -1: the rest", min=-1)
  mesh_fsdp: int = _f(1, "devices on the 'fsdp' axis (params and optimizer state "
                      "sharded over it); -1: the rest", min=-1)
  distributed: bool = _f(False, "call jax.distributed.initialize() (multi-host: every "
                         "process runs the same command)")
  coordinator_address: str = _f("", "with --distributed: host:port of process 0's "
                                "coordinator; '': JAX_COORDINATOR_ADDRESS or the cluster's")
  num_processes: int = _f(0, "with --distributed: processes in the job; 0: the cluster's",
                          min=0)
  process_id: int = _f(-1, "with --distributed: this process's index in [0, "
                       "num_processes); -1: the cluster's", min=-1)

  # --- loop, logging, checkpoints ---------------------------------------------
  log_every: int = _f(50, "steps between progress lines / metric records", min=1)
  eval_every: int = _f(1000, "steps between evaluations; 0: only at the end", min=0)
  eval_batches: int = _f(20, "batches per evaluation", min=1)
  checkpoint_every: int = _f(1000, "steps between checkpoints; 0: only at the end", min=0)
  keep_checkpoints: int = _f(3, "checkpoints kept (the latest ones)", min=1)
  async_checkpoint: bool = _f(True, "write checkpoints in the background")
  tensorboard: bool = _f(True, "also write TensorBoard events when a writer is installed")
  stop_after: int = _f(0, "debug: checkpoint and stop after this step, as if "
                       "interrupted; 0: off", min=0)

  # ------------------------------------------------------------------------
  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise TrainError(f"unknown TrainConfig field(s) {unknown}")
    return cls(**dict(d))

  @classmethod
  def from_json(cls, text: str) -> "TrainConfig":
    return cls.from_dict(json.loads(text))

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)


# Fields that may differ when a workdir is resumed: they do not change the
# computed trajectory (or, for `steps`, extend it on purpose).
RESUMABLE_FIELDS = frozenset({
    "steps", "stop_after", "log_every", "eval_every", "eval_batches",
    "eval_batch_size", "checkpoint_every", "keep_checkpoints", "async_checkpoint",
    "tensorboard", "parallelism", "mesh_data", "mesh_fsdp", "distributed",
    "coordinator_address", "num_processes", "process_id", "data_dir",
    "deploy_budgets",  # shapes a run only through the preset fields it sets
})

_UNIT_INTERVAL = ("rank_target", "density_target", "energy", "b1", "b2")


def validate(config: TrainConfig) -> TrainConfig:
  """Checks every field against its metadata and the cross-field rules.

  Raises:
    TrainError naming the offending flag.
  """
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
      raise TrainError(f"--{f.name}={value!r} is not one of {list(choices)}")
    low = f.metadata.get("min")
    if low is not None:
      if isinstance(value, float) and not math.isfinite(value):
        raise TrainError(f"--{f.name}={value} must be finite")
      if value < low:
        raise TrainError(f"--{f.name}={value} must be >= {low}")
  for name in _UNIT_INTERVAL:
    value = getattr(config, name)
    if not 0.0 < value <= 1.0 or (name in ("b1", "b2") and value >= 1.0):
      raise TrainError(f"--{name}={value} must lie in (0, 1)")
  if config.mesh_data == 0 or config.mesh_fsdp == 0:
    raise TrainError("--mesh_data and --mesh_fsdp must be >= 1 or -1 (the rest)")
  if config.warmup_steps > config.steps:
    raise TrainError(f"--warmup_steps={config.warmup_steps} exceeds --steps={config.steps}")
  if config.batch_size % config.grad_accum:
    raise TrainError(f"--batch_size={config.batch_size} is not divisible by "
                     f"--grad_accum={config.grad_accum}")
  if config.alpha_init not in ("zero", "sigma_k"):
    try:
      float(config.alpha_init)
    except ValueError:
      raise TrainError(f"--alpha_init={config.alpha_init!r} must be 'zero', "
                       "'sigma_k' or a number") from None
  if config.sparse_capacity not in ("auto", "none"):
    try:
      ok = 0.0 < float(config.sparse_capacity) <= 1.0
    except ValueError:
      ok = False
    if not ok:
      raise TrainError(f"--sparse_capacity={config.sparse_capacity!r} must be 'auto', "
                       "'none' or a fraction in (0, 1]")
  for name in ("target_schedule_end", "consolidate_from", "rho_ramp_center",
               "consolidate_dropout", "consolidate_global_dropout", "consolidate_cut_jitter",
               "consolidate_cut_joint"):
    if getattr(config, name) >= 1.0:
      raise TrainError(f"--{name}={getattr(config, name)} must lie in [0, 1)")
  if config.consolidate_factor_lr <= 0:
    raise TrainError(f"--consolidate_factor_lr={config.consolidate_factor_lr} must be > 0")
  _check_consolidation(config)
  if config.rho_mode == "tanh" and not (config.rho_ramp_width > 0 and config.rho_ramp_factor > 0):
    raise TrainError("--rho_mode=tanh needs --rho_ramp_width > 0 and --rho_ramp_factor > 0")
  if not isinstance(config.method_options, dict):
    raise TrainError("method_options must be a dict")
  if config.init_from and config.init_from_hf:
    raise TrainError("give one starting point: --init_from or --init_from_hf, not both")
  return config


def starts_pretrained(config: TrainConfig) -> bool:
  """Whether the run starts from trained weights (--init_from or --init_from_hf)."""
  return bool(config.init_from or config.init_from_hf)


def _check_consolidation(config: TrainConfig) -> None:
  """The consolidation flags together, by the transform's own rules
  (``options.parse_consolidation``).  They act only while consolidation is
  on (a preset may set them; --consolidate_from=0 switches it off whatever
  they say), and as the transform is given them (``methods.salaad_kwargs``:
  the factors' learning rate only in factors, jitter and the joint loss only
  with cut budgets)."""
  budgets = cut_budgets(config)
  if config.consolidate_from <= 0:
    return
  factors = config.consolidate_params == "factors"
  try:
    options.parse_consolidation(
        coupled=config.coupling == "coupled", seed=config.seed,
        consolidate_from=int(round(config.consolidate_from * config.steps)),
        consolidate_structure=config.consolidate_structure,
        consolidate_support=config.consolidate_support,
        consolidate_dropout=config.consolidate_dropout,
        consolidate_params=config.consolidate_params,
        consolidate_factor_lr=config.consolidate_factor_lr if factors else 1.0,
        consolidate_global_dropout=config.consolidate_global_dropout,
        consolidate_cut_budgets=budgets, consolidate_cut_overhead=0.0,
        consolidate_cut_jitter=config.consolidate_cut_jitter if budgets else 0.0,
        consolidate_cut_joint=config.consolidate_cut_joint if budgets else 0.0)
  except ValueError as e:  # the options are the flags of the same names
    raise TrainError(re.sub(r"\b(consolidate_\w+)", r"--\1", str(e))) from None


def sparse_capacity_value(config: TrainConfig):
  """``sparse_capacity`` as the transform takes it: 'auto', a float or None."""
  value = config.sparse_capacity
  if value == "auto":
    return value
  if value == "none":
    return None
  return float(value)


def alpha_init_value(config: TrainConfig):
  """``alpha_init`` as the transform takes it: 'zero', 'sigma_k' or a float."""
  if config.alpha_init in ("zero", "sigma_k"):
    return config.alpha_init
  return float(config.alpha_init)


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def read_config(workdir: str) -> TrainConfig:
  """The config saved in ``workdir``; TrainError when there is none or it is corrupt."""
  path = config_path(workdir)
  if not os.path.exists(path):
    raise TrainError(f"{workdir!r} holds no run: {path} does not exist")
  try:
    with open(path) as fh:
      saved = json.loads(fh.read())
    if isinstance(saved, dict):  # written before S could be stored compactly: S is dense
      saved.setdefault("sparse_capacity", "none")
    return TrainConfig.from_dict(saved)
  except (json.JSONDecodeError, TypeError) as e:
    raise TrainError(f"{path} is not a valid TrainConfig: {e}") from None


def fractions(text: str, flag: str) -> tuple[float, ...]:
  """Comma-separated fractions in (0, 1] (TrainError naming ``flag`` otherwise)."""
  try:
    values = tuple(float(b) for b in text.split(","))
  except ValueError:
    values = ()
  if not values or not all(0.0 < b <= 1.0 for b in values):
    raise TrainError(f"--{flag}={text!r} must be comma-separated fractions "
                     "in (0, 1] of the dense model's bytes")
  return values


def cut_budgets(config: TrainConfig) -> tuple[float, ...]:
  """``--consolidate_cut_budgets`` as floats in (0, 1] (TrainError otherwise)."""
  text = config.consolidate_cut_budgets.strip()
  return fractions(text, "consolidate_cut_budgets") if text else ()


def config_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
  """'field: saved -> new' for every field outside RESUMABLE_FIELDS that differs."""
  out = []
  for f in dataclasses.fields(TrainConfig):
    a, b = getattr(saved, f.name), getattr(new, f.name)
    if f.name not in RESUMABLE_FIELDS and a != b:
      out.append(f"{f.name}: {a!r} -> {b!r}")
  return out


def write_config(workdir: str, config: TrainConfig) -> None:
  """Writes ``config.json`` atomically (temp file + rename)."""
  path = config_path(workdir)
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    fh.write(config.to_json() + "\n")
  os.replace(tmp, path)
