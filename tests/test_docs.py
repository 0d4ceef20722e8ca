"""The documentation keeps up with the code: every option of the transform
has its row in docs/options.md, and the README stays a short map."""

import inspect
import re

import salaad_jax as sj
from helpers import ROOT


def _option_rows(text: str) -> set[str]:
  return set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))


def test_option_rows_are_read_from_the_tables():
  assert _option_rows("| `every_k` | `10` | x |\n| option | default |\n `rho` |") == {"every_k"}


def test_every_option_has_a_row_in_options_md():
  rows = _option_rows((ROOT / "docs" / "options.md").read_text())
  keywords = (set(inspect.signature(sj.salaad).parameters)
              | set(inspect.signature(sj.salaad_decoupled).parameters))
  assert not keywords - rows, f"options without a row in docs/options.md: {keywords - rows}"
  assert not rows - keywords, f"rows of docs/options.md that are no option: {rows - keywords}"


def test_readme_is_a_short_map_whose_links_resolve():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 150
  for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", readme):
    if not target.startswith("http"):
      assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
