"""The field types of the configuration classes, and the checks they make.

Each check raises a ``ValueError`` with what follows the field's name in the
message (:class:`~orchard_jax.config_base._Config` words the rest): ints that
take numpy's, a dtype policy (parsed only when given, so that a config without
one never imports jax), a storage URL, and :class:`~orchard_jax.config.TrialConfig`'s
objects (a model, loaders, task adapters, shapes, devices, labels).
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

from orchard_jax.config_base import Says, brief, show

__all__ = ["Adapter", "Devices", "Fallback", "InputShape", "Int", "Labels", "Loader", "Name",
           "NoneAsZero", "OutputDir", "Precision", "Required", "RequiredInt", "Storage",
           "section"]


def _integral(value: Any) -> Any:
  """numpy's (any Integral's) ints become int; bools and the rest are left to the type check."""
  integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  return int(value) if integral else value


# Field types: ints (numpy's included) and non-empty strings (not only spaces).
Int = Annotated[int, BeforeValidator(_integral)]
Name = Annotated[str, Field(pattern=r"\S")]


# ------------------------------------------------- TrainingConfig, OptunaConfig --

_POLICY_MAX = 100  # 'params=bfloat16,compute=bfloat16,output=bfloat16' has 49


def _check_precision(value: str | None) -> str | None:
  """None, or a policy string that ``core.precision.parse_policy`` accepts.

  The parser is imported here, not at module level, so that loading or
  building a config without ``precision`` never imports jax.
  """
  if value is None:
    return None
  if len(value) > _POLICY_MAX:
    raise ValueError(
        f"must be a dtype policy str of at most {_POLICY_MAX} characters, such as "
        f"'bfloat16' or 'params=float32,compute=bfloat16,output=float32', got {brief(value)}")
  from orchard_jax.core.precision import parse_policy
  try:
    parse_policy(value)
  except ValueError as e:
    # parse_policy's message quotes the value: capped there too.
    raise ValueError(f"={brief(value)} is invalid: "
                     f"{str(e).replace(repr(value), brief(value))}") from e
  return value


def _zero_if_none(value: Any) -> Any:
  return 0.0 if value is None else value


_STORAGE = r"^(?:sqlite|memory|[A-Za-z][A-Za-z0-9+.\-]*://\S*)$"
_STORAGE_SAYS = Says(
    "'sqlite', 'memory' or a database URL such as 'postgresql://user:pass@host/db' or "
    "'sqlite:///path/study.db'",
    lambda v: brief(re.sub(r"//[^/@]*@", "//***@", v) if isinstance(v, str) else v))
Precision = Annotated[str | None, Says("None or a dtype policy str"),
                      AfterValidator(_check_precision)]
NoneAsZero = Annotated[float | None, BeforeValidator(_zero_if_none)]  # grad_clip: None is 0.0
Storage = Annotated[str, Field(pattern=_STORAGE), _STORAGE_SAYS]


# ------------------------------------------------------------------ TrialConfig --
# Objects rather than recipe values.


def _check(test: Callable[[Any], bool], allowed: str) -> AfterValidator:
  """A field check: None, or ``test(value)``; else '<field> must be <allowed>, got <value>'."""
  def check(value: Any) -> Any:
    if value is None:
      return None
    if not test(value):
      raise ValueError(f"must be {allowed}, got {show(value)}")
    return value
  return AfterValidator(check)


def _present(value: Any) -> Any:
  if value is None:
    raise ValueError("is required, got None")
  return value


def section(cls: type, *, optional: bool = False) -> BeforeValidator:
  """A field of the config class ``cls``: an instance, or a mapping given to its ``from_dict``
  (with ``optional``, also None)."""
  def check(value: Any) -> Any:
    if isinstance(value, Mapping):
      return cls.from_dict(value)
    if not isinstance(value, cls) and not (optional and value is None):
      article = "an" if cls.__name__[0] in "AEIOU" else "a"
      raise ValueError(f"must be {'None, ' if optional else ''}{article} {cls.__name__} or a "
                       f"mapping, got {show(value)}")
    return value
  return BeforeValidator(check)


def _is_count(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def _devices(value: Any) -> int | tuple[int, ...] | None:
  if value is None:
    return None
  if isinstance(value, int) and not isinstance(value, bool):
    if value < 1:
      raise ValueError(f"must be >= 1, got {brief(value)}")
    return value
  if isinstance(value, (list, tuple)) and value and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    return tuple(value)
  raise ValueError(f"must be None, a device count >= 1 or a non-empty list of device ids, "
                   f"got {show(value)}")


def _input_shape(value: Any) -> tuple[int, ...] | None:
  if value is None:
    return None
  if not isinstance(value, (tuple, list)) or not value or not all(map(_is_count, value)):
    raise ValueError(
        f"must be None or a non-empty tuple of ints >= 1 (the per-sample shape, channels "
        f"last, e.g. (28, 28, 1)), got {brief(value)}")
  return tuple(int(d) for d in value)


def _fallback(value: Any) -> Mapping[str, float] | None:
  if value is None:
    return None
  if not isinstance(value, Mapping) or not all(
      isinstance(k, str) and isinstance(v, numbers.Real)
      and not isinstance(v, bool) for k, v in value.items()):
    raise ValueError(
        f"must be None or a mapping of metric names (str) to numbers, got {brief(value)}")
  return MappingProxyType({k: float(v) for k, v in value.items()})


def _is_path(value: Any) -> bool:
  return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))


def _labels(value: Any) -> Any:
  if value is None:
    return None
  import numpy as np  # numpy only; loading a config never imports jax
  labels = np.asarray(value)
  if labels.dtype.kind not in "iu" or labels.ndim != 1 or labels.size == 0:
    raise ValueError(
        f"must be None or a non-empty 1-D array of integer class ids, "
        f"got dtype {labels.dtype}, shape {labels.shape}")
  return labels


_LOADER = ("an iterable of (inputs, labels) batches such as a torch DataLoader",
           lambda v: hasattr(v, "__iter__"))
Required = Annotated[Any, AfterValidator(_present)]
Loader = Annotated[Any, AfterValidator(_present), _check(_LOADER[1], _LOADER[0])]
Adapter = Annotated[Any, _check(callable, "None or a callable")]
RequiredInt = Annotated[Int, BeforeValidator(_present)]
InputShape = Annotated[Any, AfterValidator(_input_shape)]
Labels = Annotated[Any, AfterValidator(_labels)]
Fallback = Annotated[Any, AfterValidator(_fallback)]
OutputDir = Annotated[Any, _check(_is_path, "None or a non-empty path (str or os.PathLike)"),
                      AfterValidator(lambda v: None if v is None else os.fspath(v))]
Devices = Annotated[Any, AfterValidator(_devices)]
