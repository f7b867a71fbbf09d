"""The machinery of validated configurations: frozen pydantic dataclasses with one-line errors.

:func:`validated` makes a class a frozen, keyword-only pydantic dataclass
whose every problem raises a :class:`ConfigError` in one line (the class, the
field, the value received and what is allowed), worded by :class:`_Config`;
:func:`clip`, :func:`brief`, :func:`show` and :func:`closest` cap and word the
values messages echo. :mod:`orchard_jax.config`'s classes and the recipe's
sections (:mod:`orchard_jax.study.checks`) are built on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar, get_args

import pydantic
import pydantic.dataclasses

__all__ = ["ConfigError", "Says", "brief", "clip", "closest", "show", "validated"]

_C = TypeVar("_C", bound="_Config")


class ConfigError(ValueError):
  """An invalid configuration value, unknown field or inconsistent combination."""


# Values that messages echo are capped: a value longer than SHOWN_MAX characters
# is shown as its first SHOWN_HEAD characters, '…' and its length.
SHOWN_MAX = 80
SHOWN_HEAD = 60


def clip(text: str, limit: int = SHOWN_MAX, length: int | None = None) -> str:
  """``text``, or when longer than ``limit`` its start, '…' and ``(N characters)``."""
  if len(text) <= limit:
    return text
  head = max(SHOWN_HEAD, limit - 20)
  return f"{text[:head]}… ({len(text) if length is None else length} characters)"


def brief(value: Any) -> str:
  """``repr(value)``, capped by :func:`clip` (a string's length is its own)."""
  try:
    text = repr(value)
  except Exception:  # e.g. an int of over 4300 digits, or a repr that raises
    bits = value.bit_length() if isinstance(value, int) else None
    text = f"<an int of {bits} bits>" if bits else f"<{type(value).__name__} object>"
  return clip(text, length=len(value) if isinstance(value, str) else None)


def show(value: Any) -> str:
  """The value (capped, see :func:`brief`) and its type: ``"'x' (str)"``."""
  return f"{brief(value)} ({type(value).__name__})"


def closest(word: Any, allowed: Any) -> str:
  """``" (did you mean 'x'?)"`` for the allowed word closest to ``word`` (case ignored), else
  ``""``."""
  if not isinstance(word, str):
    return ""
  lowered = {str(a).lower(): a for a in allowed}
  match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
  return f" (did you mean {lowered[match[0]]!r}?)" if match else ""


# --------------------------------------------------------------- messages --


@dataclasses.dataclass(frozen=True)
class Says:
  """Field metadata: what a type error of the field says is allowed, and how it shows the value
  (``<where> must be <allowed>, got <shown(value)>``)."""
  allowed: str
  shown: Callable[[Any], str] = show


# What a type error says, by pydantic's error type; fields of a recipe section word it as
# ``study.checks.Section._WORDS``.
_KINDS = {"int_type": "int", "float_type": "float", "finite_number": "finite", "bool_type": "bool",
          "string_type": "str", "string_pattern_mismatch": "str", "string_too_short": "str",
          "tuple_type": "list", "list_type": "list", "dict_type": "dict"}
_RANGES = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _allowed(field: Any) -> str:
  """A field's range from its constraints: ``'>= 1'``, ``'> 0'``, ``'in [0, 1)'``."""
  bounds = {k: getattr(m, k) for m in field.metadata for k in ("gt", "ge", "lt", "le")
            if hasattr(m, k)}
  number = str if int in (field.annotation, *get_args(field.annotation)) else (
      lambda x: format(x, "g"))
  lo, hi = bounds.get("gt", bounds.get("ge")), bounds.get("lt", bounds.get("le"))
  if hi is None:
    return f"{'>' if 'gt' in bounds else '>='} {number(lo)}"
  return (f"in {'(' if 'gt' in bounds else '['}{number(lo)}, {number(hi)}"
          f"{')' if 'lt' in bounds else ']'}")


_SETTINGS = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def validated(cls: type[_C] | None = None, *, eq: bool = True) -> Any:
  """Class decorator: a frozen, keyword-only pydantic dataclass that raises ``cls._ERROR``.

  Pydantic's ``ValidationError`` never leaves the constructor: its first error
  (an unknown field before any other, then in field order) becomes one line
  (:meth:`_Config._line`). Fields are keyword-only: a positional argument is a TypeError.
  """
  def make(cls: type[_C]) -> type[_C]:
    cls = pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=eq,
                                         config=_SETTINGS)(cls)
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(self: Any, **kwargs: Any) -> None:
      try:
        validate(self, **kwargs)
      except pydantic.ValidationError as e:
        fields = list(cls.__pydantic_fields__)  # unknown fields first, then in field order
        first = min(e.errors(), key=lambda x: fields.index(x["loc"][0])
                    if x["loc"] and x["loc"][0] in fields else -1)
        raise type(self)._ERROR(type(self)._line(first, kwargs)) from None
    cls.__init__ = __init__
    return cls
  return make if cls is None else make(cls)


