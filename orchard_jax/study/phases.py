"""From recipe to model: the phases after a study, and ``orchard-jax evaluate`` / ``export``.

``orchard-jax run`` of a recipe with ``optuna:`` runs, as the reference's pipeline does:

1. ``search``: the study (:mod:`orchard_jax.study.runner`);
2. ``train``: the best trial's configuration (``best_config.yaml``) trained again, into the
   run folder's ``retrain/`` (what ``orchard-jax run best_config.yaml`` does) --
   ``--final training`` (the default, as the reference) for ``training.epochs`` epochs
   with early stopping, ``--final trial`` for the trial's own ``optuna.epochs`` (the stored
   trial again), ``--final off`` to stop after the search;
3. ``evaluate``: the test report of the retrained model, without and (``training.use_tta``)
   with TTA (:mod:`orchard_jax.study.report`);
4. ``export``: StableHLO and ONNX files in ``retrain/export/``, with the ``export`` extra
   (``--no-export`` skips it).

Each phase after the search also runs alone on an existing run folder:
``orchard-jax evaluate RUN`` and ``orchard-jax export RUN`` take the model
:func:`orchard_jax.load_model` finds there (a study's ``best_model/``, a training run's
``fit/``) and the data of the recipe it recorded (``best_config.yaml``, or a training run's
``recipe.yaml``). A phase that fails says so in one line that names it, and keeps what the
earlier phases wrote (exit status 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
from typing import Any

from orchard_jax.study.final import (PhaseFailed, evaluate_phase, export_phase, run_phase,
                                     test_arrays)

logger = logging.getLogger(__name__)

__all__ = ["check_phases", "evaluate_command", "export_command", "final_phases", "guarded",
           "model_recipe", "run_recipe"]

EXIT_FAILED = 1


def guarded(command: Any, args: argparse.Namespace, *rest: Any) -> int:
  """``command(args, *rest)``; a failed phase is its one line on stderr and exit status 1
  (with ``--debug``, its traceback too)."""
  try:
    return command(args, *rest)
  except PhaseFailed as e:
    if getattr(args, "debug", False):
      import traceback  # pylint: disable=import-outside-toplevel
      traceback.print_exception(e.error, file=sys.stderr)
    print(f"orchard-jax: error: {e}", file=sys.stderr)
    return EXIT_FAILED


def model_recipe(run_dir: pathlib.Path) -> Any:
  """The recipe of the model in ``run_dir``: a training run's ``recipe.yaml``, a study's
  ``best_config.yaml``.

  Raises:
    RecipeError: neither is there (a Python study's outputs, a ``fit`` folder of one's own).
  """
  from orchard_jax.study.checks import RecipeError  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.loading import checkpoint_folder  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.recipe import load_recipe  # pylint: disable=import-outside-toplevel
  try:
    folder = checkpoint_folder(run_dir)
  except FileNotFoundError as e:
    raise RecipeError(str(e)) from None
  name = "best_config.yaml" if folder.name == "best_model" else "recipe.yaml"
  path = folder.parent / name
  if not path.is_file():
    raise RecipeError(f"{run_dir} has no {name}, which names the data to evaluate on (a "
                      f"Python study's or fit's folder: evaluate from Python with "
                      f"orchard_jax.study.report.evaluate_run)")
  return load_recipe(path)


def evaluate_command(args: argparse.Namespace, setup: Any) -> int:
  """``orchard-jax evaluate RUN``: the test report of RUN's model; prints its summary."""
  from orchard_jax.study.loading import load_model  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.report import REPORT_TEXT  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.sources import load_source  # pylint: disable=import-outside-toplevel

  run_dir = pathlib.Path(args.run_dir)
  recipe = model_recipe(run_dir)
  if args.tta is not None:
    recipe = dataclasses.replace(recipe, training=recipe.training.replace(use_tta=args.tta))
  setup(recipe, debug=args.debug)
  source = load_source(recipe.dataset, batch_size=recipe.training.batch_size,
                       seed=recipe.training.seed)

  def evaluate() -> Any:
    loaded = load_model(run_dir)
    return evaluate_phase(loaded.train_state(), recipe, source, run_dir, model=str(loaded.path))

  report = run_phase("evaluate", run_dir, evaluate)
  if report is None:
    print(f"{source.name} has no test split: no test report", file=sys.stdout)
    return EXIT_FAILED
  print((run_dir / REPORT_TEXT).read_text(), end="")
  print(f"Written in {run_dir}: test_report.json, test_report.txt, confusion_matrix*.png")
  return 0


