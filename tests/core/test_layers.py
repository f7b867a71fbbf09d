"""orchard_jax.core holds only pure, jit-safe code: the layers as the README's layout says.

Every module under ``orchard_jax/core`` is parsed (not imported) and fails
the test if it imports a layer above the core (Optuna, torch, the config,
the engine, the study, the data adapter, the command line) or does file
I/O or keeps process-wide machinery (pickles, temporary files, threads,
databases, ``open()``, ``pathlib``, ``os``' file functions, numpy's file
functions). Nested imports count as much as top-level ones. A subprocess
also imports every core module and checks that none of those layers was
imported on the way (which catches an import through a helper module).
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

import orchard_jax

CORE = pathlib.Path(orchard_jax.__file__).parent / "core"

# Modules (and their submodules) a core module must not import, with why.
FORBIDDEN_MODULES = {
    "optuna": "Optuna belongs to the study and the engine",
    "torch": "torch belongs to the data adapter",
    "torchvision": "torch belongs to the data adapter",
    "orchard_jax.config": "the config sits above the core",
    "orchard_jax.engine": "the engine sits above the core",
    "orchard_jax.study": "the study sits above the core",
    "orchard_jax.data": "the data adapter sits above the core",
    "orchard_jax.cli": "the command line sits above the core",
    "orchard_jax.fileio": "file I/O",
    "orchard_jax.hostmem": "process-wide allocator settings",
    "pickle": "file I/O (pickles)",
    "shelve": "file I/O",
    "tempfile": "file I/O",
    "shutil": "file I/O",
    "sqlite3": "file I/O (a database)",
    "pathlib": "file I/O (paths)",
    "glob": "file I/O",
    "io": "file I/O",
    "threading": "process-wide machinery (threads)",
    "concurrent": "process-wide machinery (threads)",
    "multiprocessing": "process-wide machinery (processes)",
}
# Functions that touch the file system, by the module they are called through.
FILE_FUNCTIONS = {
    "os": {"open", "fdopen", "remove", "unlink", "rename", "replace", "makedirs", "mkdir",
           "rmdir", "removedirs", "listdir", "scandir", "walk", "stat", "lstat", "chmod", "chown",
           "link", "symlink", "readlink", "truncate", "utime", "fsync", "read", "write", "getcwd",
           "chdir"},
    "os.path": {"exists", "lexists", "isfile", "isdir", "islink", "getsize", "getmtime",
                "getatime", "getctime", "realpath", "samefile"},
    "io": {"open", "FileIO"},
    "builtins": {"open"},
    "numpy": {"load", "save", "savez", "savez_compressed", "loadtxt", "savetxt", "genfromtxt",
              "fromfile", "memmap"},
    "jax.numpy": {"load", "save", "savez"},
}
BUILTIN_FILE_CALLS = {"open"}
# Methods that read or write files whatever object they are called on (pathlib's, numpy's).
FILE_METHODS = {"read_text", "write_text", "read_bytes", "write_bytes", "tofile"}


def _forbidden(module: str) -> str | None:
  for name, why in FORBIDDEN_MODULES.items():
    if module == name or module.startswith(name + "."):
      return why
  return None


def _package(path: pathlib.Path, root: pathlib.Path) -> list[str]:
  """The dotted package of a module file under ``root`` (the directory holding orchard_jax)."""
  return list(path.relative_to(root).parts[:-1])


def violations(source: str, package: list[str], where: str) -> list[str]:
  """What in ``source`` (a module of ``package``) does not belong in the core, one line each.

  Each line names ``where`` (the module's path), the line number, and the import or call.
  """
  tree = ast.parse(source)
  found = []
  aliases: dict[str, str] = {}  # local name -> the module it stands for

  def report(node: ast.AST, what: str, why: str) -> None:
    found.append(f"{where}:{node.lineno}: {what} ({why})")

  for node in ast.walk(tree):  # the names imports bind, wherever they are
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.asname:  # `import numpy as np`: np stands for numpy
          aliases[alias.asname] = alias.name
        else:  # `import os.path`: os stands for os
          aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      for alias in node.names:
        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        why = _forbidden(alias.name)
        if why:
          report(node, f"import {alias.name}", why)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package[:len(package) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      for alias in node.names:
        # `from orchard_jax import config` imports the module orchard_jax.config.
        full = f"{module}.{alias.name}"
        why = _forbidden(module) or _forbidden(full)
        if why:
          report(node, f"from {'.' * node.level}{node.module or ''} import {alias.name}", why)
        elif alias.name in FILE_FUNCTIONS.get(module, ()):
          report(node, f"from {module} import {alias.name}", "file I/O")
    elif isinstance(node, ast.Call):
      func = node.func
      if isinstance(func, ast.Name) and func.id in BUILTIN_FILE_CALLS and func.id not in aliases:
        report(node, f"{func.id}()", "file I/O")
      elif isinstance(func, ast.Attribute):
        owner = _dotted(func.value, aliases)
        if owner is not None and func.attr in FILE_FUNCTIONS.get(owner, ()):
          report(node, f"{owner}.{func.attr}()", "file I/O")
        elif func.attr in FILE_METHODS:
          report(node, f".{func.attr}()", "file I/O")
      name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
      if name in ("__import__", "import_module") and node.args and isinstance(
          node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        why = _forbidden(node.args[0].value)
        if why:
          report(node, f"{name}({node.args[0].value!r})", why)
  return found


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
  """The module an expression such as ``os.path`` or ``np`` stands for, if it is a name chain."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  parts.append(aliases.get(node.id, node.id))
  return ".".join(reversed(parts))


def core_modules() -> list[pathlib.Path]:
  return sorted(CORE.rglob("*.py"))


def test_the_core_imports_no_layer_above_it_and_does_no_file_io():
  root = CORE.parents[1]
  found = []
  for path in core_modules():
    where = str(path.relative_to(root))
    found += violations(path.read_text(encoding="utf-8"), _package(path, root), where)
  assert not found, "orchard_jax/core must stay pure:\n" + "\n".join(found)


def test_importing_the_core_imports_no_layer_above_it():
  modules = [".".join(_package(p, CORE.parents[1]) + [p.stem]) for p in core_modules()
             if p.stem != "__init__"]
  code = ("import importlib, json, sys\n"
          f"for m in {modules!r}: importlib.import_module(m)\n"
          "print(json.dumps(sorted(sys.modules)))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  loaded = json.loads(proc.stdout.splitlines()[-1])
  above = [m for m in loaded if m.split(".")[0] in ("optuna", "torch", "torchvision")
           or m.startswith(("orchard_jax.config", "orchard_jax.engine", "orchard_jax.study",
                            "orchard_jax.data", "orchard_jax.cli"))]
  assert not above, f"importing orchard_jax.core imports {above}"


@pytest.mark.parametrize("source, expected", [
    ("import optuna", "import optuna (Optuna"),
    ("import torch.utils.data as tud", "import torch.utils.data (torch"),
    ("from orchard_jax.config import resolve_precision", "from orchard_jax.config import"),
    ("def f():\n  from orchard_jax import config", "2: from orchard_jax import config"),
    ("from .. import engine", "from .. import engine (the engine"),
    ("from ..study import recipe", "from ..study import recipe"),
    ("import pickle", "import pickle"),
    ("import threading", "import threading"),
    ("import concurrent.futures", "import concurrent.futures"),
    ("from pathlib import Path", "from pathlib import Path"),
    ("x = open('f')", "open() (file I/O)"),
    ("import os\nos.remove('f')", "2: os.remove()"),
    ("import os\nos.path.exists('f')", "os.path.exists()"),
    ("from os import makedirs\nmakedirs('d')", "from os import makedirs"),
    ("import numpy as np\nnp.save('f', 1)", "numpy.save()"),
    ("p.write_text('x')", ".write_text()"),
    ("import importlib\nimportlib.import_module('optuna')", "import_module('optuna')"),
    ("__import__('orchard_jax.study.recipe')", "__import__('orchard_jax.study.recipe')"),
])
def test_the_check_names_the_import_or_call(source, expected):
  found = violations(source, ["orchard_jax", "core"], "orchard_jax/core/m.py")
  assert len(found) == 1 and expected in found[0], found
  assert found[0].startswith("orchard_jax/core/m.py:")


def test_the_check_lets_pure_code_through():
  source = ("import jax\nimport jax.numpy as jnp\nimport numpy as np\nimport os\n"
            "from orchard_jax.core import optim\nfrom . import losses\n"
            "def f(x):\n  from orchard_jax.models import as_model\n"
            "  return jnp.asarray(np.load) + os.sep, open_count(x), x.read()\n")
  assert violations(source, ["orchard_jax", "core"], "m.py") == []
