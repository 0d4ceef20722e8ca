"""Our Llama as a Hugging Face ``LlamaForCausalLM`` directory, and back.

``export_hf(path, params, config)`` writes what
``transformers.LlamaForCausalLM.from_pretrained(path)`` loads with no custom
code:

    config.json              LlamaConfig: sizes, rope theta, norm epsilon,
                             tied embeddings, vocabulary, dtype
    model.safetensors        the weights (``safetensors``), or above
                             ``max_shard_bytes`` model-0000i-of-0000N.safetensors
                             plus model.safetensors.index.json
    generation_config.json   eos / pad ids
    tokenizer files          (``salaad_jax.deploy.hf_tokenizer``), when a
                             tokenizer is given
    salaad_export.json       where the weights came from (run, budget, ...)

The layout map, per decoder layer i (kernels are stored (in, out) here and
(out, in) as ``nn.Linear.weight`` there, so every projection is transposed):

    embed/embedding              model.embed_tokens.weight       (V, d)
    layers_i/attn_norm/scale     model.layers.i.input_layernorm.weight
    layers_i/mlp_norm/scale      model.layers.i.post_attention_layernorm.weight
    layers_i/attn/{q,k,v,o}_proj/kernel^T
                                 model.layers.i.self_attn.{q,k,v,o}_proj.weight
    layers_i/mlp/{gate,up,down}_proj/kernel^T
                                 model.layers.i.mlp.{gate,up,down}_proj.weight
    final_norm/scale             model.norm.weight
    lm_head/kernel^T             lm_head.weight (absent when tied)

Rotary layout: ``apply_rotary`` rotates the channel pairs (i, i + d_h/2) of
every head, Hugging Face's ``rotate_half`` convention, so the q and k rows
map as they are.  A model whose pairs were interleaved, (2i, 2i + 1), would
need every head's output rows of q_proj and k_proj permuted to
[0, 2, 4, ..., 1, 3, 5, ...] (``rotary_rows``); ``ROTARY_LAYOUT`` names ours.

Both RMSNorms compute x / sqrt(mean(x^2) + eps) * weight in float32, the
attention scale is 1 / sqrt(d_h) in both, and there are no biases.  No
grouped-query attention (num_key_value_heads = num_attention_heads).

``import_hf(path)`` reads such a directory (ours or any Hugging Face
LLaMA checkpoint of a shape our Llama has) back into (LlamaConfig, params).
Exporting needs ``safetensors`` (and ``transformers`` plus ``tokenizers``
for the byte tokenizer's files); loading the result needs ``torch`` and
``transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import numpy as np

from salaad_jax.models.configs import LlamaConfig

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
PROVENANCE = "salaad_export.json"
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# Our apply_rotary rotates (x[i], x[i + d_h / 2]): Hugging Face's rotate_half.
ROTARY_LAYOUT = "half"
ROTARY_LAYOUTS = ("half", "interleaved")

_PROJ = {"attn": ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
         "mlp": ("mlp", ("gate_proj", "up_proj", "down_proj"))}
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


class HFError(ValueError):
  """A user-caused problem with an export or an import; one line of text."""


# ---------------------------------------------------------------------------
# The layout map.
# ---------------------------------------------------------------------------


def rotary_rows(head_dim: int, layout: str) -> np.ndarray:
  """The order of one head's q/k output rows in Hugging Face's layout: the
  identity for 'half' (ours), [0, 2, ..., 1, 3, ...] for interleaved pairs."""
  if layout == "half":
    return np.arange(head_dim)
  if layout == "interleaved":
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
  raise HFError(f"unknown rotary layout {layout!r}; one of {list(ROTARY_LAYOUTS)}")


def _permute_heads(weight: np.ndarray, n_heads: int, order: np.ndarray) -> np.ndarray:
  """``weight`` (out, in) with each head's block of output rows reordered."""
  out, inp = weight.shape
  return weight.reshape(n_heads, out // n_heads, inp)[:, order].reshape(out, inp)


def to_hf_tensors(params: Mapping, config: LlamaConfig, *,
                  rotary_layout: Optional[str] = None) -> dict[str, np.ndarray]:
  """{Hugging Face name: array} of a dense Llama params tree (the map above).

  ``rotary_layout``: the layout of ``params``' q/k rows (default: ours).
  Raises HFError when ``params`` is not the plain Llama(config) tree.
  """
  layout = ROTARY_LAYOUT if rotary_layout is None else rotary_layout
  order = rotary_rows(config.head_dim, layout)
  _check_tree(params, config)
  p = params
  get = lambda *keys: np.asarray(_at(p, keys))
  out = {"model.embed_tokens.weight": get("embed", "embedding"),
         "model.norm.weight": get("final_norm", "scale")}
  for i in range(config.n_layers):
    layer = f"layers_{i}"
    for ours, theirs in _NORMS.items():
      out[f"model.layers.{i}.{theirs}.weight"] = get(layer, ours, "scale")
    for module, (hf_module, names) in _PROJ.items():
      for name in names:
        w = get(layer, module, name, "kernel").T
        if name in ("q_proj", "k_proj"):
          w = _permute_heads(w, config.n_heads, order)
        out[f"model.layers.{i}.{hf_module}.{name}.weight"] = w
  if not config.tie_embeddings:
    out["lm_head.weight"] = get("lm_head", "kernel").T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_tensors(tensors: Mapping[str, np.ndarray], config: LlamaConfig, *,
                    rotary_layout: Optional[str] = None) -> dict:
  """The Llama(config) params tree of Hugging Face tensors (the inverse of
  ``to_hf_tensors``).  Raises HFError on a missing, extra or misshapen
  tensor."""
  layout = ROTARY_LAYOUT if rotary_layout is None else rotary_layout
  inverse = np.argsort(rotary_rows(config.head_dim, layout))
  expected = _hf_shapes(config)
  names = set(tensors)
  if config.tie_embeddings:
    names.discard("lm_head.weight")  # some checkpoints store the tied copy
  missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
  if missing or extra:
    raise HFError(f"the checkpoint's tensors do not match a {_describe(config)} Llama: "
                  f"missing {missing[:4]}, unexpected {extra[:4]}")
  for name, shape in expected.items():
    got = tuple(np.shape(tensors[name]))
    if got != shape:
      raise HFError(f"tensor {name} has shape {got}, expected {shape} for a "
                    f"{_describe(config)} Llama")
  t = lambda name: np.asarray(tensors[name])
  params: dict[str, Any] = {"embed": {"embedding": t("model.embed_tokens.weight")},
                            "final_norm": {"scale": t("model.norm.weight")}}
  for i in range(config.n_layers):
    layer: dict[str, Any] = {}
    for ours, theirs in _NORMS.items():
      layer[ours] = {"scale": t(f"model.layers.{i}.{theirs}.weight")}
    for module, (hf_module, names) in _PROJ.items():
      layer[module] = {}
      for name in names:
        w = t(f"model.layers.{i}.{hf_module}.{name}.weight")
        if name in ("q_proj", "k_proj"):
          w = _permute_heads(w, config.n_heads, inverse)
        layer[module][name] = {"kernel": np.ascontiguousarray(w.T)}
    params[f"layers_{i}"] = layer
  if not config.tie_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(t("lm_head.weight").T)}
  return params


