"""The command line of the phases after a study: ``run``'s ``--final`` and ``--no-export``,
and the ``evaluate`` and ``export`` commands (their work: :mod:`orchard_jax.study.phases`).

Only argparse here, so that ``orchard-jax --help`` answers without importing JAX.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["FINAL_MODES", "add_commands", "add_run_options"]

FINAL_MODES = ("training", "trial", "off")


def add_run_options(run: argparse.ArgumentParser) -> None:
  """``run``'s options for the phases after the search."""
  run.add_argument("--final", choices=FINAL_MODES, default="training",
                   help="after the search, train the best trial's configuration for "
                        "training.epochs epochs with early stopping (training, the default, as "
                        "the reference), for the trial's own optuna.epochs (trial), or not at "
                        "all (off); then evaluate it on the test split and export it, into "
                        "<run folder>/retrain")
  run.add_argument("--no-export", dest="export", action="store_false",
                   help="do not export the trained model (StableHLO, ONNX)")
  run.add_argument("--quantize", action="store_true",
                   help="export an int8 dynamically quantised ONNX file too, with its test "
                        "accuracy next to the float file's")
  run.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every finished trial's checkpoint in <run folder>/trials (default: "
                        "only the best trial's, and the running trials')")


def _command(name: str, setup: Any):
  def run(args: argparse.Namespace) -> int:
    from orchard_jax.study import phases  # pylint: disable=import-outside-toplevel
    return phases.guarded(getattr(phases, f"{name}_command"), args, setup)
  return run


def add_commands(commands: Any, debug_argument: Any, setup: Any) -> None:
  """The ``evaluate`` and ``export`` commands (``debug_argument(parser, help)`` adds
  ``--debug``; ``setup(recipe, debug=)`` makes the command's process-wide settings)."""
  evaluate = commands.add_parser(
      "evaluate", help="write the test report of a run folder's model",
      description="Evaluate the model of a run folder (a study's best_model/, a training run's "
                  "fit/, such as a study's retrain/) on the test split of the recipe it "
                  "recorded, without and (with training.use_tta, or --tta) with test-time "
                  "augmentation; writes test_report.json, test_report.txt and "
                  "confusion_matrix*.png into RUN.")
  evaluate.add_argument("run_dir", metavar="RUN", help="the run folder")
  evaluate.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="evaluate with the TTA ensemble too, or not (default: the "
                             "recipe's training.use_tta)")
  debug_argument(evaluate, "show Python tracebacks of unexpected errors")
  evaluate.set_defaults(func=_command("evaluate", setup))
  export = commands.add_parser(
      "export", help="export a run folder's model to StableHLO and ONNX",
      description="Export the model of a run folder (a study's best_model/, a training run's "
                  "fit/) to RUN/export/: a StableHLO file (jax.export) and an ONNX file, each "
                  "checked against the JAX model on 10 seeded inputs, the ONNX file timed in "
                  "onnxruntime and scored on the test split; export.json holds the figures. "
                  "Needs the export extra: pip install -e "
                  "'.[export]'.")
  export.add_argument("run_dir", metavar="RUN", help="the run folder")
  export.add_argument("--quantize", action="store_true",
                      help="also write model_quantized.onnx (int8 dynamic quantisation), with "
                           "its test accuracy next to the float file's")
  debug_argument(export, "show Python tracebacks of unexpected errors")
  export.set_defaults(func=_command("export", setup))
