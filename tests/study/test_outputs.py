"""Study outputs: best trial, trials.csv, table, best_config.yaml, plots."""

from __future__ import annotations

import csv
import math

import optuna
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from orchard_jax.study.outputs import (ERROR, HISTORY, best_config_dict, best_trial, format_table,
                                       save_study_plots, write_trials_csv)
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
  assert config["dataset"]["path"] == str(data)
  assert config["telemetry"]["output_dir"] == str(tmp_path / "run" / "retrain")
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