def _hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  v, d, f = config.vocab_size, config.d_model, config.d_ff
  out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  for i in range(config.n_layers):
    for theirs in _NORMS.values():
      out[f"model.layers.{i}.{theirs}.weight"] = (d,)
    for name in _PROJ["attn"][1]:
      out[f"model.layers.{i}.self_attn.{name}.weight"] = (d, d)
    out[f"model.layers.{i}.mlp.gate_proj.weight"] = (f, d)
    out[f"model.layers.{i}.mlp.up_proj.weight"] = (f, d)
    out[f"model.layers.{i}.mlp.down_proj.weight"] = (d, f)
  if not config.tie_embeddings:
    out["lm_head.weight"] = (v, d)
  return out


def _describe(config: LlamaConfig) -> str:
  return (f"vocab {config.vocab_size}, d_model {config.d_model}, d_ff {config.d_ff}, "
          f"{config.n_heads} heads, {config.n_layers} layers"
          f"{', tied' if config.tie_embeddings else ''}")


def _at(tree, keys):
  node = tree
  for k in keys:
    node = node[k]
  return node


def _check_tree(params: Mapping, config: LlamaConfig) -> None:
  """HFError unless ``params`` has exactly the shapes of Llama(config)'s tree."""
  from salaad_jax.models.llama import Llama  # pylint: disable=import-outside-toplevel
  want = jax.eval_shape(lambda: Llama(config).init(
      jax.random.key(0), np.zeros((1, 1), np.int32)))["params"]
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x))
                       for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  a, b = flat(want), flat(params)
  if a != b:
    diff = sorted(set(a.items()) ^ set(b.items()))[:4]
    raise HFError("the parameters are not a dense Llama of the config (structured or "
                  f"reparameterised weights must be made dense first); differences: {diff}")


