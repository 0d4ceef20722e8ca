"""The compact artifact as plain files: safetensors plus a JSON manifest.

    <path>/model.safetensors   every leaf of ``compress``'s tree, named by its
                               '/'-joined path (e.g.
                               ``layers_0/attn/q_proj/lr_a``, ``.../sp_values``,
                               ``.../sp_rows``), in the artifact's dtype
    <path>/manifest.json       ``export.manifest_for`` (budget, allocation,
                               per-block shape/rank/nnz, format, model config)

The same content as the Orbax artifact of ``export.export``, for readers
without Orbax: the small file.  ``load_compact`` rebuilds our structured
Llama (``export.model_for``) and its params; no other library runs the
structured layer, so Hugging Face gets the dense export (``hf``).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np

from salaad_jax import structure as st
from salaad_jax.deploy import deployed as dep
from salaad_jax.deploy.allocation import allocate
from salaad_jax.deploy.compress import compress
from salaad_jax.deploy.export import (MANIFEST, _check_fits, layouts_of, manifest_for,
                                      model_for)
from salaad_jax.deploy.hf import PROVENANCE, WEIGHTS, check_out_dir, write_dir, write_json
from salaad_jax.deploy.spectra import spectra
from salaad_jax.models.configs import LlamaConfig


def _flat(tree) -> dict[str, np.ndarray]:
  return {st.path_str(p): np.ascontiguousarray(np.asarray(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nest(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for path, x in flat.items():
    node = out
    *keys, leaf = path.split("/")
    for k in keys:
      node = node.setdefault(k, {})
    node[leaf] = x
  return out


def export_run(path: str, workdir: str, budget, *, unit: str = "params",
               method: str = "global", fmt: str = "coo", dtype="bfloat16", gamma: float = 0.5,
               step: Optional[int] = None, overwrite: bool = False) -> dict:
  """Writes the compact artifact of a SALAAD run at ``budget``; returns the
  manifest.  DeployError / HFError (nothing written) on a bad run, budget
  or output directory."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  path = check_out_dir(path, overwrite)
  run = dep._load(os.path.abspath(workdir), step)  # pylint: disable=protected-access
  if not dep._is_salaad(run):  # pylint: disable=protected-access
    raise dep.DeployError(f"a {run.config.method!r} run has no L + S to store compactly; "
                          "export it with --format=hf")
  store = "coo" if fmt == "auto" and unit == "params" else fmt
  try:
    blocks = spectra(run.params, run.opt_state)
    alloc = allocate(blocks, budget, method, gamma=gamma, unit=unit, fmt=store, dtype=dtype)
    artifact = compress(run.params, blocks, alloc, alloc.fmt or store, dtype)
    config = run.model_config
    _check_fits(artifact, model_for(config, artifact.layouts, artifact.fmt, artifact.dtype))
  except ValueError as e:
    raise dep.DeployError(str(e)) from None
  manifest = manifest_for(artifact, config, extra={"workdir": os.path.abspath(workdir),
                                                   "step": int(run.step)})
  tensors = _flat(artifact.params)

  def fill(directory: str) -> None:
    save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "salaad-compact"})
    write_json(directory, MANIFEST, manifest)
    write_json(directory, PROVENANCE, {"format": "compact"})

  write_dir(path, fill)
  return manifest


def load_compact(path: str):
  """(model, params, manifest) of a compact directory: ``model`` is the
  structured Llama that applies ``params``."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from salaad_jax.deploy.export import read_manifest  # pylint: disable=import-outside-toplevel
  manifest = read_manifest(path)
  config = LlamaConfig(**manifest["model_config"])
  model = model_for(config, layouts_of(manifest), manifest["fmt"], manifest["dtype"])
  params = jax.tree.map(jax.numpy.asarray, _nest(load_file(os.path.join(path, WEIGHTS))))
  return model, params, manifest
