"""benchmarks/torch_study.py runs the same study as ``orchard-jax run`` (fast checks only)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import optuna
import pytest

from tests.conftest import BENCHMARKS, load_benchmark


@pytest.fixture(scope="module")
def torch_study():
  return load_benchmark("torch_study")


@pytest.fixture(scope="module")
def recipe():
  from orchard_jax.study.recipe import load_recipe
  return load_recipe(None)


def test_digits_split_equals_orchard_jax_sources(torch_study, recipe):
  from orchard_jax.study.sources import load_source
  source = load_source(recipe.dataset, batch_size=32, seed=42)
  ours = torch_study.digits_split(recipe.dataset.val_fraction, recipe.dataset.test_fraction,
                                  recipe.dataset.split_seed)
  assert set(ours) == set(source.splits)
  for split, (images, labels) in source.splits.items():
    assert images.shape[-1] == 1
    np.testing.assert_array_equal(ours[split][0], images[..., 0])
    np.testing.assert_array_equal(ours[split][1], labels)


def test_search_space_matches_orchard_jax_space_for_the_bundled_recipe(torch_study, recipe):
  from orchard_jax.study.opening import build_sampler
  from orchard_jax.study.space import build_space
  space = build_space(recipe.study, (8, 8, 1), recipe.architecture.name)
  theirs = optuna.create_study(sampler=build_sampler("tpe", recipe.training.seed)).ask()
  ours = optuna.create_study(
      sampler=optuna.samplers.TPESampler(seed=torch_study.STUDY["seed"])).ask()
  assert space.sample(theirs, recipe.training) == torch_study.suggest(ours)
  assert list(theirs.distributions.items()) == list(ours.distributions.items())


def test_study_settings_equal_the_bundled_recipe(torch_study, recipe):
  from orchard_jax.study.study_callbacks import MAX_CONSECUTIVE_FAILURES, threshold_for
  config, training, dataset = recipe.study.config, recipe.training, recipe.dataset
  expected = {
      "study_name": config.study_name, "seed": training.seed,
      "val_fraction": dataset.val_fraction, "test_fraction": dataset.test_fraction,
      "split_seed": dataset.split_seed, "eval_batch_size": dataset.eval_batch_size,
      "dropout": recipe.architecture.dropout, "batch_size": training.batch_size,
      "grad_clip": training.grad_clip, "monitor_metric": training.monitor_metric,
      "direction": training.monitor_direction, "n_trials": config.n_trials,
      "epochs": config.epochs, "pruning_warmup_epochs": config.pruning_warmup_epochs,
      "pruner_startup_trials": recipe.study.pruner_startup_trials,
      "early_stopping_threshold": threshold_for(training.monitor_metric,
                                                training.monitor_direction,
                                                config.early_stopping_threshold),
      "early_stopping_patience": config.early_stopping_patience,
      "max_consecutive_failures": MAX_CONSECUTIVE_FAILURES,
  }
  assert torch_study.STUDY == expected
  assert (training.optimizer_type, training.scheduler_type, training.criterion_type,
          config.sampler_type, config.pruner, config.storage, config.enable_pruning,
          config.enable_early_stopping, training.mixup_alpha, training.label_smoothing,
          training.weighted_loss) == ("sgd", "cosine", "cross_entropy", "tpe", "median",
                                      "sqlite", True, True, 0.0, 0.0, False)


def test_epoch_order_is_orchard_jax_array_loader_order(torch_study):
  from orchard_jax.study.sources import ArrayLoader
  n = 45
  loader = ArrayLoader(np.arange(n), np.arange(n), 32, shuffle=True, seed=42)
  order = torch_study.EpochOrder(n, 42)
  for _ in range(2):  # two passes: each draws a new permutation
    assert list(order) == np.concatenate([labels for _, labels in loader]).tolist()


def test_one_torch_trial_of_one_epoch_reports_its_value(torch_study):
  data = torch_study.digits_split()
  tiny = {split: (x[:64], y[:64]) for split, (x, y) in data.items()}
  study = optuna.create_study(direction="maximize",
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=0))
  history: list = []

  def objective(trial):
    return torch_study.train_trial(trial, torch_study.suggest(trial), tiny, epochs=1, warmup=1,
                                   history=history)

  study.optimize(objective, n_trials=1)
  trial = study.trials[0]
  assert trial.state == optuna.trial.TrialState.COMPLETE
  assert list(trial.intermediate_values) == [1]
  assert trial.value == trial.intermediate_values[1] == history[0]["val_accuracy"]
  assert 0.0 <= trial.value <= 1.0
  assert set(history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "val_auc",
                             "val_f1"}


def test_torch_study_process_imports_neither_jax_nor_orchard_jax():
  path = str(BENCHMARKS / "torch_study.py")
  code = ("import importlib.util, sys; "
          f"spec = importlib.util.spec_from_file_location('t', {path!r}); "
          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
          "print(sorted(k for k in sys.modules if k.split('.')[0] in ('jax', 'orchard_jax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