class _Config:
  """Shared behaviour: one-line messages, dict I/O, replace."""

  __slots__ = ()
  _ERROR: ClassVar[type[ConfigError]] = ConfigError
  _WORDS: ClassVar[Mapping[str, Says]] = {
      "int": Says("an int"), "float": Says("a float"), "float?": Says("a float or None"),
      "finite": Says("a finite float", brief), "bool": Says("True or False"),
      "str": Says("a non-empty str"), "list": Says("a list"), "dict": Says("a mapping")}
  # Keys of the reference's section that orchard_jax does not read: why.
  _NOT_READ: ClassVar[Mapping[str, str]] = {}

  @classmethod
  def _where(cls) -> str:
    """What messages name before a field: the class (a recipe section: the section)."""
    return cls.__name__

  @classmethod
  def _unknown(cls, key: Any) -> str:
    """The message of an unknown field."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(key, str):
      return f"{cls.__name__} field names must be str, got {show(key)}"
    if key in cls._NOT_READ:
      return f"{cls.__name__} has no field {brief(key)}: {cls._NOT_READ[key]}; remove it"
    return f"{cls.__name__} has no field {brief(key)}" + (
        closest(key, names) or f"; valid fields: {', '.join(names)}")

  @classmethod
  def _line(cls, error: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """One pydantic error as one line: where, what is allowed, the value received."""
    kind, loc, value = error["type"], list(error["loc"]), error.get("input")
    problem = error.get("ctx", {}).get("error")
    if isinstance(problem, ConfigError):  # a section's, or a check of several fields: whole
      return str(problem)
    if kind == "unexpected_keyword_argument":
      return cls._unknown(loc[0])
    if "[key]" in loc:  # a mapping's key: the message is the mapping's
      loc, value, kind = loc[:1], data.get(loc[0]), "dict_type"
    where = cls._where() + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    field = cls.__pydantic_fields__[loc[0]] if loc else None
    if kind == "missing":
      return f"{where} is required; pass {loc[-1]}=..."
    if kind == "value_error":  # a field's own check: the text after the field's name
      text = str(problem)
      return f"{where}{'' if text.startswith('=') else ' '}{text}"
    if kind == "literal_error":  # a Literal, or an optional one (null allowed, said last)
      literal = next((a for a in get_args(field.annotation) if get_args(a)), field.annotation)
      options = get_args(literal)
      null = " or null" if literal is not field.annotation else ""
      return (f"{where} must be one of {', '.join(map(repr, options))}{null}, got "
              f"{brief(value)}{closest(value, options)}")
    if kind in _RANGES:
      return f"{where} must be {_allowed(field)}, got {brief(value)}"
    if kind in _KINDS:
      says = next((m for m in field.metadata if isinstance(m, Says)), None)
      if says is None or len(loc) > 1:
        word = _KINDS[kind]
        nullable = word == "float" and type(None) in get_args(field.annotation)
        says = cls._WORDS[word + "?" if nullable else word]
      return f"{where} must be {says.allowed}, got {says.shown(value)}"
    return f"{where} is invalid: {' '.join(error['msg'].split())}"

  @classmethod
  def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
    """Builds a config from a mapping, e.g. a recipe section from yaml.safe_load.

    Unknown keys are refused, naming the closest field. Missing keys take
    their defaults. For float fields a numeric string is parsed: PyYAML reads
    ``1e-6`` (no dot) as the string ``'1e-6'``, and reference recipes write
    ``min_lr: 1e-6``. Every other value must already have the right type.
    """
    if not isinstance(data, Mapping):
      raise cls._ERROR(f"{cls.__name__}.from_dict expects a mapping, got {show(data)}")
    for key in data:
      if not isinstance(key, str) or key not in cls.__pydantic_fields__:
        raise cls._ERROR(cls._unknown(key))
    floats = [n for n, f in cls.__pydantic_fields__.items()
              if float in (f.annotation, *get_args(f.annotation))]
    return cls(**{k: cls._number(v) if k in floats else v for k, v in data.items()})

  @staticmethod
  def _number(value: Any) -> Any:
    """A float field's value from a mapping: a numeric string as a float, else as it is (the
    type check names it)."""
    try:
      return float(value) if isinstance(value, str) else value
    except ValueError:
      return value

  def to_dict(self) -> dict[str, Any]:
    """Every field by name; ``from_dict(cfg.to_dict()) == cfg``."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def replace(self: _C, **changes: Any) -> _C:
    """A copy with ``changes`` applied, checked like a new config."""
    return dataclasses.replace(self, **changes)
