"""Recipe parsing: sections, unknown keys with suggestions, reference sections, --set."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from orchard_jax.study.recipe import (RecipeError, apply_sets, bundled_recipe_text, load_recipe,
                                      parse_recipe)

# The training: and optuna: sections of orchard-ml's recipes/optuna_mini_cnn.yaml, verbatim
# (comments dropped).
REFERENCE = """
training:
  seed: 42
  batch_size: 128
  learning_rate: 0.01
  weight_decay: 5e-4
  momentum: 0.9
  min_lr: 1e-6
  mixup_alpha: 0.0
  label_smoothing: 0.0
  epochs: 60
  patience: 15
  grad_clip: 1.0
  mixup_epochs: 60
  monitor_metric: "auc"
  scheduler_type: "cosine"
  scheduler_patience: 5
  scheduler_factor: 0.1
  step_size: 20
  use_amp: false
  use_tta: false
  criterion_type: "cross_entropy"
  weighted_loss: false
  focal_gamma: 2.0
optuna:
  study_name: "organcmnist_minicnn_optimized"
  n_trials: 50
  epochs: 10
  timeout: null
  metric_name: "auc"
  direction: "maximize"
  enable_early_stopping: true
  early_stopping_threshold: 0.999
  early_stopping_patience: 3
  sampler_type: "tpe"
  search_space_preset: "full"
  enable_model_search: false
  enable_pruning: true
  pruner_type: "median"
  pruning_warmup_epochs: 3
  storage_type: "sqlite"
  storage_path: null
  n_jobs: 1
  load_if_exists: true
  show_progress_bar: false
  save_plots: true
  save_best_config: true
  search_space_overrides:
      learning_rate: {low: 1.0e-05, high: 0.01, log: true}
      dropout: {low: 0.1, high: 0.5, log: false}
      scheduler_patience: {low: 3, high: 10}
      rotation_angle: {low: 0, high: 15}
      jitter_val: {low: 0.0, high: 0.15, log: false}
      batch_size_low_res: [16, 32, 48, 64]
      batch_size_high_res: [8, 12, 16]
"""


def error_of(data) -> str:
  with pytest.raises(RecipeError) as info:
    parse_recipe(data)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_bundled_default_is_a_study_that_round_trips_through_to_dict():
  recipe = load_recipe(None)
  assert recipe.study is not None and recipe.dataset.source == "digits"
  assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe


def test_recipe_without_optuna_section_is_a_single_training_run():
  recipe = parse_recipe({"training": {"epochs": 3}})
  assert recipe.study is None and recipe.training.epochs == 3


def test_reference_training_and_optuna_sections_load_unchanged():
  recipe = parse_recipe(yaml.safe_load(REFERENCE))
  assert recipe.training.weight_decay == 5e-4 and recipe.training.min_lr == 1e-6
  assert recipe.study.config.storage == "sqlite"
  assert recipe.study.config.early_stopping_patience == 3
  assert recipe.study.show_progress_bar is False
  assert recipe.study.overrides.ranges["batch_size_low_res"] == (16, 32, 48, 64)


def test_unknown_training_key_names_the_closest_field():
  message = error_of({"training": {"lerning_rate": 0.1}})
  assert "unknown key 'training.lerning_rate'" in message
  assert "did you mean 'learning_rate'" in message


def test_unknown_optuna_key_names_the_closest_field():
  assert "did you mean 'n_trials'" in error_of({"optuna": {"n_trails": 3}})


def test_unknown_section_names_the_closest_section():
  assert "did you mean 'training'" in error_of({"trainig": {}})


def test_reference_only_section_is_refused_with_its_name():
  assert "'augmentation' of orchard-ml recipes is not supported" in error_of({"augmentation": {}})


def test_wrong_type_names_the_recipe_key():
  assert error_of({"training": {"batch_size": "big"}}).startswith("training.batch_size must be an int")


def test_warmup_not_below_trial_epochs_is_refused():
  message = error_of({"optuna": {"epochs": 3, "pruning_warmup_epochs": 3}})
  assert "optuna.pruning_warmup_epochs must be < epochs" in message


def test_reference_metric_name_must_agree_with_monitor_metric():
  message = error_of({"training": {"monitor_metric": "accuracy"}, "optuna": {"metric_name": "auc"}})
  assert "optuna.metric_name must agree with training.monitor_metric" in message


def test_reference_postgresql_storage_becomes_the_url():
  url = "postgresql://user:pw@db/optuna"
  recipe = parse_recipe({"optuna": {"storage_type": "postgresql", "postgresql_url": url}})
  assert recipe.study.config.storage == url


def test_monitor_metric_must_be_one_validation_computes():
  assert "did you mean 'accuracy'" in error_of({"training": {"monitor_metric": "acuracy"}})


def test_loss_must_be_minimized():
  assert "must be 'minimize' for 'loss'" in error_of({"training": {"monitor_metric": "loss"}})


def test_npz_source_requires_a_path():
  assert "dataset.path is required" in error_of({"dataset": {"source": "npz"}})


def test_key_of_another_source_is_refused():
  message = error_of({"dataset": {"source": "digits", "path": "x.npz"}})
  assert "dataset.path is read only when dataset.source is 'npz'" in message


def test_function_must_look_like_module_colon_function():
  assert "'module:function'" in error_of({"dataset": {"source": "function", "function": "mod.fn"}})


def test_unknown_architecture_names_the_closest():
  assert "did you mean 'mini_cnn'" in error_of({"architecture": {"name": "mini_cn"}})


def test_model_pool_requires_model_search():
  message = error_of({"optuna": {"model_pool": ["mlp", "mini_cnn"]}})
  assert "requires optuna.enable_model_search" in message


@pytest.mark.skipif(importlib.util.find_spec("cmaes") is not None, reason="cmaes is installed")
def test_cmaes_without_its_package_is_refused_before_running():
  assert "pip install cmaes" in error_of({"optuna": {"sampler_type": "cmaes"}})


def test_apply_sets_creates_sections_and_reads_values_as_yaml():
  data = apply_sets({}, ["optuna.n_trials=3", "optuna.search_space_overrides.dropout=null",
                         "training.learning_rate=1e-3", "architecture.options={hidden: [8]}"])
  assert data == {"optuna": {"n_trials": 3, "search_space_overrides": {"dropout": None}},
                  "training": {"learning_rate": "1e-3"},
                  "architecture": {"options": {"hidden": [8]}}}
  assert parse_recipe(data).training.learning_rate == 1e-3


def test_apply_sets_refuses_an_assignment_without_equals():
  with pytest.raises(RecipeError, match="--set expects key.path=value"):
    apply_sets({}, ["optuna.n_trials"])


def test_load_recipe_reports_a_missing_file(tmp_path):
  with pytest.raises(RecipeError, match="recipe file not found"):
    load_recipe(tmp_path / "nope.yaml")


def test_load_recipe_reports_invalid_yaml_with_its_line(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("training:\n  epochs: [1,\n")
  with pytest.raises(RecipeError, match=r"not valid YAML \(line 3"):
    load_recipe(path)


def test_bundled_text_is_commented():
  assert bundled_recipe_text().lstrip().startswith("#")
