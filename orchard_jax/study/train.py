"""A recipe without ``optuna:``: one training run, as the reference's second phase.

Trains ``training.epochs`` epochs with :func:`orchard_jax.engine.fit` (early
stopping after ``training.patience`` epochs without a new best), then
evaluates the best epoch's parameters on the validation and test splits.
The run folder gets ``fit/`` (the best state, orbax), ``metrics.json``,
``history.csv`` and ``training_curves.png``.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys
from typing import Any

from orchard_jax.study.build import trial_config
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.model_names import fits_input
from orchard_jax.study.objective import History
from orchard_jax.study.plots import plot_history

__all__ = ["run_training"]


def _write_history(epochs: list[dict[str, float]], path: pathlib.Path) -> None:
  columns = list(dict.fromkeys(k for e in epochs for k in e))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(epochs)


def _line(metrics: dict[str, float]) -> str:
  return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run_training(recipe: Any, source: Any, run_dir: pathlib.Path, out: Any = None) -> int:
  """Trains the recipe once and reports validation and test metrics; returns 0."""
  from orchard_jax.engine import evaluate, fit

  out = out or sys.stdout
  arch, training = recipe.architecture, recipe.training
  if not fits_input(arch.name, source.input_shape):
    raise RecipeError(f"architecture.name {arch.name!r} cannot take inputs of shape "
                      f"{source.input_shape} (channels last); use 'mlp' for feature vectors")
  run_dir.mkdir(parents=True, exist_ok=True)
  result = fit(trial_config(recipe, source, {}, output_dir=run_dir))
  history = History.from_logs(result.history)
  state = result.best_state if result.best_state is not None else result.state
  loaders = source.loaders(training.batch_size, training.seed)
  metrics = {"val": evaluate(state, loaders.val, layout=source.layout)}
  if loaders.test is not None:
    metrics["test"] = evaluate(state, loaders.test, layout=source.layout)
  summary = {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
             "stopped_early": result.stopped_early, "monitor_metric": training.monitor_metric,
             "checkpoint": None if result.checkpoint_dir is None else str(result.checkpoint_dir),
             **metrics}
  (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
  _write_history(history.epochs, run_dir / "history.csv")
  plot_history(history.epochs, run_dir / "training_curves.png", training.monitor_metric,
               f"{arch.name} on {source.name}")
  print(f"\nTrained {arch.name} for {len(result.history)}/{training.epochs} epochs; best "
        f"{training.monitor_metric} at epoch {result.best_epoch}.", file=out)
  print(f"Validation: {_line(metrics['val'])}", file=out)
  if "test" in metrics:
    print(f"Test:       {_line(metrics['test'])}", file=out)
  else:
    print("Test:       (no test split)", file=out)
  print(f"Outputs in {run_dir}: metrics.json, history.csv, training_curves.png, fit/", file=out)
  return 0