# ---------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------


def hf_config(config: LlamaConfig, dtype: str = "float32", *, eos_id: Optional[int] = None,
              bos_id: Optional[int] = None) -> dict[str, Any]:
  """The ``config.json`` of ``config`` (transformers' LlamaConfig fields)."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": config.vocab_size, "hidden_size": config.d_model,
      "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
      "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_heads,
      "head_dim": config.head_dim, "hidden_act": "silu",
      "max_position_embeddings": config.max_len, "rms_norm_eps": config.norm_eps,
      # transformers >= 5 reads rope_parameters; older readers rope_theta.
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
      "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
      "pretraining_tp": 1, "use_cache": True, "bos_token_id": bos_id,
      "eos_token_id": eos_id, "pad_token_id": None, "torch_dtype": dtype, "dtype": dtype,
  }


def llama_config(hf: Mapping[str, Any], *, where: str = "config.json") -> LlamaConfig:
  """Our LlamaConfig of a Hugging Face LLaMA ``config.json``; HFError for a
  model our Llama cannot hold (GQA, biases, rope scaling, another activation)."""
  if hf.get("model_type") != "llama":
    raise HFError(f"{where}: model_type {hf.get('model_type')!r} is not 'llama'")
  try:
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or d // heads)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kwargs = dict(vocab_size=int(hf["vocab_size"]), d_model=d,
                  d_ff=int(hf["intermediate_size"]), n_heads=heads,
                  n_layers=int(hf["num_hidden_layers"]),
                  max_len=int(hf.get("max_position_embeddings", 2048)), rope_theta=theta,
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  except (KeyError, TypeError, ValueError) as e:
    raise HFError(f"{where}: not a complete LLaMA config ({e!r})") from None
  unsupported = []
  if kv != heads:
    unsupported.append(f"grouped-query attention ({kv} key/value heads for {heads})")
  if head_dim * heads != d:
    unsupported.append(f"head_dim {head_dim} x {heads} heads != hidden_size {d}")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    unsupported.append("biases")
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    unsupported.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
  if hf.get("hidden_act", "silu") != "silu":
    unsupported.append(f"activation {hf.get('hidden_act')!r}")
  if unsupported:
    raise HFError(f"{where}: our Llama cannot hold this model: {'; '.join(unsupported)}")
  try:
    return LlamaConfig(**kwargs)
  except ValueError as e:
    raise HFError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------
# Writing and reading a directory.
# ---------------------------------------------------------------------------


def check_out_dir(path: str, overwrite: bool) -> str:
  """The absolute ``path`` if an export may write there (absent, empty, or
  with ``overwrite`` an earlier export); HFError otherwise.  Nothing is
  changed."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise HFError(f"output path '{path}' exists and is not a directory")
    entries = os.listdir(path)
    if entries and not overwrite:
      raise HFError(f"output directory '{path}' is not empty; pass --overwrite "
                    "(overwrite=True) to replace it")
    if entries and PROVENANCE not in entries:
      raise HFError(f"output directory '{path}' holds files that are not an export "
                    f"({PROVENANCE} missing); refusing to overwrite it")
  return path


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
  """Tensor names in order, cut into groups of at most ``max_bytes`` (a
  larger tensor alone)."""
  groups: list[list[str]] = [[]]
  size = 0
  for name, x in tensors.items():
    if groups[-1] and size + x.nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += x.nbytes
  return groups


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32).astype(jax.numpy.dtype(dtype)))


