"""Study outputs: best trial, trials.csv, table, best_config.yaml, plots; what a recipe's
study stores with each trial (dashboard attributes) and logs of it."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pathlib

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from orchard_jax.records import ERROR, HISTORY
from orchard_jax.study import plots, tables
from orchard_jax.study.best_files import best_config_dict, relative_paths
from orchard_jax.study.plots import save_study_plots
from orchard_jax.study.tables import best_trial, format_table, trial_history, write_trials_csv
from orchard_jax.study.recipe import parse_recipe

PNG = b"\x89PNG\r\n\x1a\n"
DIST = {"learning_rate": FloatDistribution(1e-4, 1.0, log=True)}


def trial(state=TrialState.COMPLETE, value=None, lr=0.01, steps=(), **user_attrs):
  return create_trial(state=state, value=value, params={"learning_rate": lr}, distributions=DIST,
                      intermediate_values={s + 1: v for s, v in enumerate(steps)},
                      user_attrs=user_attrs)


def study_of(*trials, direction="maximize"):
  study = optuna.create_study(direction=direction)
  for t in trials:
    study.add_trial(t)
  return study


def test_best_trial_ignores_unfinished_and_non_finite_values_and_breaks_ties_by_number():
  study = study_of(trial(value=0.8), trial(TrialState.PRUNED, steps=(0.99,)),
                   trial(value=math.inf), trial(TrialState.FAIL), trial(value=0.9), trial(value=0.9))
  assert best_trial(study.trials, "maximize").number == 4
  assert best_trial(study.trials, "minimize").number == 0
  assert best_trial(study_of(trial(TrialState.FAIL)).trials, "maximize") is None


def test_trials_csv_has_one_row_per_trial_with_params_and_errors(tmp_path):
  study = study_of(trial(value=0.8, lr=0.1, steps=(0.7, 0.8)),
                   trial(TrialState.FAIL, **{ERROR: "ValueError: bad"}))
  path = write_trials_csv(study.trials, tmp_path / "trials.csv")
  rows = list(csv.DictReader(open(path)))
  assert [r["state"] for r in rows] == ["COMPLETE", "FAIL"]
  assert float(rows[0]["value"]) == 0.8 and rows[0]["epochs"] == "2"
  assert float(rows[0]["params_learning_rate"]) == 0.1 and rows[1]["error"] == "ValueError: bad"


def test_table_ranks_the_best_complete_trials():
  study = study_of(trial(value=0.5), trial(value=0.9), trial(TrialState.PRUNED), trial(value=0.7))
  lines = format_table(study.trials, "accuracy", "maximize", k=2).splitlines()
  assert lines[0].split()[:3] == ["rank", "trial", "accuracy"]
  assert [line.split()[:3] for line in lines[1:]] == [["1", "1", "0.9000"], ["2", "3", "0.7000"]]


def test_best_config_is_a_single_run_recipe_with_the_best_params(tmp_path, monkeypatch):
  data = tmp_path / "data.npz"
  data.write_bytes(b"")
  monkeypatch.chdir(tmp_path)
  recipe = parse_recipe({"dataset": {"source": "npz", "path": "data.npz"},
                         "architecture": {"name": "mlp", "dropout": 0.0},
                         "training": {"epochs": 40},
                         "optuna": {"epochs": 6, "pruning_warmup_epochs": 2}})
  best = create_trial(value=0.9, params={"learning_rate": 0.02, "dropout": 0.3, "batch_size": 48},
                      distributions={"learning_rate": FloatDistribution(1e-4, 1.0),
                                     "dropout": FloatDistribution(0.1, 0.5),
                                     "batch_size": optuna.distributions.CategoricalDistribution(
                                         (16, 48))})
  config = best_config_dict(recipe, best, tmp_path / "run")
  assert "optuna" not in config and config["training"]["epochs"] == 40
  assert config["training"]["learning_rate"] == 0.02 and config["training"]["batch_size"] == 48
  assert config["architecture"]["dropout"] == 0.3
  run_dir = tmp_path / "run"
  assert os.path.normpath(run_dir / config["dataset"]["path"]) == str(data)
  assert run_dir / config["telemetry"]["output_dir"] == run_dir / "retrain"
  # relative to run/, where best_config.yaml lives
  assert (config["dataset"]["path"], config["telemetry"]["output_dir"]) == ("../data.npz",
                                                                            "retrain")
  assert parse_recipe(yaml.safe_load(yaml.safe_dump(config))).study is None


def test_plots_are_pngs_and_importances_need_two_complete_trials(tmp_path):
  history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.5},
             {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.7}]
  one = study_of(trial(value=0.7, steps=(0.5, 0.7), **{HISTORY: history}))
  names = {p.name for p in save_study_plots(one, tmp_path / "one", "accuracy", one.trials[0])}
  assert names == {"optimization_history.png", "intermediate_values.png", "best_trial_curves.png"}
  two = study_of(trial(value=0.7, lr=0.1, steps=(0.5, 0.7)), trial(value=0.6, lr=0.01, steps=(0.6,)))
  paths = save_study_plots(two, tmp_path / "two", "accuracy", two.trials[0])
  assert "param_importances.png" in {p.name for p in paths}
  assert all(p.read_bytes().startswith(PNG) for p in paths)


def test_trials_csv_has_the_scalar_attributes_as_columns(tmp_path):
  study = study_of(trial(value=0.8, steps=(0.7, 0.8, 0.75),
                         **{"best_epoch": 2, "epochs_run": 3, "seconds": 1.25}),
                   trial(TrialState.PRUNED, steps=(0.1,)))
  rows = list(csv.DictReader(open(write_trials_csv(study.trials, tmp_path / "trials.csv"))))
  assert (rows[0]["best_epoch"], rows[0]["epochs"], rows[0]["seconds"]) == ("2", "3", "1.25")
  assert (rows[1]["best_epoch"], rows[1]["epochs"]) == ("", "1")  # a trial without them


def test_history_reads_one_attribute_per_epoch_and_the_former_history_list():
  epochs = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 0.9 / e, "val_accuracy": 0.1 * e,
             "val_auc": 0.5 + 0.01 * e, "val_f1": 0.05 * e} for e in range(1, 13)]
  attrs = tables.epoch_attrs(epochs, 12)
  assert list(attrs) == [f"epoch_{e:02d}" for e in range(1, 13)]
  assert attrs["epoch_03"] == {k: v for k, v in epochs[2].items() if k != "epoch"}
  # optuna-dashboard cuts each attribute's JSON at 1,024 characters
  assert max(len(json.dumps(v)) for v in attrs.values()) < 1024 / 4
  shuffled = dict(reversed(list(attrs.items())))
  assert trial_history(trial(value=0.5, **shuffled, other={"x": 1})) == epochs
  assert trial_history(trial(value=0.5, **{HISTORY: epochs[:2]})) == epochs[:2]  # stored before
  assert tables.epoch_key(7, 120) == "epoch_007"


def test_best_trial_curves_come_from_the_epoch_attributes(tmp_path, monkeypatch):
  drawn = []
  monkeypatch.setattr(plots, "plot_history", lambda epochs, *a: drawn.append(epochs))
  epochs = [{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5},
            {"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.7}]
  one = study_of(trial(value=0.7, steps=(0.5, 0.7), **tables.epoch_attrs(epochs)))
  save_study_plots(one, tmp_path, "accuracy", one.trials[0])
  assert drawn == [epochs]


def test_plot_axes_say_epoch_and_the_metric(tmp_path, monkeypatch):
  figures = {}
  monkeypatch.setattr(plots, "_save_figure",
                      lambda fig, path, **kw: figures.setdefault(path.name, fig))
  study = study_of(trial(value=0.7, lr=0.1, steps=(0.5, 0.7)), trial(value=0.6, steps=(0.6,)))
  save_study_plots(study, tmp_path, "f1", study.trials[0])

  def labels(name):
    ax = figures[name].axes[0]
    return ax.get_xlabel(), ax.get_ylabel()

  assert labels("intermediate_values.png") == ("epoch", "f1")
  assert labels("optimization_history.png") == ("trial", "f1")
  assert labels("best_trial_curves.png") == ("epoch", "f1")  # no losses: the reported values


def test_best_config_paths_are_relative_to_its_folder(tmp_path):
  run_dir = tmp_path / "outputs" / "study"
  config = {"dataset": {"source": "function", "path": None,
                        "function": f"{tmp_path / 'code' / 'data.py'}:loaders"},
            "architecture": {"function": f"{tmp_path / 'code' / 'model.py'}:build"},
            "training": {"epochs": 3},
            "telemetry": {"output_dir": str(run_dir / "retrain"), "log_level": "INFO"}}
  relative = relative_paths(config, run_dir)
  assert relative["dataset"]["function"] == "../../code/data.py:loaders"
  assert relative["architecture"]["function"] == "../../code/model.py:build"
  assert relative["telemetry"] == {"output_dir": "retrain", "log_level": "INFO"}
  assert relative["training"] == config["training"] and relative["dataset"]["path"] is None
  # A module entry and a relative path stay as they are; so does a file far away.
  kept = {"dataset": {"function": "pkg.data:loaders", "path": "here.npz"},
          "architecture": {"function": f"{tmp_path.parent / 'lib' / 'm.py'}:build"}}
  assert relative_paths(kept, run_dir) == kept


# ------------------------------------------------ a recipe's study, in process --


def tiny_recipe(tmp_path: pathlib.Path, **optuna_keys):
  """3 trials of an MLP on a tiny .npz, 2 epochs each; the random sampler draws learning rates
  0.5, 1e-7, 0.5 (tests/test_cli.py's seed 2): complete, pruned, complete."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 96), ("val", 48), ("test", 48)):
    labels = np.arange(n) % 3
    images = rng.normal(0.3, 0.1, (n, 8, 8))
    for c in range(3):
      images[labels == c, 2 * c:2 * c + 2, :] += 0.5
    arrays[f"{split}_images"] = (np.clip(images, 0, 1) * 255).astype(np.uint8)
    arrays[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
  np.savez(tmp_path / "tiny.npz", **arrays)
  return parse_recipe({
      "dataset": {"source": "npz", "path": str(tmp_path / "tiny.npz")},
      "architecture": {"name": "mlp", "options": {"hidden": [16]}},
      "training": {"seed": 2, "batch_size": 16, "epochs": 3, "use_amp": False,
                   "monitor_metric": "accuracy", "mixup_alpha": 0.0, "mixup_epochs": 0,
                   "scheduler_type": "none", "use_tqdm": False},
      "optuna": {"study_name": "tiny", "n_trials": 3, "epochs": 2, "sampler_type": "random",
                 "pruner_type": "median", "pruning_warmup_epochs": 1, "pruner_startup_trials": 1,
                 "enable_early_stopping": False, "search_space_preset": "quick",
                 "show_progress_bar": False,
                 "search_space_overrides": {
                     "learning_rate": [0.5, 1.0e-7], "optimizer_type": None,
                     "batch_size_low_res": None, "dropout": None, "weight_decay": None,
                     "momentum": None, "min_lr": None}, **optuna_keys},
      "telemetry": {"log_interval": 1, "compilation_cache": None,
                    "output_dir": str(tmp_path / "run")}})


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  """The tiny study run in process, its trial 2 failing inside run_trial; the log records."""
  import io

  from orchard_jax.engine import trial as engine_trial
  from orchard_jax.study.runner import run_study
  from orchard_jax.study.sources import load_source

  tmp_path = tmp_path_factory.mktemp("study")
  recipe = tiny_recipe(tmp_path)
  source = load_source(recipe.dataset, batch_size=16, seed=2)
  records: list[logging.LogRecord] = []
  handler = logging.Handler()
  handler.emit = records.append
  package = logging.getLogger("orchard_jax")
  level, execute = package.level, engine_trial.TrialTrainingExecutor.execute

  def failing(self, trial):
    if trial.number == 2:
      raise RuntimeError("boom in trial 2")
    return execute(self, trial)

  package.addHandler(handler)
  package.setLevel(logging.INFO)
  engine_trial.TrialTrainingExecutor.execute = failing
  try:
    status = run_study(recipe, source, tmp_path / "run", out=io.StringIO())
  finally:
    engine_trial.TrialTrainingExecutor.execute = execute
    package.removeHandler(handler)
    package.setLevel(level)
  study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
  return status, study, records, tmp_path / "run"


def test_the_study_names_its_metric_for_the_dashboard(study_run):
  _, study, _, _ = study_run
  assert study.metric_names == ["accuracy"]


def test_each_trial_stores_scalar_attributes_and_one_attribute_per_epoch(study_run):
  _, study, _, run_dir = study_run
  states = [t.state for t in study.trials]
  assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
  done, pruned, failed = study.trials
  assert done.user_attrs["epochs_run"] == 2 and done.user_attrs["best_epoch"] in (1, 2)
  assert done.user_attrs["seconds"] > 0 and failed.user_attrs["epochs_run"] == 0
  assert "best_epoch" not in failed.user_attrs
  assert pruned.user_attrs["epochs_run"] == 1  # pruned after epoch 1 (warmup 1)
  assert HISTORY not in done.user_attrs
  epochs = {k: v for k, v in done.user_attrs.items() if k.startswith("epoch_")}
  assert sorted(epochs) == ["epoch_01", "epoch_02"]
  assert set(epochs["epoch_02"]) >= {"train_loss", "val_loss", "val_accuracy"}
  assert all(len(json.dumps(v)) < 1024 for v in epochs.values())
  best = done.user_attrs["best_epoch"]
  assert epochs[f"epoch_{best:02d}"]["val_accuracy"] == done.value
  rows = list(csv.DictReader(open(run_dir / "trials.csv")))
  assert rows[0]["best_epoch"] == str(best) and rows[0]["epochs"] == "2"
  assert float(rows[0]["seconds"]) == done.user_attrs["seconds"]


def test_a_pruned_or_failed_trial_is_logged_once(study_run):
  _, _, records, _ = study_run
  def lines(number):
    return [r.getMessage() for r in records if r.getMessage().startswith(f"Trial {number} ")
            and "E1/" not in r.getMessage()]
  assert len(lines(1)) == 1 and "PRUNED" in lines(1)[0], lines(1)
  assert len(lines(2)) == 1, lines(2)
  (failed,) = [r for r in records if r.getMessage().startswith("Trial 2 ")]
  assert failed.levelno == logging.WARNING and "RuntimeError: boom in trial 2" in failed.getMessage()


def test_the_study_writes_best_config_with_paths_relative_to_it(study_run):
  _, _, _, run_dir = study_run
  text = (run_dir / "best_config.yaml").read_text()
  config = yaml.safe_load(text)
  assert config["dataset"]["path"] == "../tiny.npz"
  assert config["telemetry"]["output_dir"] == "retrain"
  assert str(run_dir.parent) not in yaml.safe_dump(config)  # no absolute path left
  assert os.path.samefile(run_dir / config["dataset"]["path"], run_dir.parent / "tiny.npz")
