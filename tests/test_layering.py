"""The README's "Where things live" table is the import rule, and the code keeps it.

Each row names modules (`igpt/x.py`, a package folder `igpt/x/`, or an entry point) and what
they may import of igpt: a list of names, "nothing", "everything above" (the modules of every
row above it), optionally "but `x`". The modules of one row may import each other, and a
module its own package.
"""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("train.py", "sample.py", "probe.py", "demo.py")


def _module_name(path: str) -> str:
  """'igpt/readers/cifar.py' -> 'readers.cifar'; 'train.py' -> 'train.py' (an entry point)."""
  rel = os.path.relpath(path, REPO)
  if not rel.startswith("igpt" + os.sep):
    return rel
  name = rel[len("igpt/"):-len(".py")].replace(os.sep, ".")
  if name == "__init__":
    return ""
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _package(name: str) -> str:
  return name.split(".")[0]


def _igpt_imports(path: str) -> set[str]:
  """The igpt modules `path` imports anywhere in it (function-level imports too)."""
  tree = ast.parse(open(path).read())
  modules = {_module_name(p) for p in glob.glob(os.path.join(REPO, "igpt", "**", "*.py"),
                                                 recursive=True)}
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name[len("igpt."):] for a in node.names if a.name.startswith("igpt.")}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module == "igpt":
        out |= {a.name for a in node.names}
      elif node.module.startswith("igpt."):
        base = node.module[len("igpt."):]
        out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                for a in node.names}
  return out


def _third_party_imports(path: str) -> set[str]:
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      out.add(node.module.split(".")[0])
  return out


def _table_rows() -> list[tuple[list[str], str]]:
  """[(module patterns, may-import text)] of the README's "Where things live" table."""
  text = open(os.path.join(REPO, "README.md")).read()
  section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
  rows = []
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 3 or not cells[0].startswith("`"):
      continue
    rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[2]))
  return rows


def _covers(pattern: str, name: str) -> bool:
  if pattern in ENTRY_POINTS or name in ENTRY_POINTS:
    return name == pattern
  pattern = pattern[len("igpt/"):] if pattern.startswith("igpt/") else pattern
  if pattern.endswith("/"):
    return _package(name) == pattern.rstrip("/")
  return name == pattern[:-len(".py")].replace("/", ".")


def _allowed(rows) -> list[tuple[list[str], set[str] | None]]:
  """Per row: its patterns and the igpt names it may import (package names cover their
  submodules)."""
  out, above = [], set()
  for patterns, rule in rows:
    names = {p[len("igpt/"):].rstrip("/").removesuffix(".py") for p in patterns
             if p.startswith("igpt/")}
    if rule.startswith("everything above"):
      allowed = set(above)
      allowed -= set(re.findall(r"`([^`]+)`", rule.split("but", 1)[1])) if " but " in rule else set()
    elif rule.startswith("nothing"):
      allowed = set()
    else:
      allowed = set(re.findall(r"`([^`]+)`", rule))
    out.append((patterns, allowed | names))  # a row's modules may use each other
    above |= names
  return out


def _sources() -> list[str]:
  return (sorted(glob.glob(os.path.join(REPO, "igpt", "**", "*.py"), recursive=True))
          + [os.path.join(REPO, p) for p in ENTRY_POINTS])


def test_every_module_has_a_row_and_imports_only_what_it_may():
  rules = _allowed(_table_rows())
  problems = []
  for path in _sources():
    name = _module_name(path)
    if name in ("", "commands", "convert"):  # package docstrings only
      continue
    row = [allowed for patterns, allowed in rules if any(_covers(p, name) for p in patterns)]
    if not row:
      problems.append(f"{name}: no row in the README's table")
      continue
    for imported in sorted(_igpt_imports(path)):
      if _package(imported) == _package(name):
        continue  # inside its own package
      if _package(imported) not in row[0] and imported not in row[0]:
        problems.append(f"{name} imports {imported}, which its row does not allow")
  assert not problems, "\n".join(problems)


def test_every_row_names_modules_that_exist():
  names = {_module_name(p) for p in _sources()}
  for patterns, _ in _table_rows():
    for pattern in patterns:
      assert any(_covers(pattern, n) for n in names), f"README names {pattern}, which is gone"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "igpt", "readers", "*.py"))),
                         ids=os.path.basename)
def test_readers_never_import_jax(path):
  assert not _third_party_imports(path) & {"jax", "jaxlib", "flax", "optax", "orbax"}


def test_model_and_losses_never_import_data_or_the_trainer():
  for module in ("model", "kernels", "losses", "objectives", "class_head"):
    imported = {_package(m) for m in _igpt_imports(os.path.join(REPO, "igpt", f"{module}.py"))}
    assert not imported & {"readers", "pipeline", "palette", "train", "run", "trained"}, module