def write_weights(directory: str, tensors: dict[str, np.ndarray],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """``model.safetensors`` (one file) or shards plus the index, as
  ``save_pretrained`` writes them; returns the files written."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  groups = _shards(tensors, max_shard_bytes)
  meta = {"format": "pt"}
  if len(groups) == 1:
    save_file(tensors, os.path.join(directory, WEIGHTS), metadata=meta)
    return [WEIGHTS]
  files, weight_map = [], {}
  for i, names in enumerate(groups):
    file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    save_file({n: tensors[n] for n in names}, os.path.join(directory, file), metadata=meta)
    weight_map.update({n: file for n in names})
    files.append(file)
  index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
           "weight_map": weight_map}
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump(index, f, indent=2)
  return files + [INDEX]


def read_weights(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of ``model.safetensors`` or of the shards its index names."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, INDEX)
  if os.path.exists(single):
    return load_file(single)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    out: dict[str, np.ndarray] = {}
    for file in files:
      out.update(load_file(os.path.join(directory, file)))
    return out
  raise HFError(f"'{directory}' holds no {WEIGHTS} nor {INDEX} (only safetensors "
                "checkpoints are read)")


def export_hf(path: str, params: Mapping, config: LlamaConfig, *, tokenizer=None,
              dtype: str = "float32", overwrite: bool = False,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              provenance: Optional[dict] = None,
              rotary_layout: Optional[str] = None) -> list[str]:
  """Writes the dense Llama ``params`` of ``config`` as a Hugging Face
  directory ``path`` (see the module docstring).

  Args:
    path: output directory (absent or empty unless ``overwrite``).
    params: the dense params tree (e.g. the deployed X_hat of a budget).
    config: its LlamaConfig.
    tokenizer: None, 'byte', a SentencePiece .model path or a tokenizer of
      ``salaad_jax.data.tokenizers``: its files are written beside.
    dtype: 'float32' or 'bfloat16', the stored tensors' dtype.
    max_shard_bytes: above this the weights are split into shards.
    provenance: JSON-able facts written to ``salaad_export.json``.

  Returns:
    The names of the files written.  Every check runs before anything is
    written, and the directory appears whole (written beside it, then
    renamed): an error leaves ``path`` as it was.
  """
  from salaad_jax.deploy import hf_tokenizer  # pylint: disable=import-outside-toplevel
  if dtype not in DTYPES:
    raise HFError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
  if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
    raise HFError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
  path = check_out_dir(path, overwrite)
  tok = hf_tokenizer.resolve(tokenizer, config.vocab_size)
  tensors = {k: _cast(v, dtype) for k, v in
             to_hf_tensors(params, config, rotary_layout=rotary_layout).items()}
  eos = None if tok is None else tok.eos_id

  def fill(directory: str) -> list[str]:
    files = write_weights(directory, tensors, max_shard_bytes)
    write_json(directory, CONFIG, hf_config(config, dtype, eos_id=eos))
    write_json(directory, GENERATION_CONFIG, {"eos_token_id": eos, "pad_token_id": eos,
                                              "do_sample": False})
    files += [CONFIG, GENERATION_CONFIG]
    if tok is not None:
      files += hf_tokenizer.write(directory, tok, config.max_len)
    write_json(directory, PROVENANCE, {"format": "hf", "dtype": dtype,
                                       "tokenizer": None if tok is None else tok.spec,
                                       **(provenance or {})})
    return files + [PROVENANCE]

  return write_dir(path, fill)


def write_dir(path: str, fill: Callable[[str], Any]) -> Any:
  """``fill(directory)`` on a new directory beside ``path``, which then
  replaces ``path`` whole (an earlier one removed); on any error the new
  directory is removed and ``path`` left as it was.  Returns fill's result."""
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
  try:
    result = fill(tmp)
    make_readable(tmp)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return result


def write_json(directory: str, name: str, obj) -> None:
  with open(os.path.join(directory, name), "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def read_config(path: str) -> tuple[LlamaConfig, dict]:
  """(our LlamaConfig, the raw dict) of a Hugging Face directory's config.json."""
  path = os.path.abspath(os.fspath(path))
  file = os.path.join(path, CONFIG)
  if not os.path.isdir(path) or not os.path.exists(file):
    raise HFError(f"'{path}' is not a Hugging Face model directory ({CONFIG} missing)")
  try:
    with open(file) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise HFError(f"{file}: unreadable ({e})") from None
  if not isinstance(hf, dict):
    raise HFError(f"{file}: not a JSON object")
  return llama_config(hf, where=file), hf


def read_provenance(path: str) -> dict:
  """``salaad_export.json`` of an export of ours ({} for other checkpoints)."""
  file = os.path.join(os.fspath(path), PROVENANCE)
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    return json.load(f)


def model_settings(path: str) -> dict[str, Any]:
  """The TrainConfig settings that train a Llama of a Hugging Face
  directory's shape: ``model`` (the preset of its widths, heads and layers),
  ``vocab_size`` and, for an export of ours, ``tokenizer``.  HFError when no
  preset has its shape."""
  from salaad_jax.models.configs import CONFIGS  # pylint: disable=import-outside-toplevel
  config, _ = read_config(path)
  shape = lambda c: (c.d_model, c.d_ff, c.n_heads, c.n_layers, c.tie_embeddings)
  presets = [name for name, c in CONFIGS.items() if shape(c) == shape(config)]
  if not presets:
    raise HFError(f"no model preset has its shape (d_model {config.d_model}, d_ff "
                  f"{config.d_ff}, {config.n_heads} heads, {config.n_layers} layers"
                  f"{', tied' if config.tie_embeddings else ''}); presets: {list(CONFIGS)}")
  out = {"model": presets[0], "vocab_size": config.vocab_size}
  tokenizer = read_provenance(path).get("tokenizer")
  if tokenizer:
    out["tokenizer"] = tokenizer
  return out


def make_readable(directory: str) -> None:
  """Gives ``directory`` (made by mkdtemp, mode 0700) and its files the
  modes of the process's umask, as a plain mkdir / open would."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def import_hf(path: str, model_config: Optional[LlamaConfig] = None,
              *, rotary_layout: Optional[str] = None) -> tuple[LlamaConfig, dict]:
  """(LlamaConfig, float32 params) of a Hugging Face LLaMA directory.

  With ``model_config`` the checkpoint must have its shapes (its dtypes
  and max_len are kept in the returned config); HFError otherwise, naming
  the first difference.
  """
  path = os.path.abspath(os.fspath(path))
  config, _ = read_config(path)
  if model_config is not None:
    fields = ("vocab_size", "d_model", "d_ff", "n_heads", "n_layers", "tie_embeddings")
    diff = [f"{k} {getattr(config, k)} (this run: {getattr(model_config, k)})"
            for k in fields if getattr(config, k) != getattr(model_config, k)]
    if diff:
      raise HFError(f"{path} has another shape than this run's model: {', '.join(diff)}")
    if (config.rope_theta, config.norm_eps) != (model_config.rope_theta,
                                                model_config.norm_eps):
      raise HFError(f"{path}: rope_theta {config.rope_theta} / rms_norm_eps "
                    f"{config.norm_eps} differ from this run's {model_config.rope_theta} / "
                    f"{model_config.norm_eps}")
    config = model_config
  tensors = {k: np.asarray(v, np.float32) for k, v in read_weights(path).items()}
  return config, from_hf_tensors(tensors, config, rotary_layout=rotary_layout)
