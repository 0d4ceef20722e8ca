"""The notebooks in ``notebooks/`` run top to bottom, as CI runs them.

Each notebook is executed by ``nbclient`` in a fresh kernel with
``SALAAD_NOTEBOOK_SMALL=1`` (smallest sizes) and ``SALAAD_NOTEBOOK_WORKDIR``
set to a temporary directory, then a few of its outputs are checked: the
quickstart's controller reaches its targets and its checkpoint restores, the
deployment notebook's spectrum has one row per budget and series and the
compressed model generates text.

The kernel is a kernelspec written on the fly for ``sys.executable`` (found
first through ``JUPYTER_PATH``), so the notebooks run in the Python of the
test run whatever other ``python3`` kernels the machine has.  The kernel sees
one CPU device (the fake 8-device flag of ``conftest.py`` is dropped), like a
plain runtime.
"""

import ast
import json
import math
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from helpers import ROOT

NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"
TIMEOUT = 600  # seconds per cell

pytestmark = pytest.mark.slow

@pytest.fixture
def kernel(tmp_path, monkeypatch):
  """Installs a ``python3`` kernelspec running ``sys.executable`` and makes it
  the one Jupyter finds first."""
  prefix = tmp_path / "kernelspec"
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
  monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
  install_kernelspec(prefix=str(prefix), kernel_name=KERNEL)
  spec = KernelSpecManager().get_kernel_spec(KERNEL)
  assert spec.argv[0] == sys.executable, spec.argv
  return KERNEL


def _kernel_env(workdir: Path) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("SALAAD_NOTEBOOK_RUN_DIR", "SALAAD_NOTEBOOK_SOURCE")}
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env.update(JAX_PLATFORMS="cpu", SALAAD_NOTEBOOK_SMALL="1",
             SALAAD_NOTEBOOK_WORKDIR=str(workdir), PYTHONUNBUFFERED="1")
  return env


def run_notebook(name: str, tmp_path: Path, kernel_name: str):
  """Executes ``notebooks/<name>.ipynb``; returns (executed notebook, workdir).

  A cell that fails raises (nbclient's CellExecutionError).
  """
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  assert all(not c.get("outputs") and c.get("execution_count") is None
             for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
  cwd, workdir = tmp_path / "cwd", tmp_path / "work"
  cwd.mkdir()
  before = sorted(os.listdir(NOTEBOOKS))
  client = NotebookClient(nb, timeout=TIMEOUT, kernel_name=kernel_name,
                          resources={"metadata": {"path": str(cwd)}})
  client.execute(env=_kernel_env(workdir))
  assert sorted(os.listdir(NOTEBOOKS)) == before, "the notebook wrote into the repository"
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.output_type != "error", (cell.id, out.get("ename"), out.get("evalue"))
  return nb, workdir


def text(nb, cell_id: str) -> str:
  """The printed text (stdout and text/plain results) of one cell."""
  (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
  parts = []
  for out in cell.outputs:
    if out.output_type == "stream":
      parts.append(out.text)
    elif "text/plain" in out.get("data", {}):
      parts.append(out.data["text/plain"])
  return "".join(parts)


def has_image(nb, cell_id: str) -> bool:
  (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
  return any("image/png" in out.get("data", {}) for out in cell.outputs)


def test_quickstart(tmp_path, kernel):
  nb, workdir = run_notebook("quickstart", tmp_path, kernel)

  assert "salaad_jax is installed" in text(nb, "install")
  assert "backend 'cpu', 1 device(s)" in text(nb, "devices")
  assert "identical to the saved state: True" in text(nb, "orbax_custom")
  assert "step 200/200" in text(nb, "train")

  # The controller drove the mean rank rate and density to their targets.
  final = text(nb, "final")
  m = re.search(r"mean rank rate ([\d.]+) \(target ([\d.]+)\), mean density ([\d.]+) "
                r"\(target ([\d.]+)\)", final)
  assert m, final
  rank, rank_target, density, density_target = map(float, m.groups())
  assert (rank_target, density_target) == (0.15, 0.05)
  assert abs(rank - rank_target) <= 0.05, final
  assert abs(density - density_target) <= 0.02, final

  # Loss and per-block curves: shown inline and saved in the workdir.
  assert has_image(nb, "curves")
  assert (workdir / "quickstart_training.png").stat().st_size > 10_000

  # The Orbax checkpoint restores to the run's final evaluation.
  m = re.search(r"restored step 200: eval loss ([\d.]+) \(the run reported ([\d.]+)\)",
                text(nb, "checkpoint"))
  assert m, text(nb, "checkpoint")
  assert float(m.group(1)) == pytest.approx(float(m.group(2)), abs=2e-4)
  assert (workdir / "run" / "checkpoints" / "200").is_dir()


def test_elastic_deployment(tmp_path, kernel):
  nb, workdir = run_notebook("elastic_deployment", tmp_path, kernel)

  assert "salaad run, model 'tiny', step 200" in text(nb, "run")

  # The spectrum: one row per budget for every series, and the dense reference.
  m = re.search(r"budgets \(fractions of P_model\): (\[.*\])", text(nb, "spectrum"))
  assert m, text(nb, "spectrum")
  budgets = ast.literal_eval(m.group(1))
  assert len(budgets) >= 4 and budgets == sorted(budgets)
  rows = json.loads((workdir / "spectrum.json").read_text())
  series = {}
  for r in rows:
    if r["budget"] is not None:
      series.setdefault(r["series"], []).append(float(r["budget"]))
  assert set(series) == {"salaad/hpa", "salaad/global", "posthoc[own X]/hpa",
                         "posthoc[own X]/global"}
  for name, got in series.items():
    assert sorted(got) == pytest.approx(budgets), name
  dense = [r for r in rows if r["source"] == "dense"]
  assert len(dense) == 1
  # More budget never costs SALAAD's global allocation more than noise (two
  # standard errors of the loss; a run that trains its cuts can be as good at
  # a small budget as whole).
  glob = sorted((r for r in rows if r["series"] == "salaad/global"),
                key=lambda r: r["budget_value"])
  noise = 2 * max(glob[0]["loss_se"], glob[-1]["loss_se"])
  assert math.log(glob[-1]["perplexity"]) <= math.log(glob[0]["perplexity"]) + noise
  assert has_image(nb, "plot")
  assert (workdir / "capacity_spectrum.png").stat().st_size > 10_000

  # One budget exported, loaded back and evaluated.
  (artifact,) = workdir.glob("deployed_*")
  assert (artifact / "manifest.json").is_file()
  export = text(nb, "export")
  assert "exported budget" in export and "validation perplexity: dense" in export

  # The compressed model generates text.
  continuations = re.findall(r"compressed model: (.+)", text(nb, "generate"))
  assert len(continuations) == 2
  for c in continuations:
    assert ast.literal_eval(c).strip(), c
