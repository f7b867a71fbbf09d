"""From a recipe, a data source and sampled parameters to the engine's :class:`TrialConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from orchard_jax.config import TrialConfig
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.space import apply_params, input_side

__all__ = ["History", "architecture_for", "model_for", "trial_config"]


class History:
  """Per-epoch records of one run, kept by wrapping ``train_epoch`` and ``evaluate``.

  ``epochs`` is a list of ``{"epoch", "train_loss", "val_<metric>"...}``
  dicts (JSON-ready floats); an epoch whose validation failed has no
  ``val_`` entries. Pass :meth:`train_fn` and :meth:`validate_fn` as the
  ``TrialConfig`` task adapters.
  """

  def __init__(self):
    self.epochs: list[dict[str, float]] = []

  def train_fn(self, state: Any, loader: Any, *, epoch: int, layout: str):
    from orchard_jax.engine import train_epoch
    state, loss = train_epoch(state, loader, epoch=epoch, layout=layout)
    self.epochs.append({"epoch": epoch, "train_loss": float(loss)})
    return state, loss

  def validate_fn(self, state: Any, loader: Any, *, epoch: int, layout: str):
    from orchard_jax.engine import evaluate
    metrics = evaluate(state, loader, epoch=epoch, layout=layout)
    if self.epochs and self.epochs[-1]["epoch"] == epoch:
      self.epochs[-1].update({f"val_{k}": float(v) for k, v in metrics.items()})
    return metrics


def architecture_for(recipe: Any, params: Mapping[str, Any]) -> Any:
  """The recipe's ArchitectureSpec with the trial's ``model_name``/``dropout``.

  ``architecture.options`` apply only to the architecture the recipe names.
  """
  arch = recipe.architecture
  name = params.get("model_name", arch.name)
  return dataclasses.replace(arch, name=name, dropout=params.get("dropout", arch.dropout),
                             options=arch.options if name == arch.name else {})


def model_for(arch: Any, source: Any) -> Any:
  """Builds ``arch`` for the source's classes, channels and resolution.

  Raises:
    RecipeError: the registry refused the name, dropout, options or resolution.
  """
  from orchard_jax.models import build_model
  shape = source.input_shape
  in_channels = shape[-1] if len(shape) == 3 else None
  try:
    return build_model(arch.name, num_classes=source.num_classes, in_channels=in_channels,
                       dropout=arch.dropout, resolution=input_side(shape), **dict(arch.options))
  except (TypeError, ValueError) as e:
    raise RecipeError(f"architecture {arch.name!r} cannot be built with dropout={arch.dropout}, "
                      f"options={dict(arch.options)}: {' '.join(str(e).split())}") from None


def trial_config(recipe: Any, source: Any, params: Mapping[str, Any], *, output_dir: Any,
                 history: History, reraise: bool = True) -> TrialConfig:
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
      layout=source.layout, train_labels=source.train_labels, train_epoch_fn=history.train_fn,
      validate_fn=history.validate_fn, output_dir=output_dir, reraise_errors=reraise, **fields)
