"""The package map's import rules (docs/design.md, "Package map"): data flows one way, so a package may not
import the packages after it. Checked statically over every `import` in m3_jax/, including imports inside
functions (a lazy import is still a dependency)."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "m3_jax"

# package -> the m3_jax packages it must not import.
FORBIDDEN = {
    "models": {"data", "train", "eval", "convert", "cli", "checkpoint", "serve"},
    "data": {"models", "train", "eval", "convert", "cli", "serve"},
    "checkpoint": {"data", "train", "eval", "convert", "cli", "serve"},
    "eval": {"train", "cli"},
    "convert": {"train", "eval", "cli", "serve"},
    "train": {"eval", "convert", "cli", "serve"},
    "serve": {"train", "convert", "cli"},
}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  tree = ast.parse(path.read_text(), str(path))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "m3_jax":  # `from m3_jax import train` names the package in the alias
        found += [(node.lineno, f"m3_jax.{a.name}") for a in node.names]
      else:
        found.append((node.lineno, node.module))
  return found


def _package(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).parts
  return rel[0].removesuffix(".py") if len(rel) > 1 else rel[0].removesuffix(".py")


def _violations() -> list[str]:
  bad = []
  for path in sorted(ROOT.rglob("*.py")):
    own = _package(path)
    for line, name in _imports(path):
      parts = name.split(".")
      if parts[0] != "m3_jax" or len(parts) < 2:
        continue
      target = parts[1]
      if target == "cli" and own not in ("cli", "__main__"):  # `python -m m3_jax` is the CLI
        bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}: only the CLI imports the CLI")
      elif target in FORBIDDEN.get(own, ()):
        bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}: {own} must not import {target}")
  return bad


def test_no_forbidden_imports():
  bad = _violations()
  assert not bad, "forbidden imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("source,expected", [
    ("from m3_jax.train import objective\n", [(1, "m3_jax.train")]),
    ("def f():\n  import m3_jax.cli.eval\n", [(2, "m3_jax.cli.eval")]),
    ("from m3_jax import cli, models\n", [(1, "m3_jax.cli"), (1, "m3_jax.models")]),
    ("from . import x\n", []),
])
def test_the_checker_sees_lazy_and_from_imports(tmp_path, source, expected):
  f = tmp_path / "m.py"
  f.write_text(source)
  assert _imports(f) == expected
