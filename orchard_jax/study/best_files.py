"""The best trial's files: ``best_config.yaml``, ``best_trial.yaml`` and ``best_model/``.

``best_config.yaml`` is a recipe that retrains the best trial of a recipe's
study, from the configuration stored with it (:func:`resolved_config`), its
paths relative to the run folder; ``best_trial.yaml`` describes the best trial
of a study of one's own objective (:func:`describe_trial`); ``best_model/`` is a
copy of the best trial's checkpoint (:func:`export_best_model`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
from typing import Any

import yaml
from optuna.trial import FrozenTrial

from orchard_jax.engine.inference import write_model_record
from orchard_jax.fileio import atomic_directory, atomic_write_text
from orchard_jax.records import (BEST_EPOCH, CHECKPOINT_ERROR, CONFIG, EPOCHS_RUN, SECONDS,
                                 TRIAL_CONFIG)
from orchard_jax.study.build import architecture_for
from orchard_jax.study.functions import module_file
from orchard_jax.study.space import apply_params

logger = logging.getLogger(__name__)

__all__ = ["best_config_dict", "best_config_text", "describe_trial", "described_text",
           "export_best_model", "model_record", "relative_paths", "remove_other_checkpoints",
           "resolved_config", "trained_precision", "write_best_config"]


def resolved_config(recipe: Any, params: dict[str, Any]) -> dict[str, Any]:
  """The recipe a trial with ``params`` trains: data paths absolute, the trial's architecture
  and training values; no ``optuna`` or ``telemetry`` section. Stored with each trial
  (user attribute ``config``) as it starts."""
  dataset = recipe.dataset
  if dataset.path is not None:
    dataset = dataclasses.replace(dataset, path=os.path.abspath(os.path.expanduser(dataset.path)))
  if dataset.function is not None:
    target, _, attr = dataset.function.rpartition(":")
    if target.endswith(".py") or "/" in target:
      dataset = dataclasses.replace(dataset, function=f"{os.path.abspath(target)}:{attr}")
  trial = dataclasses.replace(recipe, dataset=dataset, study=None,
                              architecture=architecture_for(recipe, params),
                              training=apply_params(recipe.training, params))
  data = trial.to_dict()
  data.pop("telemetry", None)
  return yaml.safe_load(yaml.safe_dump(data))  # plain, JSON-ready values


# A path is written relative to best_config.yaml when it climbs at most this many folders
# (outputs/<study>/ -> the project's files: they move together); one further away stays absolute.
RELATIVE_UP_MAX = 2


def _relative(path: str | None, base: pathlib.Path) -> str | None:
  """An absolute ``path`` as seen from the folder ``base`` (POSIX separators), unless it
  climbs more than :data:`RELATIVE_UP_MAX` folders; others as they are."""
  if path is None or not os.path.isabs(os.path.expanduser(path)):
    return path
  relative = pathlib.Path(os.path.relpath(os.path.expanduser(path), base))
  ups = next((i for i, part in enumerate(relative.parts) if part != ".."), len(relative.parts))
  return relative.as_posix() if ups <= RELATIVE_UP_MAX else path


def _working_directory_module(module: str) -> str | None:
  """The absolute file of ``module`` when it was imported from the working directory (not
  installed): a recipe elsewhere finds it only by its file."""
  loaded = sys.modules.get(module)
  file = module_file(pathlib.Path.cwd(), module) if loaded is not None else None
  same = file is not None and os.path.realpath(getattr(loaded, "__file__", None) or "") == \
      os.path.realpath(file)
  return os.path.abspath(file) if same else None


def _relative_entry(entry: str | None, base: pathlib.Path) -> str | None:
  """A ``'path/file.py:function'`` entry with an absolute file relative to ``base``; a module
  of the working directory's as its file, so (see :func:`_working_directory_module`)."""
  if not entry:
    return entry
  target, _, attr = entry.rpartition(":")
  if not os.path.isabs(target) and not target.endswith(".py") and "/" not in target:
    target = _working_directory_module(target) or target
  return f"{_relative(target, base)}:{attr}" if os.path.isabs(target) else entry


