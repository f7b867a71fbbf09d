"""The package's shape: no import cycle between its modules, no module over a size limit.

Both read the source with :mod:`ast` (nothing is imported): an import counts
wherever it stands, inside a function included, since a function-level import
that closes a cycle is a cycle all the same, only a later one.
"""

from __future__ import annotations

import ast
import pathlib

import orchard_jax

PACKAGE = pathlib.Path(orchard_jax.__file__).resolve().parent
# The team's standard size of one module, the one `../shared/tools/structure.py orchard_jax 450`
# checks: a module longer than this holds more than one concern and is split along them.
MAX_LINES = 450


def _modules(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
  """Every module of ``package`` by its dotted name (a package by its own name)."""
  modules = {}
  for path in package.rglob("*.py"):
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
  """The absolute name of the module of a ``from ... import`` in ``importer``."""
  if level == 0:
    return module or ""
  parts = importer.split(".")
  if not is_package:
    parts = parts[:-1]
  parts = parts[:len(parts) - (level - 1)]
  return ".".join(parts + ([module] if module else []))


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """The package's modules each module imports, at any depth of its code.

  ``from pkg import name`` imports ``pkg.name`` when that is a module, else ``pkg``.
  """
  edges: dict[str, set[str]] = {name: set() for name in modules}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        edges[name].update(alias.name for alias in node.names if alias.name in modules)
      elif isinstance(node, ast.ImportFrom):
        base = _absolute(node.module, node.level, name, is_package)
        for alias in node.names:
          if f"{base}.{alias.name}" in modules:
            edges[name].add(f"{base}.{alias.name}")
          elif base in modules:
            edges[name].add(base)
    edges[name].discard(name)
  return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return components


def test_no_import_cycle():
  cycles = _cycles(_imports(_modules()))
  assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_over_the_size_limit():
  lengths = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
  over = sorted((n, name) for name, n in lengths.items() if n > MAX_LINES)
  assert not over, (f"modules over {MAX_LINES} lines: "
                    + ", ".join(f"{name} ({n})" for n, name in over))


def test_the_cycle_check_sees_an_import_inside_a_function(tmp_path):
  # the check itself, on a package of three modules: b closes a cycle with a function-level
  # relative import; c only imports a
  package = tmp_path / "pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "a.py").write_text("from pkg import b\n")
  (package / "b.py").write_text("def f():\n  from . import a\n  return a\n")
  (package / "c.py").write_text("import pkg.a\n")
  assert _cycles(_imports(_modules(package))) == [["pkg.a", "pkg.b"]]
