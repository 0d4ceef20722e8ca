"""Writing a compressed model to disk and loading it back.

An exported artifact is a directory

    <path>/params/          Orbax checkpoint of the artifact's parameter tree
    <path>/manifest.json    budget, method, per-block shape/rank/nnz, format,
                            dtype, parameter count and bytes, model config;
                            with ``time_forward``, ``forward``: the deployed
                            model's measured forward time against dense

The manifest is written last, so a directory holding one is complete.
``load`` rebuilds ``Llama(config, dense_cls=structured_dense(layouts))``
(plain ``Llama`` for the 'dense' format) and restores the parameters against
its abstract tree.

With several processes (``jax.distributed``) every process calls ``export``
with its own copy of the artifact (e.g. from ``load_run``): Orbax saves
collectively, host arrays from process 0 only, and process 0 alone clears
the directory and writes the manifest.

The stored tree holds no empty dict (Orbax does not restore one against a
model that lacks it): a block kept at rank 0 with no sparse entry has no
parameters, and Flax's structured model has none for it either.  ``load``
still reads artifacts whose params were saved with such empty dicts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from salaad_jax import structure as st
from salaad_jax.deploy import accounting as acc
from salaad_jax.deploy.allocation import allocate
from salaad_jax.deploy.compress import Artifact, compress, drop_empty
from salaad_jax.deploy.forward_time import ForwardTimer, ForwardTiming, stored_as
from salaad_jax.deploy.spectra import Blocks, spectra
from salaad_jax.models.configs import LlamaConfig
from salaad_jax.models.llama import Llama
from salaad_jax.models.runtime import PRODUCTS, prepare
from salaad_jax.models.structured import BlockLayout, structured_dense

MANIFEST = "manifest.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def _config_dict(config: LlamaConfig) -> dict[str, Any]:
  d = dataclasses.asdict(config)
  return {k: (jnp.dtype(v).name if k in ("dtype", "param_dtype") else v) for k, v in d.items()}


def model_for(config: LlamaConfig, layouts: dict[str, BlockLayout], fmt: str, dtype: str):
  """The Llama that holds an artifact: parameters stored in ``dtype``."""
  cfg = config.replace(param_dtype=dtype)
  if fmt == "dense":
    return Llama(cfg)
  return Llama(cfg, dense_cls=structured_dense(layouts))


def _abstract_params(model) -> Any:
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def _signature(tree) -> dict[str, tuple]:
  return {st.path_str(p): (tuple(np.shape(x)), jnp.dtype(x.dtype).name)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_fits(artifact: Artifact, model) -> None:
  want, have = _signature(_abstract_params(model)), _signature(artifact.params)
  if want == have:
    return
  diff = sorted(set(want.items()) ^ set(have.items()))[:6]
  raise ValueError(
      "the artifact's parameters do not fit Llama(config) with the structured layer; "
      f"first differences (path, (shape, dtype)): {diff}. Blocks must be the attention/MLP "
      "projections (train without include_embedding / include_head to export).")


def manifest_for(artifact: Artifact, config: Optional[LlamaConfig] = None,
                 extra: Optional[dict] = None) -> dict[str, Any]:
  """The manifest of ``artifact`` (what ``export`` writes)."""
  alloc = artifact.allocation
  counts = acc.account(None, alloc, artifact.fmt, artifact.dtype)
  return dict(
      format_version=FORMAT_VERSION, fmt=artifact.fmt, dtype=artifact.dtype,
      budget=dict(value=alloc.budget, unit=alloc.unit,
                  fraction=alloc.budget / (counts["dense_params"] if alloc.unit == "params"
                                           else counts["dense_bytes"])),
      method=alloc.method, gamma=alloc.gamma, solver=alloc.solver, weighted=alloc.weighted,
      error=alloc.error, relative_error=alloc.relative_error,
      params=counts["params"], bytes=counts["bytes"], dense_params=counts["dense_params"],
      dense_bytes=counts["dense_bytes"],
      blocks={b.path: dict(shape=list(b.shape), m=b.m, n=b.n, rank=b.rank, nnz=b.nnz)
              for b in alloc.blocks},
      allocation=alloc.to_dict(),
      model_config=None if config is None else _config_dict(config),
      extra=extra or {})


def _prepare_dir(path: str, overwrite: bool) -> None:
  """Checks ``path`` (every process), then empties and creates it (process
  0, once all have checked; the others wait for it)."""
  entries = []
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(f"export path '{path}' exists and is not a directory")
    entries = os.listdir(path)
    if entries:
      if not overwrite:
        raise ValueError(f"export path '{path}' is not empty; pass overwrite=True to replace "
                         "an earlier artifact")
      if MANIFEST not in entries:
        raise ValueError(f"export path '{path}' holds files that are not an artifact; "
                         "refusing to overwrite it")
  _sync(f"export: {path} checked")  # before process 0 changes it
  if jax.process_index() == 0:
    if entries:
      shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
  _sync(f"export: {path} prepared")


def _sync(name: str) -> None:
  """With several processes, waits until every one gets here."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _savable(tree):
  """With several processes, each process's own arrays as host arrays (which
  Orbax writes from process 0 only); arrays across processes stay as they are."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", True)
                      else x, tree)


def export(path: str, artifact: Artifact, config: Optional[LlamaConfig] = None, *,
           overwrite: bool = False, extra: Optional[dict] = None,
           time_forward: Optional[ForwardTiming] = None) -> dict[str, Any]:
  """Writes ``artifact`` (and its manifest) to the directory ``path``.

  With a ``config`` the artifact is checked, before anything is written, to
  be exactly the parameter tree of the Llama that ``load`` rebuilds.  With
  ``time_forward`` (and a config) the manifest's ``forward`` holds the
  deployed model's measured forward time against dense on this device
  (``time_artifact``).

  Returns the manifest.  Raises ValueError (writing nothing) when the
  artifact does not fit the model, ``path`` is taken, or ``time_forward``
  comes without a config.
  """
  path = os.path.abspath(path)
  if config is not None:
    _check_fits(artifact, model_for(config, artifact.layouts, artifact.fmt, artifact.dtype))
  elif time_forward is not None:
    raise ValueError("time_forward needs the model config (config=...) to build the model")
  manifest = manifest_for(artifact, config, extra)
  if time_forward is not None:
    manifest["forward"] = time_artifact(artifact, config, time_forward)
  _prepare_dir(path, overwrite)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, PARAMS_DIR), _savable(drop_empty(artifact.params)))
  ckpt.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
  _sync(f"export: {path} written")
  return manifest


def read_manifest(path: str) -> dict[str, Any]:
  file = os.path.join(os.path.abspath(path), MANIFEST)
  if not os.path.exists(file):
    raise ValueError(f"'{path}' holds no exported artifact ({MANIFEST} missing)")
  with open(file) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"artifact format_version {manifest.get('format_version')} is not "
                     f"{FORMAT_VERSION}")
  return manifest


def layouts_of(manifest: dict[str, Any]) -> dict[str, BlockLayout]:
  """{module path: BlockLayout} of a manifest's structured blocks."""
  if manifest["fmt"] == "dense":
    return {}
  return {p.rsplit("/", 1)[0] if "/" in p else "": BlockLayout(b["m"], b["n"], b["rank"],
                                                               b["nnz"], manifest["fmt"])
          for p, b in manifest["blocks"].items()}


