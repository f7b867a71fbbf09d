"""Recipe checks: :class:`RecipeError`, :class:`Section` (the base of the recipe's section
models) and value checks of recipe keys that are not fields of a model.

Every message is one line that names the key (``where``, the key path, e.g.
``'dataset.val_fraction'``), the value received and what is allowed. Echoed
values are capped (:func:`brief`): one over 80 characters is shown as its
first 60, '…' and its length, so a message stays readable.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import sysconfig
import traceback
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, ClassVar

from orchard_jax.config_base import ConfigError, Says, _Config, brief, clip, closest, show

Check = Callable[[str, Any], Any]


class RecipeError(ConfigError):
  """An invalid recipe, data source or command-line setting (one-line message).

  ``user_error`` is the exception a user's function (data loaders, a model
  builder) raised, when that is the cause, with its traceback starting at the
  user's function; ``orchard-jax ... --debug`` prints it.
  """

  user_error: BaseException | None = None


def unknown_key(where: str, key: Any, allowed: Iterable[str], what: str = "key") -> str:
  """The message of an unknown key of a section (``where``) or of the recipe (``'recipe'``)."""
  allowed = list(allowed)
  prefix = "" if where == "recipe" else f"{where}."
  hint = closest(key, allowed) or f"; valid {what}s: {', '.join(allowed)}"
  return f"unknown {what} '{prefix}{clip(str(key))}' in the recipe{hint}"


def refuse_unknown(where: str, data: Mapping, allowed: Iterable[str], what: str = "key") -> None:
  allowed = list(allowed)
  for key in data:
    if key not in allowed:
      raise RecipeError(unknown_key(where, key, allowed, what))


def as_mapping(where: str, data: Any) -> Mapping:
  if data is None:
    return {}
  if not isinstance(data, Mapping):
    raise RecipeError(f"{where} must be a mapping of keys to values, got {show(data)}")
  return data


class Section(_Config):
  """A recipe section's model (a validated pydantic dataclass, see
  :func:`orchard_jax.config_base.validated`): its messages name ``<section>.<key>`` and raise
  :class:`RecipeError`."""

  __slots__ = ()
  _SECTION: ClassVar[str] = "recipe"
  _ERROR = RecipeError
  _WORDS = {"int": Says("an integer"), "float": Says("a finite number"),
            "float?": Says("a finite number"), "finite": Says("a finite number"),
            "bool": Says("true or false"), "str": Says("a non-empty string"),
            "list": Says("a list of names"), "dict": Says("a mapping with string keys")}

  @classmethod
  def _where(cls) -> str:
    return cls._SECTION

  @classmethod
  def _unknown(cls, key: Any) -> str:
    return unknown_key(cls._SECTION, key, [f.name for f in dataclasses.fields(cls)])

  @staticmethod
  def _number(value: Any) -> Any:
    """Numbers of a recipe's float keys are floats (numeric strings too)."""
    if isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool):
      try:
        return float(value)
      except (ValueError, OverflowError):  # the type check names it
        pass
    return value


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


ENTRY = r"[^:\s]+:[A-Za-z_][A-Za-z0-9_]*"  # 'module:function' or 'path/file.py:function'
_ENTRY = re.compile(ENTRY)


def is_entry_point(value: Any) -> bool:
  """Whether ``value`` reads as ``'module:function'`` or ``'path/file.py:function'``."""
  return isinstance(value, str) and _ENTRY.fullmatch(value) is not None


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
