"""Value checks of recipe keys, and :class:`RecipeError`.

Each check is ``check(where, value) -> value`` (``where`` is the key path,
e.g. ``'dataset.val_fraction'``) and raises :class:`RecipeError` with a
one-line message that names the key, the value received and what is allowed.
Echoed values are capped (:func:`brief`): one over 80 characters is shown as
its first 60, '…' and its length, so a message stays readable.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import re
import sysconfig
import traceback
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from orchard_jax.config import SEED_MAX, ConfigError, brief, clip

Check = Callable[[str, Any], Any]


class RecipeError(ConfigError):
  """An invalid recipe, data source or command-line setting (one-line message).

  ``user_error`` is the exception a user's function (data loaders, a model
  builder) raised, when that is the cause, with its traceback starting at the
  user's function; ``orchard-jax ... --debug`` prints it.
  """

  user_error: BaseException | None = None


def show(value: Any) -> str:
  """The value (capped, see :func:`brief`) and its type: ``"'x' (str)"``."""
  return f"{brief(value)} ({type(value).__name__})"


def closest(word: Any, allowed: Iterable[str]) -> str:
  """``" (did you mean 'x'?)"`` for the closest allowed word, else ``""``."""
  if not isinstance(word, str):
    return ""
  match = difflib.get_close_matches(word, list(allowed), n=1, cutoff=0.6)
  return f" (did you mean {match[0]!r}?)" if match else ""


def refuse_unknown(where: str, data: Mapping, allowed: Iterable[str], what: str = "key") -> None:
  allowed = list(allowed)
  for key in data:
    if key not in allowed:
      prefix = "" if where == "recipe" else f"{where}."
      hint = closest(key, allowed) or f"; valid {what}s: {', '.join(allowed)}"
      raise RecipeError(f"unknown {what} '{prefix}{clip(str(key))}' in the recipe{hint}")


def as_mapping(where: str, data: Any) -> Mapping:
  if data is None:
    return {}
  if not isinstance(data, Mapping):
    raise RecipeError(f"{where} must be a mapping of keys to values, got {show(data)}")
  return data


def section(where: str, data: Any, schema: Mapping[str, Check]) -> dict[str, Any]:
  """Checks the keys present in ``data`` (a dataclass's defaults fill in the rest)."""
  data = as_mapping(where, data)
  refuse_unknown(where, data, schema)
  return {key: schema[key](f"{where}.{key}", value) for key, value in data.items()}


def renamed(build: Callable[[Mapping], Any], data: Mapping) -> Any:
  """Calls a config's ``from_dict``; its messages name recipe keys, not classes."""
  try:
    return build(data)
  except ConfigError as e:
    message = str(e).replace("TrainingConfig.", "training.").replace("OptunaConfig.", "optuna.")
    raise RecipeError(message) from None


# ------------------------------------------------------------------ checks --


def boolean(where: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise RecipeError(f"{where} must be true or false, got {show(value)}")
  return value


def text(where: str, value: Any) -> str:
  if not isinstance(value, str) or not value.strip():
    raise RecipeError(f"{where} must be a non-empty string, got {show(value)}")
  return value


def names(where: str, value: Any) -> tuple[str, ...]:
  if not isinstance(value, (list, tuple)):
    raise RecipeError(f"{where} must be a list of names, got {show(value)}")
  return tuple(text(f"{where}[{i}]", v) for i, v in enumerate(value))


def mapping(where: str, value: Any) -> dict[str, Any]:
  if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
    raise RecipeError(f"{where} must be a mapping with string keys, got {show(value)}")
  return dict(value)


_ENTRY = re.compile(r"[^:\s]+:[A-Za-z_][A-Za-z0-9_]*")


def is_entry_point(value: Any) -> bool:
  """Whether ``value`` reads as ``'module:function'`` or ``'path/file.py:function'``."""
  return isinstance(value, str) and _ENTRY.fullmatch(value) is not None


def entry_point(where: str, value: Any) -> str:
  if not is_entry_point(value):
    raise RecipeError(f"{where} must be 'module:function' or 'path/file.py:function', "
                      f"got {brief(value)}")
  return value


def optional(check: Check) -> Check:
  def checked(where: str, value: Any) -> Any:
    return None if value is None else check(where, value)
  return checked


def choice(options: tuple[str, ...], upper: bool = False) -> Check:
  def checked(where: str, value: Any) -> str:
    if isinstance(value, str) and upper:
      value = value.upper()
    if not isinstance(value, str) or value not in options:
      raise RecipeError(f"{where} must be one of {', '.join(map(repr, options))}, "
                        f"got {brief(value)}{closest(value, options)}")
    return value
  return checked


def integer(lo: int | None = None, hi: int | None = None) -> Check:
  """An integer ``>= lo`` (and, with ``hi``, ``<= hi``; then ``lo`` is required)."""
  def checked(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise RecipeError(f"{where} must be an integer, got {show(value)}")
    if hi is not None and not lo <= value <= hi:
      raise RecipeError(f"{where} must be in [{lo}, {hi}], got {brief(value)}")
    if lo is not None and value < lo:
      raise RecipeError(f"{where} must be >= {lo}, got {brief(value)}")
    return int(value)
  return checked


# A seed of numpy's and Optuna's samplers: an integer in [0, 2**32).
seed = integer(0, SEED_MAX)


def number(where: str, value: Any) -> float:
  """A finite float; numeric strings such as YAML's ``1e-5`` are parsed."""
  if isinstance(value, str):
    try:
      value = float(value)
    except ValueError:
      pass
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise RecipeError(f"{where} must be a finite number, got {show(value)}")
  return float(value)


def real(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
  def checked(where: str, value: Any) -> float:
    value = number(where, value)
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
      interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
      raise RecipeError(f"{where} must be in {interval}, got {brief(value)}")
    return value
  return checked


FOLDER_MAX = 100
_FOLDER = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{FOLDER_MAX - 1}}}")


def folder_name(where: str, value: Any) -> str:
  """One safe path component: no separator, not '.' or '..', not hidden, not too long.

  Letters and digits are ASCII only, so that the folder's name is the same on
  every file system and in every shell.
  """
  if not isinstance(value, str) or not _FOLDER.fullmatch(value):
    shown = brief(value) if isinstance(value, str) else show(value)
    raise RecipeError(f"{where} must be one folder name of 1 to {FOLDER_MAX} characters "
                      f"A-Z, a-z, 0-9, '.', '_' or '-', not starting with '.' or '-', got {shown}")
  return value


# ------------------------------------------------------------- conversions --


def hashable(value: Any) -> Any:
  """Lists become tuples (module attributes must hash); mappings stay dicts."""
  if isinstance(value, Mapping):
    return {k: hashable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(hashable(v) for v in value)
  return value


def plain(value: Any) -> Any:
  """Tuples become lists and mappings dicts, for ``yaml.safe_dump``."""
  if isinstance(value, Mapping):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  return value


# --------------------------------------------------------- the user's code --


_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "")


def _library_dirs() -> tuple[str, ...]:
  """Folders of code that is not the user's: the standard library, site-packages, orchard_jax."""
  paths = sysconfig.get_paths()
  dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
  return (*(os.path.join(os.path.realpath(d), "") for d in dirs), _PACKAGE)


def _users(filename: str, library: tuple[str, ...]) -> bool:
  return not filename.startswith("<") and not os.path.realpath(filename).startswith(library)


def _shown_file(path: str) -> str:
  """A source file in a message: relative to the working directory when inside it."""
  try:
    relative = os.path.relpath(path)
  except ValueError:  # another drive (Windows)
    return path
  return path if relative.startswith(os.pardir) else relative


def raised_at(e: BaseException, tb: TracebackType | None) -> str:
  """``" at file.py:12 in fn"``: where in the user's code ``e`` was raised, or ``""``.

  ``tb`` is the traceback from the user's function on. The place is the
  innermost frame outside the standard library, installed packages and
  orchard_jax (the user's line that called into, say, torch), else the first
  frame (the user's function, when it is itself an installed package). A
  ``SyntaxError`` names its own file and line.
  """
  if isinstance(e, SyntaxError) and e.filename and e.lineno:
    return f" at {clip(_shown_file(e.filename), 200)}:{e.lineno}"
  frames = list(traceback.walk_tb(tb))
  library = _library_dirs()
  chosen = next((f for f in reversed(frames) if _users(f[0].f_code.co_filename, library)), None)
  if chosen is None and frames and _users(frames[0][0].f_code.co_filename, (_PACKAGE,)):
    chosen = frames[0]
  if chosen is None:
    return ""
  frame, line = chosen
  return f" at {clip(_shown_file(frame.f_code.co_filename), 200)}:{line} in {frame.f_code.co_name}"


def user_code_error(message: str, e: BaseException, tb: TracebackType | None) -> RecipeError:
  """A :class:`RecipeError` for ``e``, raised in the user's code: ``message``, then where.

  ``tb`` is the traceback from the user's function on (the caller's
  ``e.__traceback__.tb_next``). Its frames from the first of the user's code on
  (import machinery dropped) become ``e``'s traceback, and ``e`` the error's
  ``user_error``; raise it ``from e``.
  """
  error = RecipeError(message + raised_at(e, tb))
  library, start = _library_dirs(), tb
  while start is not None and not _users(start.tb_frame.f_code.co_filename, library):
    start = start.tb_next
  error.user_error = e.with_traceback(start or tb)
  return error
