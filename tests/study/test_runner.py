"""The study runner's parts: storage, pruners, study callbacks, resume, Ctrl-C."""

from __future__ import annotations

import logging
import os
import pathlib
import signal

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from orchard_jax.records import INTERRUPTED, RETRY_OF
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.recipe import parse_recipe
from orchard_jax.study.budget import finished_count, requeue_unfinished
from orchard_jax.study.study_callbacks import FailureStreak, StudyEarlyStopping, threshold_for
from orchard_jax.study.opening import build_pruner, open_study
from orchard_jax.study.runner import storage_url
from orchard_jax.study.signals import GracefulInterrupt


def values_objective(values):
  def objective(trial):
    return values[trial.number]
  return objective


def add(study, state, value=None, **user_attrs):
  study.add_trial(create_trial(state=state, value=value, params={"x": 0.5},
                               distributions={"x": FloatDistribution(0, 1)},
                               user_attrs=user_attrs))


def test_storage_url_puts_sqlite_in_the_run_folder_and_passes_urls_through(tmp_path):
  assert storage_url("sqlite", tmp_path) == f"sqlite:///{tmp_path.absolute()}/study.db"
  assert storage_url("memory", tmp_path) is None
  assert storage_url("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"


def test_pruners_follow_the_reference_registry():
  recipe = parse_recipe({"optuna": {"pruner_type": "percentile"}}).study
  pruner = build_pruner(recipe.config, startup_trials=2)
  assert isinstance(pruner, optuna.pruners.PercentilePruner) and pruner._percentile == 25.0
  assert pruner._n_startup_trials == 2
  off = parse_recipe({"optuna": {"enable_pruning": False}}).study.config
  assert isinstance(build_pruner(off, 5), optuna.pruners.NopPruner)
  hyperband = parse_recipe({"optuna": {"pruner_type": "hyperband"}}).study.config
  assert isinstance(build_pruner(hyperband, 5), optuna.pruners.HyperbandPruner)


def test_threshold_defaults_per_metric_as_the_reference():
  assert threshold_for("auc", "maximize", None) == 0.9999
  assert threshold_for("accuracy", "maximize", None) == 0.995
  assert threshold_for("loss", "minimize", None) == 0.01
  assert threshold_for("accuracy", "maximize", 0.9) == 0.9


def test_early_stopping_stops_after_patience_consecutive_trials_at_threshold():
  study = optuna.create_study(direction="maximize")
  early = StudyEarlyStopping(0.99, "maximize", patience=2)
  study.optimize(values_objective([0.995, 0.5, 0.991, 0.999, 0.1, 0.1]), n_trials=6,
                 callbacks=[early])
  assert len(study.trials) == 4 and early.reached


def test_early_stopping_of_an_optimize_call_announces_it_in_one_line(caplog):
  caplog.set_level(logging.INFO, logger="orchard_jax")
  study = optuna.create_study(direction="minimize")
  early = StudyEarlyStopping(0.1, "minimize", patience=2, metric="loss")
  study.optimize(values_objective([0.5, 0.05, 0.02, 0.3]), n_trials=4, callbacks=[early])
  assert [r.getMessage() for r in caplog.records if r.name.startswith("orchard_jax")] == [
      "Early stopping: loss 0.020000 <= threshold 0.1 in 2 consecutive trials; the study stopped "
      "after 3 trials"]


def test_early_stopping_count_resumes_from_the_stored_streak():
  study = optuna.create_study(direction="maximize")
  for value in (0.999, 0.2, 0.999):
    add(study, TrialState.COMPLETE, value)
  assert StudyEarlyStopping(0.99, "maximize", 2).count_from(study.trials).count == 1
  add(study, TrialState.PRUNED)
  assert StudyEarlyStopping(0.99, "maximize", 2).count_from(study.trials).count == 0


def test_failure_streak_stops_the_study():
  study = optuna.create_study()

  def broken(trial):
    raise ValueError("bad data")

  study.optimize(broken, n_trials=10, catch=(ValueError,), callbacks=[FailureStreak(3)])
  assert len(study.trials) == 3


def test_interrupted_failures_do_not_use_the_budget_and_are_requeued_once():
  study = optuna.create_study()
  add(study, TrialState.COMPLETE, 0.5)
  add(study, TrialState.PRUNED)
  add(study, TrialState.FAIL, error="ValueError: x")
  add(study, TrialState.FAIL, **{INTERRUPTED: True})
  assert finished_count(study.trials) == 3
  assert requeue_unfinished(study) == [3]
  assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
  assert requeue_unfinished(study) == []
  study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
  retry = study.trials[-1]
  assert retry.params == {"x": 0.5} and retry.user_attrs[RETRY_OF] == 3


def sqlite_recipe(tmp_path: pathlib.Path, **optuna_keys):
  storage = f"sqlite:///{tmp_path / 'study.db'}"
  return parse_recipe({"training": {"seed": 1},
                       "optuna": {"storage": storage, "sampler_type": "random", **optuna_keys}})


def test_open_study_refuses_an_existing_study_without_load_if_exists(tmp_path):
  open_study(sqlite_recipe(tmp_path), f"sqlite:///{tmp_path / 'study.db'}")
  recipe = sqlite_recipe(tmp_path, load_if_exists=False)
  with pytest.raises(RecipeError, match="already exists .* set optuna.load_if_exists: true"):
    open_study(recipe, recipe.study.config.storage)


def test_open_study_refuses_a_stored_study_of_the_other_direction(tmp_path):
  url = f"sqlite:///{tmp_path / 'study.db'}"
  open_study(sqlite_recipe(tmp_path), url)
  recipe = parse_recipe({"training": {"monitor_metric": "loss", "monitor_direction": "minimize"},
                         "optuna": {"storage": url}})
  with pytest.raises(RecipeError, match="created to maximize"):
    open_study(recipe, url)


def test_resumed_study_does_not_replay_its_first_parameters(tmp_path):
  recipe = sqlite_recipe(tmp_path)
  url = recipe.study.config.storage

  def objective(trial):
    return trial.suggest_float("x", 0, 1)

  first = open_study(recipe, url)
  first.optimize(objective, n_trials=1)
  resumed = open_study(recipe, url)
  resumed.optimize(objective, n_trials=1)
  xs = [t.params["x"] for t in resumed.trials]
  fresh = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
  fresh.optimize(objective, n_trials=1)
  assert xs[0] == fresh.trials[0].params["x"] and xs[1] != xs[0]


def test_first_sigint_lets_the_trial_finish_then_stops_the_study():
  study = optuna.create_study()
  previous = signal.getsignal(signal.SIGINT)

  def objective(trial):
    if trial.number == 1:
      os.kill(os.getpid(), signal.SIGINT)
    return 1.0

  with GracefulInterrupt(study) as handler:
    study.optimize(objective, n_trials=5)
  assert handler.requested and [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
  assert signal.getsignal(signal.SIGINT) is previous


def test_second_sigint_stops_the_running_trial_at_once():
  study = optuna.create_study()

  def objective(trial):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    return 1.0

  with pytest.raises(KeyboardInterrupt), GracefulInterrupt(study):
    study.optimize(objective, n_trials=5)
  assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_resuming_with_another_search_space_warns_but_more_trials_do_not(tmp_path, caplog):
  from orchard_jax.study.opening import warn_if_changed
  stored_recipe = parse_recipe({"optuna": {"n_trials": 5}})
  (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(stored_recipe.to_dict()))
  with caplog.at_level("WARNING", logger="orchard_jax.study.opening"):
    warn_if_changed(parse_recipe({"optuna": {"n_trials": 9}}), tmp_path / "recipe.yaml")
    assert not caplog.records
    changed = {"optuna": {"search_space_overrides": {"dropout": None}}}
    warn_if_changed(parse_recipe(changed), tmp_path / "recipe.yaml")
  assert "optuna.search_space_overrides" in caplog.text


def test_storage_that_cannot_be_opened_is_a_recipe_error_without_the_password():
  url = "postgresql://user:secret@localhost:1/db"
  recipe = parse_recipe({"optuna": {"storage": url}})
  with pytest.raises(RecipeError, match="cannot open postgresql://\\*\\*\\*@localhost:1/db") as info:
    open_study(recipe, url)
  assert "secret" not in str(info.value)
