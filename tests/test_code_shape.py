"""The shape of the code a reader has to hold: short functions, a short
transform, and the consolidation boundary in one place."""

import ast
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "salaad_jax"
MAX_FUNCTION_LINES = 60  # docstrings not counted
CORE = sorted(PACKAGE.glob("*.py"))  # the transform's modules (no subpackages)


def _functions(path: Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def _code_lines(fn) -> int:
  n = fn.end_lineno - fn.lineno + 1
  if ast.get_docstring(fn, clean=False) is not None:
    n -= fn.body[0].end_lineno - fn.body[0].lineno + 1
  return n


def test_code_lines_count_the_code_not_the_docstring():
  fn = next(_functions_of("def f(x):\n  '''One.\n\n  Two.\n  '''\n  y = x\n  return y\n"))
  assert _code_lines(fn) == 3


def _functions_of(source: str):
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.FunctionDef):
      yield node


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.name))
def test_no_function_is_longer_than_a_screen(path):
  long = [(fn.name, _code_lines(fn)) for fn in _functions(path)
          if _code_lines(fn) > MAX_FUNCTION_LINES]
  assert not long, f"{path.relative_to(PACKAGE.parent)}: functions over " \
                   f"{MAX_FUNCTION_LINES} lines: {long}"


def test_transform_is_short():
  assert len((PACKAGE / "transform.py").read_text().splitlines()) < 300


def test_consolidation_boundary_is_written_once():
  """Only ``options.Consolidation`` reads the step at which consolidation
  starts; everything else asks it for the phase."""
  readers = []
  for path in CORE:
    if path.name == "options.py":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Attribute) and node.attr == "start":
        readers.append(f"{path.name}:{node.lineno}")
      if isinstance(node, ast.Name) and node.id == "consolidate_from":
        readers.append(f"{path.name}:{node.lineno}")
  assert not readers, f"the consolidation boundary read outside options.py: {readers}"
