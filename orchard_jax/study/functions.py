"""Functions of the user's that recipes name: ``'pkg.module:function'`` or ``'path/file.py:function'``.

:func:`resolve_function` finds the data functions of ``dataset.function``
(:mod:`orchard_jax.study.sources`) and the model functions of
``architecture.function`` and ``optuna.model_pool`` (:mod:`orchard_jax.study.build`).
A module is imported with the working directory on ``sys.path``; a file is
executed once per process, or, inside a package (a folder with an
``__init__.py``), imported as that package's module. A recipe file's entries
were read from its folder first (:func:`orchard_jax.study.recipe.from_folder`,
with :func:`module_file`). A missing module, file or function gets the closest
existing name suggested (a module: else the ``path/to/module.py:function``
form); an error raised in the user's code ends with where it was raised
(:func:`~orchard_jax.study.checks.user_code_error`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import pkgutil
import sys
import zlib
from collections.abc import Callable
from typing import Any

from orchard_jax.study.checks import RecipeError, brief, clip, closest, user_code_error

__all__ = ["module_file", "one_line", "resolve_function"]


def _shown(path: str) -> str:
  """A path or entry point in a message: quoted, capped later than values (they run long)."""
  return clip(repr(path), 200)


def one_line(e: BaseException) -> str:
  """``'Type: message'`` on one line, the message capped at 160 characters."""
  return f"{type(e).__name__}: {clip(' '.join(str(e).split()), 160)}"


_FILE_MODULES: dict[str, Any] = {}  # real path -> module: a file is executed once per process


def _is_file_target(target: str) -> bool:
  return target.endswith(".py") or os.sep in target or "/" in target


def _file_hint(target: str) -> str:
  """``" (did you mean 'dir/x.py'?)"`` for the closest ``.py`` file in the target's folder."""
  folder = os.path.dirname(target)
  try:
    files = [name for name in os.listdir(folder or ".") if name.endswith(".py")]
  except OSError:
    return ""
  return closest(target, [os.path.join(folder, name) for name in files])


def _missing_target(target: str, e: BaseException) -> bool:
  """Whether ``e`` says that ``target`` itself (or a package above it) does not exist, rather
  than that something the module imports is missing."""
  missing = getattr(e, "name", None)
  return isinstance(e, ModuleNotFoundError) and bool(missing) and (
      target == missing or target.startswith(missing + "."))


def _module_hint(missing: str) -> str:
  """``" (did you mean 'pkg.x'?)"`` for the closest importable module to ``missing``."""
  parent, _, _ = missing.rpartition(".")
  try:
    paths = importlib.import_module(parent).__path__ if parent else None
    names = [m.name for m in pkgutil.iter_modules(paths)]
  except Exception:  # pylint: disable=broad-except  # only a hint
    return ""
  return closest(missing, [f"{parent}.{n}" if parent else n for n in names])


def _function_hint(module: Any, attr: str) -> str:
  names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
  return closest(attr, names)


def _in_package(path: str) -> tuple[str, str] | None:
  """``(root, 'pkg.sub.mod')`` for a ``.py`` file inside a package (its folder has an
  ``__init__.py``): the folder above its outermost package, and its module name; else None."""
  folder, name = os.path.split(path)
  parts = [] if name == "__init__.py" else [os.path.splitext(name)[0]]
  while os.path.isfile(os.path.join(folder, "__init__.py")):
    folder, package = os.path.split(folder)
    parts.insert(0, package)
  names_ok = len(parts) > 1 and all(part.isidentifier() for part in parts)
  return (folder, ".".join(parts)) if names_ok else None


def _import_package_file(path: str, root: str, name: str) -> Any:
  """The module ``name`` of the file ``path`` in a package, imported as such (its relative
  imports work) with ``root`` on ``sys.path``; refused when ``name`` is another file."""
  if root not in sys.path:
    sys.path.append(root)
  module = importlib.import_module(name)
  found = os.path.realpath(getattr(module, "__file__", None) or "")
  if found != path:
    raise RecipeError(f"{_shown(path)} is module {name!r} of a package, but {name!r} is "
                      f"imported from {_shown(found or '(no file)')}")
  return module


def _exec_file(target: str) -> Any:
  """The module of a ``.py`` file, executed once per process (so its classes stay the same
  objects: equal models of every trial share compiled steps) and kept in ``sys.modules``
  under its file name, or a unique one when another module has that name. A file inside a
  package (its folder has an ``__init__.py``) is imported as the package's module instead, the
  folder above the package on ``sys.path``: ``path/pkg/mod.py`` is ``pkg.mod``."""
  path = os.path.realpath(target)
  if path in _FILE_MODULES:
    return _FILE_MODULES[path]
  package = _in_package(path)
  if package is not None:
    _FILE_MODULES[path] = _import_package_file(path, *package)
    return _FILE_MODULES[path]
  name = os.path.splitext(os.path.basename(path))[0]
  same = sys.modules.get(name)
  if same is not None and os.path.realpath(getattr(same, "__file__", None) or "") == path:
    _FILE_MODULES[path] = same
    return same
  if same is not None or not name.isidentifier():
    name = f"_orchard_jax_user_{zlib.crc32(path.encode()):08x}_{name}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  _FILE_MODULES[path] = module
  return module


def resolve_function(entry: str, where: str | None = None) -> Callable[..., Any]:
  """Imports ``'module:function'`` or ``'path/file.py:function'``.

  ``where`` begins messages (default ``"dataset.function '<entry>'"``). A module is imported with the
  working directory on ``sys.path``; a file is executed once per process (see
  :func:`_exec_file`). A recipe file's entries were already read from its folder
  (:func:`orchard_jax.study.recipe.from_folder`): a relative file, or a module found there,
  is that folder's.

  Raises:
    RecipeError: the file, module or function does not exist (the closest
      name suggested) or the module raised while importing (with the file
      and line, see :func:`~orchard_jax.study.checks.raised_at`).
  """
  target, _, attr = entry.rpartition(":")
  where = where or f"dataset.function {_shown(entry)}"
  try:
    if _is_file_target(target):
      if not os.path.isfile(target):
        raise RecipeError(f"{where}: file not found: {clip(target, 200)}{_file_hint(target)}")
      module = _exec_file(target)
    else:
      if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
      module = importlib.import_module(target)
  except RecipeError:
    raise
  except Exception as e:  # the user's module: any import-time error
    if _missing_target(target, e):  # a close name, or where modules are looked for
      file = f"path/to/{target.replace('.', '/')}.py:{attr}"
      hint = _module_hint(e.name) or (
          f"; a module is found in the recipe's folder or the working directory "
          f"({clip(os.getcwd(), 120)}), a file anywhere by its path: {file!r}")
      raise RecipeError(f"{where}: cannot import {_shown(target)}: {one_line(e)}{hint}") from None
    raise user_code_error(f"{where}: cannot import {_shown(target)}: {one_line(e)}", e,
                          e.__traceback__.tb_next) from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise RecipeError(f"{where}: module {_shown(target)} has no function {brief(attr)}"
                      f"{_function_hint(module, attr)}")
  return fn


def module_file(folder: pathlib.Path, module: str) -> str | None:
  """The file of module ``'pkg.mod'`` in ``folder`` (``pkg/mod.py`` or ``pkg/mod/__init__.py``),
  or None when it is not there."""
  parts = module.split(".")
  if not all(part.isidentifier() for part in parts):
    return None
  base = pathlib.Path(folder).joinpath(*parts)
  for path in (base.parent / f"{parts[-1]}.py", base / "__init__.py"):
    if path.is_file():
      return os.path.normpath(path)
  return None