def relative_paths(config: dict[str, Any], base: pathlib.Path) -> dict[str, Any]:
  """``config`` (a recipe's data) with ``dataset.path``, the files of ``dataset.function`` and
  ``architecture.function``, and ``telemetry.output_dir`` relative to the folder ``base``
  (where the recipe file lives)."""
  base = base.absolute()
  fixes = {("dataset", "path"): _relative, ("dataset", "function"): _relative_entry,
           ("architecture", "function"): _relative_entry,
           ("telemetry", "output_dir"): _relative}
  out = dict(config)
  for (section, key), fix in fixes.items():
    if isinstance(out.get(section), dict) and out[section].get(key):
      out[section] = {**out[section], key: fix(out[section][key], base)}
  return out


def best_config_dict(recipe: Any, trial: FrozenTrial, run_dir: pathlib.Path) -> dict[str, Any]:
  """The recipe that retrains ``trial``: the configuration stored with it (parameters,
  data, architecture, ``training.epochs``), no optuna; the run's telemetry, writing to
  ``run_dir/retrain``. Its paths are relative to ``run_dir``, where ``best_config.yaml``
  lives (``load_recipe`` reads a recipe file's relative paths from its folder)."""
  config = trial.user_attrs.get(CONFIG)
  if config is None:  # a trial stored before configurations were
    logger.warning("Trial %d has no stored configuration; best_config.yaml is rebuilt from the "
                   "current recipe and the trial's parameters", trial.number)
    config = resolved_config(recipe, trial.params)
  telemetry = dataclasses.replace(recipe.telemetry, output_dir=str((run_dir / "retrain").absolute()))
  config = {**config, "telemetry": dataclasses.asdict(telemetry)}
  return relative_paths(config, run_dir)


def best_config_text(recipe: Any, trial: FrozenTrial, path: pathlib.Path) -> str:
  """The text of ``best_config.yaml`` at ``path``: a header saying how to retrain, then
  :func:`best_config_dict`."""
  metric = recipe.training.monitor_metric
  header = (f"# Best trial {trial.number} of study {recipe.study.config.study_name!r}: "
            f"{metric} = {trial.value:.6f} after {recipe.study.config.epochs} trial epochs.\n"
            f"# A recipe without an optuna section: one training run of training.epochs epochs\n"
            f"# with the best trial's hyperparameters, reporting validation and test metrics\n"
            f"# (test_report.json) and exporting the model (export/); orchard-jax run of the\n"
            f"# study does it after the search, into retrain/ (paths are relative to this file):\n"
            f"#   orchard-jax run {path}\n")
  return header + yaml.safe_dump(best_config_dict(recipe, trial, path.parent), sort_keys=False)


def write_best_config(recipe: Any, trial: FrozenTrial, run_dir: pathlib.Path) -> pathlib.Path:
  path = run_dir / "best_config.yaml"
  atomic_write_text(path, best_config_text(recipe, trial, path))
  return path


def _plain(value: Any) -> Any:
  """``value`` as YAML/JSON-ready data (tuples as lists; anything else as its ``repr``)."""
  try:
    return yaml.safe_load(yaml.safe_dump(value))
  except yaml.YAMLError:
    return repr(value)


def describe_trial(trial: FrozenTrial, metric: str) -> dict[str, Any]:
  """The best trial of a study of one's own objective: number, value, parameters, its scalar
  attributes and, when recorded, its ``trial_config``."""
  scalars = {k: v for k, v in trial.user_attrs.items()
             if k in (BEST_EPOCH, EPOCHS_RUN, SECONDS, CHECKPOINT_ERROR)}
  config = trial.user_attrs.get(TRIAL_CONFIG)
  return {"trial": trial.number, "metric": metric, "value": trial.value,
          "params": _plain(dict(trial.params)), **scalars,
          **({"trial_config": config} if config is not None else {})}