def _stored_tree(ckpt, directory: str):
  """The nested dict of a checkpoint's stored tree (leaves: metadata)."""
  meta = ckpt.metadata(directory)
  meta = getattr(meta, "item_metadata", meta)
  return getattr(meta, "tree", meta)


def _with_stored_empties(target, stored):
  """``target`` plus the empty dicts that ``stored`` holds where ``target``
  has nothing: what an artifact saved with empty dicts is restored against."""
  if not (isinstance(target, Mapping) and isinstance(stored, Mapping)):
    return target
  out = dict(target)
  for k, v in stored.items():
    if k in out:
      out[k] = _with_stored_empties(out[k], v)
    elif isinstance(v, Mapping) and not jax.tree.leaves(v):
      out[k] = _with_stored_empties({}, v)
  return out


def load(path: str, product: Optional[str] = None):
  """(model, params, manifest) of an exported artifact.

  ``model`` is the Llama that evaluates ``params`` (None when the artifact
  was exported without a model config; ``params`` then come back as
  stored).  With a ``product`` ('adaptive', 'coo', 'ell', 'dense', 'auto':
  ``models.runtime.prepare``) the structured blocks come back in that
  runtime form, their indices decoded here, once; without one, as stored.
  """
  if product is not None and product not in PRODUCTS:
    raise ValueError(f"product must be one of {PRODUCTS} or None, got {product!r}")
  path = os.path.abspath(path)
  manifest = read_manifest(path)
  ckpt = ocp.StandardCheckpointer()
  directory = os.path.join(path, PARAMS_DIR)
  if manifest["model_config"] is None:
    return None, drop_empty(ckpt.restore(directory)), manifest
  config = LlamaConfig(**manifest["model_config"])
  layouts = layouts_of(manifest)
  model = model_for(config, layouts, manifest["fmt"], manifest["dtype"])
  target = _with_stored_empties(_abstract_params(model), _stored_tree(ckpt, directory))
  params = drop_empty(ckpt.restore(directory, target))
  if product is not None:
    model, params = runtime_model(config, params, layouts, manifest["fmt"], manifest["dtype"],
                                  product)
  return model, params, manifest


