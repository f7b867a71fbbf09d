"""From a recipe, a data source and sampled parameters to the engine's :class:`TrialConfig`.

Models come from the registry (``architecture.name``) or from a function of
the user's (``architecture.function: 'pkg.module:build'`` or
``'path/file.py:build'``; ``optuna.model_pool`` entries ``'fn:pkg.module:build'``).
Such a function is called as ``build(num_classes, input_shape, **options)``:
``num_classes`` an int, ``input_shape`` the per-sample shape, channels last
(e.g. ``(28, 28, 1)``, or ``(F,)`` for feature rows), ``options`` the
recipe's ``architecture.options``, plus ``dropout=`` when the function has a
``dropout`` parameter (or ``**kwargs``) and a dropout is set or sampled. A
function without one gets no dropout: ``architecture.dropout`` set with it is
refused, and the search samples none for it. It returns a flax Linen module
(``__call__(x, train)``), a flax NNX module or a
:class:`~orchard_jax.models.Model`; every trial calls it again, and equal
modules share compiled steps.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from orchard_jax.config import TrialConfig
from orchard_jax.study.checks import RecipeError, show, user_code_error
from orchard_jax.study.model_names import (FUNCTION_PREFIX, accepts, function_where, input_side,
                                           model_function, signature_of, takes_dropout)
from orchard_jax.study.sources import one_line, resolve_function
from orchard_jax.study.space import apply_params

__all__ = ["architecture_for", "build_function_model", "model_for", "trial_config"]


def _absolute(name: str) -> str:
  """A model name with a function's file path made absolute (the resolved configuration of a
  trial, ``best_config.yaml``, is run from any folder, as worker processes re-load it)."""
  entry = model_function(name)
  if entry is None:
    return name
  target, _, attr = entry.rpartition(":")
  if target.endswith(".py") or os.sep in target or "/" in target:
    return f"{FUNCTION_PREFIX}{os.path.abspath(os.path.expanduser(target))}:{attr}"
  return name


def architecture_for(recipe: Any, params: Mapping[str, Any]) -> Any:
  """The recipe's ArchitectureSpec with the trial's ``model_name``/``dropout``.

  ``architecture.options`` apply only to the architecture the recipe names. A
  function's file path is made absolute. A function without a ``dropout``
  parameter gets no sampled dropout, nor the recipe's when it is a candidate of
  the model pool (the recipe's own function with ``architecture.dropout`` set is
  refused by :func:`model_for`).
  """
  arch = recipe.architecture
  name = params.get("model_name", arch.name)
  dropout = params.get("dropout", arch.dropout)
  if (name != arch.name or "dropout" in params) and not takes_dropout(name):
    dropout = None
  return dataclasses.replace(arch, name=_absolute(name), dropout=dropout,
                             options=arch.options if name == arch.name else {})


def model_for(arch: Any, source: Any, *, where: str | None = None) -> Any:
  """Builds ``arch`` for the source's classes, channels and resolution.

  ``where`` names a function's recipe key in messages (default
  ``architecture.function``).

  Raises:
    RecipeError: the registry refused the name, dropout, options or resolution, or the
      function could not be found, called or used (see :func:`build_function_model`).
  """
  entry = model_function(arch.name)
  if entry is not None:
    return build_function_model(entry, source.num_classes, source.input_shape,
                                dropout=arch.dropout, options=arch.options,
                                where=where or function_where(entry))
  from orchard_jax.models import build_model
  shape = source.input_shape
  in_channels = shape[-1] if len(shape) == 3 else None
  try:
    return build_model(arch.name, num_classes=source.num_classes, in_channels=in_channels,
                       dropout=arch.dropout, resolution=input_side(shape), **dict(arch.options))
  except (TypeError, ValueError) as e:
    raise RecipeError(f"architecture {arch.name!r} cannot be built with dropout={arch.dropout}, "
                      f"options={dict(arch.options)}: {' '.join(str(e).split())}") from None


# --------------------------------------------------------------- functions --


def build_function_model(entry: str, num_classes: int, input_shape: tuple[int, ...], *,
                         dropout: float | None = None, options: Mapping[str, Any] | None = None,
                         where: str | None = None) -> Any:
  """Calls the user's ``build(num_classes, input_shape, **options)`` and returns its model as a
  :class:`~orchard_jax.models.Model` (see the module docstring).

  Raises:
    RecipeError: in one line, naming ``entry``: the module, file or function does not exist
      (the closest name suggested), the signature cannot take these arguments, ``dropout`` is
      given to a function without a ``dropout`` parameter, the function raised (with the file
      and line in the user's code), or it returned something that is not a model.
  """
  from flax import linen as nn
  from orchard_jax.models import as_model

  where = where or function_where(entry)
  fn = resolve_function(entry, where)
  attr = entry.rpartition(":")[2]
  signature = signature_of(fn)
  kwargs = dict(options or {})
  if dropout is not None:
    if not accepts(signature, "dropout"):
      raise RecipeError(f"{where}: architecture.dropout is {dropout}, but {attr}{signature} has "
                        f"no dropout parameter; add one (or **kwargs) or set architecture.dropout: "
                        f"null")
    kwargs["dropout"] = dropout
  input_shape = tuple(int(d) for d in input_shape)
  if signature is not None:
    try:
      signature.bind(num_classes, input_shape, **kwargs)
    except TypeError as e:
      given = "".join(f", {k}=..." for k in kwargs)
      raise RecipeError(f"{where}: {attr}{signature} cannot be called as {attr}(num_classes, "
                        f"input_shape{given}): {e}; it must take (num_classes, input_shape, "
                        f"**options), options being architecture.options") from None
  try:
    out = fn(num_classes, input_shape, **kwargs)
  except Exception as e:  # the user's code
    raise user_code_error(f"{where} raised {one_line(e)}", e, e.__traceback__.tb_next) from e
  kinds = ("a flax Linen module (__call__(x, train)), a flax NNX module or a Model (init and "
           "apply)")
  if isinstance(out, type):
    raise RecipeError(f"{where} returned the class {out.__qualname__}, not an instance of it; "
                      f"it must return {kinds}")
  try:
    model = as_model(out)
  except TypeError as e:
    if isinstance(out, nn.Module):
      raise RecipeError(f"{where} returned a Linen module that cannot be trained: "
                        f"{' '.join(str(e).split())}") from None
    raise RecipeError(f"{where} returned {show(out)}; it must return {kinds}") from None
  try:
    hash(model)
  except TypeError as e:
    raise RecipeError(f"{where} returned a {type(out).__name__} that is not hashable ({e}); a "
                      f"Model must hash and compare by value, as jax.jit keys its compiled "
                      f"steps on it") from None
  return model


def trial_config(recipe: Any, source: Any, params: Mapping[str, Any], *, output_dir: Any,
                 reraise: bool = True) -> TrialConfig:
  """The TrialConfig of one trial (or, with ``params={}``, of a single training run)."""
  training = apply_params(recipe.training, params)
  loaders = source.loaders(training.batch_size, training.seed)
  fields: dict[str, Any] = {}
  if recipe.study is not None:
    fields["optuna"] = recipe.study.config
  return TrialConfig(
      model=model_for(architecture_for(recipe, params), source), train_loader=loaders.train,
      val_loader=loaders.val, num_classes=source.num_classes, training=training,
      log_interval=recipe.telemetry.log_interval, input_shape=source.input_shape,
      layout=source.layout, train_labels=source.train_labels, output_dir=output_dir,
      reraise_errors=reraise, **fields)
