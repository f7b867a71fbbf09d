"""Recipe parsing: sections, unknown keys with suggestions, reference sections, --set."""

from __future__ import annotations

import importlib.util
import pathlib
import re

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


def test_reference_training_and_optuna_sections_load_with_an_augmentation_section():
  data = yaml.safe_load(REFERENCE)
  with pytest.raises(RecipeError, match="rotation_angle: the trials do not augment"):
    parse_recipe(data)  # its augmentation ranges: the reference always augments, we when asked
  recipe = parse_recipe({**data, "augmentation": {}})
  assert recipe.training.augmentation is not None
  assert recipe.study.overrides.searched("full")[-3:] == ("rotation_angle", "jitter_val",
                                                          "min_scale")
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
  assert "'hardware' of orchard-ml recipes is not supported" in error_of({"hardware": {}})


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


# ------------------------------------------------------ ranges (issue 15) --

SEED_RANGE = "must be in [0, 4294967295]"


@pytest.mark.parametrize("value", [-1, 2**32])
def test_training_seed_outside_the_samplers_range_is_refused(value):
  assert error_of({"training": {"seed": value}}) == f"training.seed {SEED_RANGE}, got {value}"


@pytest.mark.parametrize("value", [0, 2**32 - 1])
def test_training_seed_at_the_ends_of_the_range_is_accepted(value):
  assert parse_recipe({"training": {"seed": value}}).training.seed == value


@pytest.mark.parametrize("value", [-7, 2**32])
def test_split_seed_outside_the_range_is_refused(value):
  message = error_of({"dataset": {"split_seed": value}})
  assert message == f"dataset.split_seed {SEED_RANGE}, got {value}"


FOLDER_RULE = ("optuna.study_name must be one folder name of 1 to 100 characters A-Z, a-z, 0-9, "
               "'.', '_' or '-', not starting with '.' or '-', got ")


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", "a\\b", ".", "..", ".hidden",
                                  "-rf", "", "two words", "name\n", "ünï"])
def test_study_name_that_is_not_one_safe_folder_name_is_refused(name):
  assert error_of({"optuna": {"study_name": name}}) == FOLDER_RULE + repr(name)


def test_study_name_over_100_characters_is_refused_with_its_length():
  message = error_of({"optuna": {"study_name": "s" * 300}})
  assert message == FOLDER_RULE + "'" + "s" * 59 + "… (300 characters)"


def test_study_name_that_is_not_a_string_is_refused_with_its_type():
  assert error_of({"optuna": {"study_name": 7}}) == FOLDER_RULE + "7 (int)"


@pytest.mark.parametrize("name", ["s" * 100, "digits_mini_cnn", "run-2.v3", "_x", "0"])
def test_study_name_of_safe_characters_is_accepted(name):
  assert parse_recipe({"optuna": {"study_name": name}}).study.config.study_name == name


def test_telemetry_output_dir_may_be_any_path():
  recipe = parse_recipe({"optuna": {"study_name": "s"}, "telemetry": {"output_dir": "../../x y/z"}})
  assert recipe.telemetry.output_dir == "../../x y/z"