def runtime_model(config: LlamaConfig, params, layouts: dict[str, BlockLayout], fmt: str,
                  dtype: str, product: str = "adaptive"):
  """(model, params) applying an artifact's stored ``params`` in the runtime
  form of ``product`` (``models.runtime.prepare``: indices decoded here,
  once); a 'dense' artifact as it is."""
  if fmt != "dense":
    params, layouts = prepare(params, layouts, product)
  return model_for(config, layouts, fmt, dtype), params


def time_artifact(artifact: Artifact, config: LlamaConfig,
                  settings: ForwardTiming) -> dict[str, Any]:
  """The measured forward of ``artifact`` in its runtime form against the
  dense ``Llama(config)`` stored in the artifact's dtype (random weights: a
  dense forward's time does not depend on them), on random tokens
  (``deploy.forward_time``): forward_ms, dense_forward_ms,
  forward_vs_dense and the setup (product, batch, seq, repeats, device)."""
  dense_model = model_for(config, {}, "dense", artifact.dtype)
  dense_params = stored_as(dense_model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
      "params"], artifact.dtype)
  tokens = settings.tokens(config.vocab_size, config.max_len)
  timer = ForwardTimer(dense_model, dense_params, tokens, settings)
  model, params = runtime_model(config, artifact.params, artifact.layouts, artifact.fmt,
                                artifact.dtype, settings.product)
  return dict(timer(model, params), **timer.setup())


def export_budget(path: str, params, source, budget, config: Optional[LlamaConfig] = None, *,
                  method: str = "global", gamma: float = 0.5, unit: str = "params",
                  fmt: str = "coo", dtype="bfloat16", row_weights=None,
                  overwrite: bool = False, extra: Optional[dict] = None,
                  time_forward: Optional[ForwardTiming] = None) -> dict[str, Any]:
  """Allocates ``budget``, compresses and exports in one call (``time_forward``:
  as ``export``).

  ``source`` is an optimizer state holding a SALAAD state, a
  ``Decomposition`` or ``Blocks``; ``row_weights`` (calibration) apply when
  the spectra are computed here.  Every check (SALAAD state present, budget
  within [P_rest, P_model], format, fit to the model) runs before anything
  is written.  Returns the manifest.
  """
  blocks = source if isinstance(source, Blocks) else spectra(params, source,
                                                             row_weights=row_weights)
  alloc = allocate(blocks, budget, method, gamma=gamma, unit=unit, fmt=fmt, dtype=dtype)
  return export(path, compress(params, blocks, alloc, fmt, dtype), config,
                overwrite=overwrite, extra=extra, time_forward=time_forward)