def described_text(study: Any, trial: FrozenTrial, metric: str) -> str:
  """The text of ``best_trial.yaml``: a header, then :func:`describe_trial`."""
  header = (f"# Best trial {trial.number} of study {study.study_name!r}: {metric} = "
            f"{trial.value:.6f}.\n"
            f"# Its parameters and, when run_trial recorded it, what\n"
            f"# its TrialConfig held; best_model/ holds its best epoch's state.\n")
  return header + yaml.safe_dump(describe_trial(trial, metric), sort_keys=False)


def remove_other_checkpoints(trials: Any, best: FrozenTrial | None,
                             folder_of: Any) -> list[pathlib.Path]:
  """Deletes the checkpoint folders (``folder_of(trial)/trial_<n>``) of the finished trials
  that are not ``best``; returns those it removed. A running trial's is kept (it may become
  the best), and so is the best's: the one checkpoint policy of a study, on the command
  line and in Python, unless it is asked to keep every trial's."""
  removed = []
  for t in trials:
    if not t.state.is_finished() or (best is not None and t.number == best.number):
      continue
    folder = folder_of(t)
    path = None if folder is None else pathlib.Path(folder) / f"trial_{t.number}"
    if path is not None and path.is_dir():
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def trained_precision(training: dict[str, Any] | None) -> str:
  """The dtype policy a recorded ``training`` section ran with on this process's backend."""
  import jax  # pylint: disable=import-outside-toplevel
  from orchard_jax.config import TrainingConfig, resolve_precision  # pylint: disable=import-outside-toplevel
  return resolve_precision(TrainingConfig.from_dict(training or {}), jax.default_backend())


def model_record(trial: FrozenTrial, folder: pathlib.Path) -> dict[str, Any] | None:
  """What ``model.json`` records of ``trial``'s model (the arguments of
  :func:`~orchard_jax.engine.inference.write_model_record`), from what the trial stored: the
  architecture of its resolved recipe (a recipe's study; its function's file relative to
  ``folder``) and what its ``TrialConfig`` held. None for a trial that recorded neither."""
  held, config = trial.user_attrs.get(TRIAL_CONFIG), trial.user_attrs.get(CONFIG)
  if not isinstance(held, dict):
    return None
  architecture = config.get("architecture") if isinstance(config, dict) else None
  if architecture is not None:
    architecture = relative_paths({"architecture": architecture}, folder)["architecture"]
  return {"architecture": architecture, "num_classes": held["num_classes"],
          "input_shape": held.get("input_shape"), "layout": held.get("layout") or "NCHW",
          "precision": trained_precision(held.get("training")), "model": held.get("model")}


def export_best_model(run_dir: pathlib.Path, trial: FrozenTrial,
                      checkpoints: pathlib.Path | None = None) -> pathlib.Path | None:
  """Copies ``checkpoints/trial_<n>`` (default ``run_dir/trials``) to ``run_dir/best_model/``
  (whole or not at all); None if the trial's checkpoint was not written."""
  checkpoints = run_dir / "trials" if checkpoints is None else pathlib.Path(checkpoints)
  source, dest = checkpoints / f"trial_{trial.number}", run_dir / "best_model"
  if not (source / "checkpoint").is_dir():
    if not (dest / "trial.json").is_file() or json.loads(
        (dest / "trial.json").read_text()).get("number") != trial.number:
      logger.warning("No checkpoint of trial %d in %s; best_model/ not written", trial.number, source)
      return None
    return dest
  with atomic_directory(dest) as folder:
    shutil.copytree(source, folder, dirs_exist_ok=True)
    (folder / "trial.json").write_text(json.dumps(
        {"number": trial.number, "value": trial.value, "params": trial.params}, indent=2) + "\n")
    record = model_record(trial, dest)
    if record is not None:
      write_model_record(folder, **record)
  return dest
