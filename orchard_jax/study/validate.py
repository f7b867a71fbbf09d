"""``orchard-jax validate``: a recipe checked in full, without training.

:func:`validate_recipe` does what a run does before its first trial, and
then what each trial would do up to its first step, for the search space's
boundary configurations, with shapes only:

1. the recipe parses (:func:`~orchard_jax.study.recipe.load_recipe`, ``--set``
   included);
2. the data source resolves: the digits are split, an npz file is read, a
   loader function is called and its first batch read (once per batch size
   checked, as a study calls it);
3. the search space is built for the input (``optuna.model_pool`` and the
   architecture must fit it);
4. for every boundary configuration -- each model of the pool, the lowest and
   highest batch size and dropout, and every choice (lowest and highest value)
   of the other parameters, each at least once -- the trial's parameters are
   sampled through an ``optuna.trial.FixedTrial`` as a study samples them, its
   ``TrialConfig`` is built, the model is built, its whole training state is
   initialised with ``jax.eval_shape`` (traced, never compiled nor computed)
   and the model is applied, in training and evaluation mode, to a batch
   shaped like the data: its logits must be ``(batch, num_classes)``.

Nothing is trained, compiled or written: no run folder, no study storage, no
compilation cache. ``orchard-jax run`` and ``orchard-jax worker`` make the
same checks (steps 3 and 4, on the source they loaded) before they open the
study's storage (``run`` while the first trial's programs compile,
:mod:`orchard_jax.study.ahead`): a recipe that validate refuses starts no
trial. Every problem is a one-line
:class:`~orchard_jax.study.checks.RecipeError` (a ``ConfigError``) naming the
configuration; an error raised in the user's model code ends with its file
and line, and is the error's ``user_error``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from orchard_jax.config import ConfigError
from orchard_jax.study.build import trial_config
from orchard_jax.study.checks import RecipeError, user_code_error
from orchard_jax.study.model_names import takes_dropout
from orchard_jax.study.recipe import Recipe, load_recipe
from orchard_jax.study.sources import load_source, one_line
from orchard_jax.study.space import FloatRange, IntRange, SearchSpace, build_space

__all__ = ["Validation", "boundary_params", "validate", "validate_recipe"]


@dataclasses.dataclass(frozen=True)
class Validation:
  """What :func:`validate` checked: the recipe, its source, the models and configurations."""
  recipe: Recipe
  source: Any
  models: tuple[str, ...]
  configurations: tuple[dict[str, Any], ...]  # the sampled parameters of each ({} for a run)
  batch_sizes: tuple[int, ...]

  def summary(self) -> str:
    """One line: the data, the models and how many configurations were checked."""
    splits = getattr(self.source, "splits", None)
    sizes = "" if splits is None else " (" + ", ".join(
        f"{len(y)} {name}" for name, (_, y) in splits.items()) + ")"
    shape = "x".join(map(str, self.source.input_shape))
    data = f"{self.source.name}{sizes}, inputs {shape}, {self.source.num_classes} classes"
    models = ", ".join(self.models)
    count = len(self.configurations)
    what = ("search-space configuration" if self.recipe.study is not None
            else "training configuration")
    batches = "/".join(map(str, self.batch_sizes))
    return (f"{data}; model{'s' if len(self.models) > 1 else ''} {models}; {count} {what}"
            f"{'s' if count > 1 else ''} checked (batch size {batches}), nothing trained")


def validate_recipe(path: str | os.PathLike | None = None, sets: Sequence[str] = ()) -> Validation:
  """Loads the recipe at ``path`` (None: the bundled one) with ``--set``-style ``sets``, and
  checks it with :func:`validate`.

  Raises:
    RecipeError: in one line, the first problem found (see the module docstring).
    orchard_jax.config.ConfigError: a value the configuration refuses.
  """
  return validate(load_recipe(path, sets))


def validate(recipe: Recipe, source: Any = None) -> Validation:
  """Checks a parsed recipe's data, search space and models without training (see the module
  docstring); returns what was checked. ``source``, the recipe's data source already loaded
  (``orchard-jax run`` checks so before its first trial), skips step 2."""
  training = recipe.training
  if source is None:
    source = load_source(recipe.dataset, batch_size=training.batch_size, seed=training.seed)
  if recipe.study is None:
    configurations = [{}]
    models = (recipe.architecture.name,)
  else:
    space = build_space(recipe.study, source.input_shape, recipe.architecture.name)
    configurations = [_sampled(space, values, recipe) for values in boundary_params(space)]
    models = space.model_pool or (recipe.architecture.name,)
  batch_sizes = set()
  for params in configurations:
    batch_sizes.add(_check(recipe, source, params))
  return Validation(recipe, source, tuple(models), tuple(configurations),
                    tuple(sorted(batch_sizes)))


# ---------------------------------------------------------- configurations --


def _extremes(dist: Any) -> list[Any]:
  """A range's lowest and highest value (on its step), or a choice's values (numbers: the
  lowest and highest)."""
  if isinstance(dist, IntRange):
    return sorted({dist.low, dist.low + (dist.high - dist.low) // dist.step * dist.step})
  if isinstance(dist, FloatRange):
    high = dist.high
    if dist.step is not None:
      high = dist.low + math.floor((dist.high - dist.low) / dist.step + 1e-9) * dist.step
      high = float(f"{high:.12g}")
    return sorted({dist.low, high})
  values = list(dist)
  if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
    return sorted({min(values), max(values)})
  return values


def boundary_params(space: SearchSpace) -> list[dict[str, Any]]:
  """The values a ``FixedTrial`` gives :meth:`SearchSpace.sample` for each boundary
  configuration.

  Every model of the pool is combined with the lowest and highest batch size
  and dropout (a model without a ``dropout`` parameter: one dropout, which it
  ignores); every other parameter takes each of its extreme values (or
  choices) in turn, so that each appears in at least one configuration.
  """
  crossed = {name: _extremes(space.dists[name]) for name in ("batch_size", "dropout")
             if name in space.dists}
  others = {name: _extremes(dist) for name, dist in space.dists.items() if name not in crossed}
  base = []
  for model in space.model_pool or (None,):
    axes = dict(crossed)
    if "dropout" in axes and model is not None and not takes_dropout(model):
      axes["dropout"] = axes["dropout"][:1]
    for combination in itertools.product(*axes.values()):
      values = dict(zip(axes, combination))
      if model is not None:
        values["model_name"] = model
      base.append(values)
  count = max([len(base), *(len(v) for v in others.values())])
  return [{**base[k % len(base)], **{n: v[k % len(v)] for n, v in others.items()}}
          for k in range(count)]


def _sampled(space: SearchSpace, values: Mapping[str, Any], recipe: Recipe) -> dict[str, Any]:
  """The parameters a study's trial would have with ``values``."""
  import optuna  # pylint: disable=import-outside-toplevel
  return space.sample(optuna.trial.FixedTrial(dict(values)), recipe.training)


