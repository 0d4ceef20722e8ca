"""Elastic deployment: one SALAAD run, any memory budget (SALAAD.md §6).

Typical use::

    from salaad_jax import deploy

    blocks = deploy.spectra(params, opt_state)          # once per run
    alloc = deploy.allocate(blocks, 0.5, method="global")
    deploy.account(params, alloc, fmt="csr", dtype="bfloat16")  # params, bytes
    hat = deploy.dense_reconstruction(params, blocks, alloc)    # plain Llama eval
    art = deploy.compress(params, blocks, alloc, fmt="csr")
    deploy.export("/tmp/m50", art, config)
    model, params, manifest = deploy.load("/tmp/m50")

Modules: ``spectra`` (canonical per-block spectra), ``allocation`` (HPA and
global allocation), ``accounting`` (parameter counts and bytes),
``compress`` (truncation, dense reconstruction, compact storage),
``export`` (Orbax artifact and manifest), ``forward_time`` (a deployed
model's measured forward time against dense), ``hf`` (a Hugging Face
``LlamaForCausalLM`` directory, and back), ``hf_tokenizer`` (our tokenizers
as Hugging Face files), ``deployed`` (the dense weights any run deploys at a
budget), ``compact_files`` (the compact artifact as safetensors plus
manifest), ``posthoc`` (dense-model
baseline), ``calibration`` (activation row weights), ``spectrum``
(perplexity of a trained run at many budgets), ``spectrum_report`` (its
tables and plot), ``summary`` (the ``summary.json`` other runs leave for the
spectrum).
"""

from salaad_jax.deploy.accounting import FORMATS, account, value_bytes
from salaad_jax.deploy.allocation import (Allocation, BlockAllocation, allocate,
                                          allocation_error, global_allocation, greedy, hpa,
                                          resolve_budget)
from salaad_jax.deploy.calibration import activation_weights
from salaad_jax.deploy.compress import Artifact, compress, dense_reconstruction
from salaad_jax.deploy.export import export, export_budget, load, read_manifest
from salaad_jax.deploy.forward_time import ForwardTiming
from salaad_jax.deploy.hf import HFError, export_hf, import_hf
from salaad_jax.deploy.posthoc import posthoc_factors
from salaad_jax.deploy.spectra import BlockSpectrum, Blocks, Decomposition, decomposition, spectra
from salaad_jax.deploy.spectrum import SpectrumError, capacity_spectrum, paired_se, parse_budgets
from salaad_jax.deploy.spectrum_report import plot, write_table
from salaad_jax.deploy.summary import read_summary, write_summary

__all__ = [
    "Allocation", "Artifact", "BlockAllocation", "BlockSpectrum", "Blocks", "Decomposition",
    "FORMATS", "ForwardTiming", "account", "activation_weights", "allocate", "allocation_error", "compress",
    "decomposition", "dense_reconstruction", "export", "export_budget", "export_hf",
    "global_allocation", "HFError", "import_hf",
    "greedy", "hpa", "load", "posthoc_factors", "read_manifest", "resolve_budget", "spectra",
    "value_bytes",
    "SpectrumError", "capacity_spectrum", "paired_se", "parse_budgets", "plot", "read_summary",
    "write_summary", "write_table",
]
