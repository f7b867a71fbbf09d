"""The model names of recipes: the registry's, and ``fn:`` functions of the user's.

Which names there are (:func:`registry_names`), which fit an input shape
(:func:`fits_input`, :func:`default_pool` for model search), and which take a
dropout (:func:`takes_dropout`, which imports a user's function to read its
signature). The search space (:mod:`orchard_jax.study.space`) and the
building of models (:mod:`orchard_jax.study.build`) both ask.
"""

from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Any

from orchard_jax.study.checks import clip
from orchard_jax.study.functions import resolve_function

__all__ = ["FUNCTION_PREFIX", "accepts", "default_pool", "fits_input", "function_where",
           "input_side", "model_function", "registry_names", "signature_of", "takes_dropout"]

# Smallest input side of each model, for model search when the registry does not say.
_MIN_INPUT_SIDE = MappingProxyType({"mlp": 1, "mini_cnn": 4, "resnet_18": 8,
                                    "efficientnet_b0": 32, "convnext_tiny": 32, "vit_tiny": 16})

# A model name that is a function of the user's: 'fn:module:function' or 'fn:path/file.py:function'
# (architecture.function and optuna.model_pool entries; see orchard_jax.study.build).
FUNCTION_PREFIX = "fn:"


def model_function(name: str) -> str | None:
  """The ``'module:function'`` of a model name ``'fn:module:function'``; None for a registry name."""
  return name[len(FUNCTION_PREFIX):] if name.startswith(FUNCTION_PREFIX) else None


def registry_names() -> tuple[str, ...]:
  """The architectures :func:`orchard_jax.models.build_model` knows."""
  from orchard_jax import models
  names = getattr(models, "MODEL_NAMES", None)
  if names is None:  # a registry without MODEL_NAMES
    names = sorted(models._BUILDERS)  # pylint: disable=protected-access
  return tuple(names)


def input_side(input_shape: tuple[int, ...]) -> int | None:
  """The image side (min of height and width) of a channels-last shape; None for vectors."""
  return min(input_shape[:2]) if len(input_shape) == 3 else None


def fits_input(name: str, input_shape: tuple[int, ...]) -> bool:
  """Whether architecture ``name`` takes per-sample inputs of ``input_shape`` (channels last).

  A function of the user's is taken to fit: it receives the shape and builds for it.
  """
  if name == "mlp" or model_function(name) is not None:
    return True
  side = input_side(input_shape)
  return side is not None and side >= _MIN_INPUT_SIDE.get(name, 32)


def default_pool(input_shape: tuple[int, ...]) -> tuple[str, ...]:
  """Model search candidates: the registry's pool for the resolution (the reference's
  ``resnet_18``/``mini_cnn`` below 224 px, its four ImageNet models from 224 on), else
  every registry model; only those that fit the input."""
  from orchard_jax import models
  side, pool = input_side(input_shape), getattr(models, "available_models", None)
  names = pool(side) if callable(pool) and side is not None else registry_names()
  return tuple(n for n in names if fits_input(n, input_shape))


def function_where(entry: str) -> str:
  """The recipe key of a model function ``entry`` in messages."""
  return f"architecture.function {clip(repr(entry), 200)}"


def signature_of(fn: Any) -> inspect.Signature | None:
  """``fn``'s signature; None when it has none to read (a builtin: call it and see)."""
  try:
    return inspect.signature(fn)
  except (TypeError, ValueError):  # e.g. a builtin without a signature: call it and see
    return None


def accepts(signature: inspect.Signature | None, name: str) -> bool:
  """Whether a function of ``signature`` takes the keyword ``name`` (or ``**kwargs``); True
  for an unknown signature."""
  if signature is None:
    return True
  params = signature.parameters.values()
  return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             for p in params) or any(p.kind is p.VAR_KEYWORD for p in params)


def takes_dropout(name: str) -> bool:
  """Whether model ``name`` takes a dropout: every registry model; a function of the user's when
  it has a ``dropout`` parameter or ``**kwargs`` (it is imported to see)."""
  entry = model_function(name)
  return entry is None or accepts(signature_of(resolve_function(entry, function_where(entry))),
                                  "dropout")