def export_command(args: argparse.Namespace, setup: Any) -> int:
  """``orchard-jax export RUN``: RUN's model in RUN/export/; exit status 1 when nothing was
  written."""
  from orchard_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.sources import load_source  # pylint: disable=import-outside-toplevel
  run_dir = pathlib.Path(args.run_dir)
  from orchard_jax.study.recipe import parse_recipe  # pylint: disable=import-outside-toplevel
  setup(parse_recipe({}), debug=args.debug)
  try:  # the test split, for the ONNX files' accuracy, when the run recorded its recipe
    recipe = model_recipe(run_dir)
    source = load_source(recipe.dataset, batch_size=recipe.training.batch_size,
                         seed=recipe.training.seed)
  except ConfigError:
    source = None
  written = run_phase("export", run_dir, export_phase, run_dir, run_dir, sys.stdout,
                      test_data=None if source is None else test_arrays(source),
                      quantize=args.quantize)
  if not written:
    return EXIT_FAILED
  print(f"Written in {run_dir / 'export'}: {', '.join(p.name for p in written)}")
  return 0


def check_phases(recipe: Any, source: Any) -> None:
  """What would fail the phases after training, checked before it: ``training.use_tta`` for
  inputs that are not images (a ``ConfigError``, in one line)."""
  from orchard_jax.study.final import tta_spec  # pylint: disable=import-outside-toplevel
  tta_spec(recipe.training, source.input_shape)


def run_recipe(recipe: Any, source: Any, run_dir: pathlib.Path, args: argparse.Namespace,
               out: Any = None) -> int:
  """A recipe without ``optuna:``: the phases train, evaluate, export."""
  from orchard_jax.study.train import run_training  # pylint: disable=import-outside-toplevel
  return guarded(lambda a: run_training(recipe, source, run_dir, out,
                                        export=getattr(a, "export", True),
                                        quantize=getattr(a, "quantize", False)), args)


def final_phases(recipe: Any, source: Any, run_dir: pathlib.Path, args: argparse.Namespace,
                 out: Any = None) -> int:
  """After a study that ended with a best trial: its configuration trained again, evaluated
  and exported (see the module docstring); returns the exit status."""
  from orchard_jax.study.outputs import RETRAIN_FILE  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.recipe import load_recipe  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.train import run_training  # pylint: disable=import-outside-toplevel

  out = out or sys.stdout
  mode = getattr(args, "final", "training")
  if mode == "off":
    return 0
  path = run_dir / RETRAIN_FILE
  if not path.is_file():
    print(f"No final run: {path} was not written (optuna.save_best_config is false)", file=out)
    return 0
  final = load_recipe(path)
  training, trial_epochs = final.training, recipe.study.config.epochs
  if mode == "trial":  # the trial's own schedule, never stopped early
    training = training.replace(epochs=trial_epochs,
                                mixup_epochs=min(training.mixup_epochs, trial_epochs),
                                patience=max(training.patience, trial_epochs))
    final = dataclasses.replace(final, training=training)
  which = ("the trial's own optuna.epochs" if mode == "trial" else
           f"training.epochs, early stopping after {training.patience} epochs without a new "
           f"best; --final trial trains the trial's {trial_epochs}")
  final_dir = pathlib.Path(final.telemetry.output_dir)
  logger.info("Final run: the best trial's configuration (%s) for %d epochs (%s) -> %s",
              path.name, training.epochs, which, final_dir)
  return guarded(lambda a: run_training(final, source, final_dir, out,
                                        plots=recipe.study.save_plots,
                                        export=getattr(a, "export", True),
                                        quantize=getattr(a, "quantize", False)), args)