@pytest.mark.parametrize("metric", ["auc", "accuracy", "f1"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_early_stopping_threshold_of_a_score_must_be_in_0_1(metric, value):
  message = error_of({"training": {"monitor_metric": metric},
                      "optuna": {"early_stopping_threshold": value}})
  assert message == (f"optuna.early_stopping_threshold must be in [0, 1] for "
                     f"training.monitor_metric '{metric}' (a score between 0 and 1), got {value}")


def test_early_stopping_threshold_of_loss_must_be_at_least_0():
  message = error_of({"training": {"monitor_metric": "loss", "monitor_direction": "minimize"},
                      "optuna": {"early_stopping_threshold": -0.1}})
  assert message == ("optuna.early_stopping_threshold must be >= 0 for training.monitor_metric "
                     "'loss', got -0.1")


@pytest.mark.parametrize("metric,direction,value", [
    ("accuracy", "maximize", 0.0), ("accuracy", "maximize", 1.0), ("auc", "maximize", "9.99e-1"),
    ("loss", "minimize", 0.0), ("loss", "minimize", 2.5)])
def test_early_stopping_threshold_inside_its_range_is_accepted(metric, direction, value):
  recipe = parse_recipe({"training": {"monitor_metric": metric, "monitor_direction": direction},
                         "optuna": {"early_stopping_threshold": value}})
  assert recipe.study.config.early_stopping_threshold == float(value)


def test_digits_num_classes_other_than_10_is_refused():
  message = error_of({"dataset": {"source": "digits", "num_classes": 100000}})
  assert message == ("dataset.num_classes must be 10 or null with dataset.source 'digits' (the "
                     "bundled digits have 10 classes), got 100000")


def test_digits_num_classes_of_10_is_accepted():
  assert parse_recipe({"dataset": {"num_classes": 10}}).dataset.num_classes == 10


def test_digits_source_refuses_another_num_classes_when_loading():
  from orchard_jax.study.sections import DatasetSpec
  from orchard_jax.study.sources import load_source
  with pytest.raises(RecipeError) as info:
    load_source(DatasetSpec(num_classes=3), batch_size=8, seed=0)
  assert str(info.value) == ("dataset.num_classes must be 10 or null with dataset.source 'digits' "
                             "(the bundled digits have 10 classes), got 3")


def test_npz_num_classes_below_its_labels_is_refused_naming_the_count(tmp_path):
  import numpy as np
  from orchard_jax.study.sources import load_source
  path = tmp_path / "tiny.npz"
  rng = np.random.default_rng(0)
  np.savez(path, train_images=rng.random((6, 4, 4)), train_labels=np.array([0, 1, 2, 0, 1, 2]),
           val_images=rng.random((3, 4, 4)), val_labels=np.array([0, 1, 2]))
  recipe = parse_recipe({"dataset": {"source": "npz", "path": str(path), "num_classes": 2}})
  with pytest.raises(RecipeError) as info:
    load_source(recipe.dataset, batch_size=2, seed=0)
  message = str(info.value)
  assert "\n" not in message
  assert message == ("dataset: labels go up to 2, but dataset.num_classes is 2 (class ids must be "
                     "< num_classes); set dataset.num_classes: 3 or null")


# ---------------------------------------------------- capped echoed values --

LONG = "x" * 5000
CAPPED = "'" + "x" * 59 + "… (5000 characters)"


@pytest.mark.parametrize("data,start", [
    ({"training": {"optimizer_type": LONG}}, "training.optimizer_type must be one of"),
    ({"training": {"monitor_metric": LONG}}, "training.monitor_metric must be one of"),
    ({"training": {"precision": LONG}}, "training.precision must be a dtype policy str"),
    ({"training": {"learning_rate": LONG}}, "training.learning_rate must be a float"),
    ({"training": {"seed": LONG}}, "training.seed must be an int"),
    ({"optuna": {"storage": LONG}}, "optuna.storage must be 'sqlite', 'memory' or a database URL"),
    ({"optuna": {"storage_type": LONG}}, "optuna.storage_type must be"),
    ({"optuna": {"study_name": LONG}}, "optuna.study_name must be one folder name"),
    ({"optuna": {"pruner_type": LONG}}, "optuna.pruner_type must be one of"),
    ({"dataset": {"source": LONG}}, "dataset.source must be one of"),
    ({"dataset": {"source": "function", "function": LONG}}, "dataset.function must be"),
    ({"dataset": {"split_seed": LONG}}, "dataset.split_seed must be an integer"),
    ({"telemetry": {"log_level": LONG}}, "telemetry.log_level must be one of"),
    ({"telemetry": {"log_interval": [LONG]}}, "telemetry.log_interval must be an integer"),
    ({"training": {LONG: 1}}, "unknown key 'training.xxx"),
])
def test_a_5000_character_value_is_echoed_capped(data, start):
  message = error_of(data)
  assert message.startswith(start)
  assert "x" * 61 not in message.lower()
  assert re.search(r"[xX]… \(500[04] characters\)", message)
  if "unknown key" not in message:  # that one goes on to list the valid keys
    assert len(message) < 300


def test_a_5000_character_value_gives_a_message_under_300_characters():
  message = error_of({"training": {"optimizer_type": LONG}})
  assert message == f"training.optimizer_type must be one of 'sgd', 'adamw', got {CAPPED}"
  assert len(message) < 300


def test_a_long_set_value_and_an_int_of_5000_digits_are_one_capped_line(tmp_path, monkeypatch):
  with pytest.raises(RecipeError) as info:
    load_recipe(None, ["training.seed=" + "1" * 5000])
  message = str(info.value)
  assert message == "training.seed must be an int, got '" + "1" * 59 + "… (5000 characters) (str)"
  monkeypatch.chdir(tmp_path)
  pathlib.Path("big.yaml").write_text("training:\n  seed: " + "1" * 5000 + "\n")
  with pytest.raises(RecipeError) as info:
    load_recipe("big.yaml")
  message = str(info.value)
  assert message.startswith("big.yaml is not a readable recipe: Exceeds the limit (4300 digits)")
  assert "\n" not in message and len(message) < 300


# ------------------------------------------------- pydantic sections (issue 18) --


def test_sections_are_pydantic_dataclasses():
  import pydantic.dataclasses

  from orchard_jax.study.sections import ArchitectureSpec, DatasetSpec, StudySpec, TelemetrySpec
  for cls in (DatasetSpec, ArchitectureSpec, StudySpec, TelemetrySpec):
    assert pydantic.dataclasses.is_pydantic_dataclass(cls)
    assert cls.__pydantic_config__["extra"] == "forbid"


@pytest.mark.parametrize("data, message", [
    ({"training": {"momentum": 10**5000}},
     "training.momentum must be a float, got <an int of 16610 bits> (int)"),
    ({"dataset": {"val_fraction": 10**5000}},
     "dataset.val_fraction must be a finite number, got <an int of 16610 bits> (int)"),
    ({"optuna": {"timeout": 10**5000}},
     "optuna.timeout must be a float or None, got <an int of 16610 bits> (int)"),
])
def test_an_int_too_large_for_a_float_key_is_one_line_not_an_overflow_error(data, message):
  assert error_of(data) == message


@pytest.mark.parametrize("data, message", [
    ({"dataset": {"test_fraction": 7}}, "dataset.test_fraction must be in (0, 1), got 7.0"),
    ({"dataset": {"test_fraction": "0.5", "val_fraction": "0.6"}},
     "dataset.val_fraction + dataset.test_fraction must be < 1, got 0.6 + 0.5"),
    ({"architecture": {"dropout": 1}}, "architecture.dropout must be in [0, 1), got 1.0"),
    ({"architecture": {"zzz": 1}}, "unknown key 'architecture.zzz' in the recipe; valid keys: "
                                   "name, function, dropout, options, pretrained, weight_variant"),
    ({"architecture": {"options": {1: 2}}},
     "architecture.options must be a mapping with string keys, got {1: 2} (dict)"),
    ({"optuna": {"model_pool": ["mlp", 3], "enable_model_search": True}},
     "optuna.model_pool[1] must be a non-empty string, got 3 (int)"),
    ({"optuna": {"model_pool": "mlp"}}, "optuna.model_pool must be a list of names, got 'mlp' "
                                        "(str)"),
    ({"optuna": {"save_plots": "yes"}}, "optuna.save_plots must be true or false, got 'yes' "
                                        "(str)"),
    ({"telemetry": {"log_level": "verbose"}},
     "telemetry.log_level must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL', got "
     "'VERBOSE'"),
    ({"dataset": {"source": "function", "function": 3}},
     "dataset.function must be 'module:function' or 'path/file.py:function', got 3"),
    ({"dataset": {"num_classes": 1, "source": "npz", "path": "x.npz"}},
     "dataset.num_classes must be >= 2, got 1"),
    ({"optuna": {"search_space_overrides": [1]}},
     "optuna.search_space_overrides must be a mapping with string keys, got [1] (list)"),
])
def test_section_messages_name_the_key_the_value_and_what_is_allowed(data, message):
  assert error_of(data) == message
