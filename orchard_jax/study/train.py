"""A recipe without ``optuna:``: one training run, as the reference's second phase.

:func:`train_phase` trains ``training.epochs`` epochs with
:func:`orchard_jax.engine.fit` (early stopping after ``training.patience``
epochs without a new best) and evaluates the best epoch's parameters on the
validation split. The run folder gets ``fit/`` (the best state, orbax, and
``model.json``, from which :func:`orchard_jax.load_model` rebuilds the model),
``recipe.yaml`` (the recipe it ran, its paths relative to the folder: what
``orchard-jax evaluate`` and ``export`` read), ``metrics.json``,
``history.csv`` and ``training_curves.png``. The test split's evaluation and
the export are the next phases (:mod:`orchard_jax.study.final`), which
:func:`run_training` runs after it: ``orchard-jax run`` of a recipe without
``optuna:`` (a study's ``best_config.yaml`` among them).
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys
from typing import Any, NamedTuple

import yaml

from orchard_jax.fileio import atomic_write_text
from orchard_jax.study.build import architecture_for, trial_config
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.final import evaluate_phase, export_phase, run_phase, test_arrays
from orchard_jax.study.model_names import fits_input
from orchard_jax.study.objective import History
from orchard_jax.study.plots import plot_history

__all__ = ["METRICS_FILE", "RECIPE_FILE", "Trained", "run_training", "train_phase",
           "write_run_recipe"]

METRICS_FILE, RECIPE_FILE = "metrics.json", "recipe.yaml"


class Trained(NamedTuple):
  """What :func:`train_phase` leaves for the next phases."""
  state: Any                   # the best epoch's state (the last one's if no epoch was best)
  summary: dict[str, Any]      # metrics.json's content
  epochs_run: int


def _write_history(epochs: list[dict[str, float]], path: pathlib.Path) -> None:
  columns = list(dict.fromkeys(k for e in epochs for k in e))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(epochs)


def write_run_recipe(recipe: Any, run_dir: pathlib.Path) -> pathlib.Path:
  """``run_dir/recipe.yaml``: ``recipe`` with its paths relative to ``run_dir``."""
  from orchard_jax.study.best_files import relative_paths  # pylint: disable=import-outside-toplevel
  path = run_dir / RECIPE_FILE
  data = relative_paths(yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False)),
                        run_dir)
  atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
  return path


def _write_model_record(recipe: Any, source: Any, state: Any, folder: pathlib.Path) -> None:
  from orchard_jax.engine.inference import write_model_record  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.best_files import relative_paths  # pylint: disable=import-outside-toplevel
  architecture = architecture_for(recipe, {}).to_dict()
  write_model_record(folder, architecture=relative_paths({"architecture": architecture},
                                                         folder)["architecture"],
                     num_classes=source.num_classes, input_shape=source.input_shape,
                     layout=source.layout, precision=str(state.spec.policy),
                     model=" ".join(repr(state.spec.model).split())[:500])


def train_phase(recipe: Any, source: Any, run_dir: pathlib.Path, *,
                plots: bool = True) -> Trained:
  """Trains the recipe once, writes the run folder's training outputs (see the module
  docstring; ``training_curves.png`` only with ``plots``) and evaluates the best state on the
  validation split."""
  from orchard_jax.engine import evaluate, fit  # pylint: disable=import-outside-toplevel

  arch, training = recipe.architecture, recipe.training
  if not fits_input(arch.name, source.input_shape):
    raise RecipeError(f"architecture.name {arch.name!r} cannot take inputs of shape "
                      f"{source.input_shape} (channels last); use 'mlp' for feature vectors")
  run_dir.mkdir(parents=True, exist_ok=True)
  write_run_recipe(recipe, run_dir)
  result = fit(trial_config(recipe, source, {}, output_dir=run_dir))
  history = History.from_logs(result.history)
  state = result.best_state if result.best_state is not None else result.state
  if result.checkpoint_dir is not None:
    _write_model_record(recipe, source, state, result.checkpoint_dir)
  loaders = source.loaders(training.batch_size, training.seed)
  summary = {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
             "epochs": training.epochs, "stopped_early": result.stopped_early,
             "monitor_metric": training.monitor_metric,
             "checkpoint": None if result.checkpoint_dir is None else str(result.checkpoint_dir),
             "val": evaluate(state, loaders.val, layout=source.layout)}
  atomic_write_text(run_dir / METRICS_FILE, json.dumps(summary, indent=2) + "\n")
  _write_history(history.epochs, run_dir / "history.csv")
  if plots:
    plot_history(history.epochs, run_dir / "training_curves.png", training.monitor_metric,
                 f"{arch.name} on {source.name}")
  return Trained(state, summary, len(result.history))


def _line(metrics: dict[str, float]) -> str:
  return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run_training(recipe: Any, source: Any, run_dir: pathlib.Path, out: Any = None, *,
                 plots: bool = True, export: bool = True, quantize: bool = False) -> int:
  """Trains the recipe once, evaluates it on the validation and test splits (with TTA when
  ``training.use_tta``) and, with ``export``, exports it (``quantize``: the int8 ONNX file
  too): the phases ``train``, ``evaluate``, ``export``, each named when it fails
  (:class:`~orchard_jax.study.final.PhaseFailed`). Prints a summary; returns 0."""
  out = out or sys.stdout
  training = recipe.training
  trained = run_phase("train", run_dir, train_phase, recipe, source, run_dir, plots=plots)
  model = str(trained.summary["checkpoint"] or run_dir)
  report = run_phase("evaluate", run_dir, evaluate_phase, trained.state, recipe, source, run_dir,
                     model=model, plots=plots)
  summary = trained.summary
  print(f"\nTrained {recipe.architecture.name} for {trained.epochs_run}/{training.epochs} "
        f"epochs; best {training.monitor_metric} at epoch {summary['best_epoch']}.", file=out)
  print(f"Validation: {_line(summary['val'])}", file=out)
  if report is None:
    print("Test:       (no test split)", file=out)
  else:
    keys = ("loss", "accuracy", "auc", "f1")
    print(f"Test:       {_line({k: report['without_tta'][k] for k in keys})}", file=out)
    if report["with_tta"] is not None:
      print(f"Test, TTA:  {_line({k: report['with_tta'][k] for k in keys})}", file=out)
  exported = run_phase("export", run_dir, export_phase, run_dir, run_dir, out,
                       test_data=test_arrays(source), quantize=quantize) if export else []
  files = ["metrics.json", "history.csv", *(["training_curves.png"] if plots else []), "fit/",
           "recipe.yaml"]
  if report is not None:
    files += ["test_report.json", "test_report.txt"]
    files += ["confusion_matrix*.png"] if plots else []
  if exported:
    files.append("export/ (" + ", ".join(p.name for p in exported) + ")")
  print(f"Outputs in {run_dir}: {', '.join(files)}", file=out)
  return 0