# ------------------------------------------------------------------ checks --


def _abstract(jitted: Any, args: Any, *, static: tuple = (), **_: Any):
  """``create_train_state``'s ``compiled``: the build program's output shapes, traced only."""
  return lambda *a: jitted.eval_shape(*static, *a)


@functools.cache
def _jitted_apply() -> Any:
  """The jitted apply whose traces the checks share (made at first use)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda model, train, p, s, x: model.apply(p, s, x, train=train,
                                                          rng=jax.random.key(0)),
                 static_argnums=(0, 1))


def _apply_shape(model: Any, train: bool, params: Any, model_state: Any, sample: Any) -> Any:
  """The output shapes of ``model.apply`` on ``sample``, traced only, and once per model,
  mode and shapes: configurations that differ only in values (learning rate, weight decay,
  ...) share the trace."""
  return _jitted_apply().eval_shape(model, train, params, model_state, sample)


def _named(params: Mapping[str, Any], recipe: Recipe) -> str:
  """The configuration in messages: its model and the sampled values that shape the program."""
  model = params.get("model_name", recipe.architecture.name)
  shown = ", ".join(f"{k}={v!r}" for k, v in params.items() if k in _SHOWN)
  return f"model {model!r}" + (f" with {shown}" if shown else "")


_SHOWN = ("batch_size", "dropout", "optimizer_type", "criterion_type", "mixup_alpha")


def _check(recipe: Recipe, source: Any, params: Mapping[str, Any]) -> int:
  """Builds one configuration's model and abstract state and checks its logits; returns the
  training batch size it checked."""
  # pylint: disable=import-outside-toplevel  # JAX and the engine: only once a recipe is read
  import jax
  import jax.numpy as jnp
  from orchard_jax.engine.first_state import state_from_config
  from orchard_jax.engine.trial import trial_training_config

  where = _named(params, recipe)
  cfg = trial_config(recipe, source, params, output_dir=None)
  training = trial_training_config(cfg) if recipe.study is not None else cfg.training
  shape = tuple(cfg.input_shape)
  try:
    state = state_from_config(cfg.model, training, input_shape=shape,
                              num_classes=cfg.num_classes, compiled=_abstract)
  except ConfigError:
    raise
  except Exception as e:  # the model's code, the registry's or the user's
    raise user_code_error(f"{where}: the model cannot be initialised on inputs of shape {shape} "
                          f"(channels last): {one_line(e)}", e, e.__traceback__) from e
  model, classes = state.spec.model, state.spec.num_classes
  for batch, train in ((training.batch_size, True),
                       (getattr(source, "eval_batch_size", training.batch_size), False)):
    sample = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    mode = "training" if train else "evaluation"
    try:
      out = _apply_shape(model, train, state.params, state.model_state, sample)
    except Exception as e:  # pylint: disable=broad-except
      raise user_code_error(f"{where}: the model cannot be applied to a {mode} batch of shape "
                            f"{sample.shape}: {one_line(e)}", e, e.__traceback__) from e
    logits = out[0] if isinstance(out, (tuple, list)) and out else out
    got = getattr(logits, "shape", None)
    if got is None or tuple(got) != (batch, classes):
      what = (f"a {type(logits).__name__}" if got is None
              else f"logits of shape {tuple(got)}")
      raise RecipeError(f"{where}: the model returns {what} for a {mode} batch of shape "
                        f"{sample.shape}, expected logits of shape ({batch}, {classes}) for "
                        f"num_classes={classes}")
  return training.batch_size
