"""Search spaces: presets, overrides, conditional parameters, model search."""

from __future__ import annotations

import optuna
import pytest

from orchard_jax.config import OptunaConfig, TrainingConfig
from orchard_jax.models import available_models
from orchard_jax.study.model_names import fits_input
from orchard_jax.study.sections import StudySpec
from orchard_jax.study.space import (AUGMENTATION, DEFAULTS, FULL, QUICK, FloatRange, IntRange, apply_params,
                                     build_space, parse_overrides)
from orchard_jax.study.checks import RecipeError

TRAINING = TrainingConfig(use_amp=False)


def study_spec(preset="quick", overrides=None, **kw) -> StudySpec:
  return StudySpec(config=OptunaConfig(search_space_preset=preset),
                   overrides=parse_overrides(overrides or {}, TRAINING), **kw)


def sample(space, training=TRAINING, seed=0) -> dict:
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
  return space.sample(study.ask(), training)


def test_defaults_are_the_reference_ranges():
  assert DEFAULTS["learning_rate"] == FloatRange(1e-5, 1e-2, log=True)
  assert DEFAULTS["momentum"] == FloatRange(0.85, 0.95)
  assert DEFAULTS["scheduler_patience"] == IntRange(3, 10)
  assert DEFAULTS["batch_size_low_res"] == (16, 32, 48, 64)
  assert DEFAULTS["batch_size_high_res"] == (8, 12, 16)


def test_quick_preset_samples_its_seven_parameters():
  space = build_space(study_spec("quick"), (28, 28, 1), "mini_cnn")
  assert tuple(space.dists) == QUICK
  params = sample(space)
  assert set(params) == set(QUICK) and params["batch_size"] in (16, 32, 48, 64)


def test_full_preset_samples_only_the_active_loss_parameter():
  space = build_space(study_spec("full"), (28, 28, 1), "mini_cnn")
  assert tuple(space.dists) == tuple(n for n in FULL if n not in AUGMENTATION)  # not augmenting
  seen = {sample(space, seed=s)["criterion_type"]: sample(space, seed=s) for s in range(12)}
  assert "focal_gamma" in seen["focal"] and "label_smoothing" not in seen["focal"]
  assert "label_smoothing" in seen["cross_entropy"] and "focal_gamma" not in seen["cross_entropy"]


def test_large_inputs_use_the_high_resolution_batch_sizes():
  space = build_space(study_spec("quick"), (224, 224, 3), "mini_cnn")
  assert space.dists["batch_size"] == (8, 12, 16)


def test_mapping_override_merges_into_the_default_range():
  overrides = parse_overrides({"learning_rate": {"low": 1e-3}}, TRAINING)
  assert overrides.ranges["learning_rate"] == FloatRange(1e-3, 1e-2, log=True)


def test_numeric_strings_from_yaml_are_read_as_numbers():
  overrides = parse_overrides({"learning_rate": {"low": "1e-4", "high": "1e-1"}}, TRAINING)
  assert overrides.ranges["learning_rate"] == FloatRange(1e-4, 1e-1, log=True)


def test_list_override_makes_a_choice_and_null_removes_the_parameter():
  spec = study_spec("quick", {"learning_rate": [0.1, 0.01], "dropout": None})
  space = build_space(spec, (8, 8, 1), "mini_cnn")
  assert space.dists["learning_rate"] == (0.1, 0.01) and "dropout" not in space.dists
  assert sample(space)["learning_rate"] in (0.1, 0.01)


def test_override_outside_the_preset_adds_it_to_the_search_after_the_preset():
  overrides = {"label_smoothing": {"low": 0.0, "high": 0.1}, "mixup_alpha": {"high": 0.3}}
  space = build_space(study_spec("quick", overrides), (8, 8, 1), "mlp")
  assert tuple(space.dists) == (*QUICK, "label_smoothing", "mixup_alpha")  # FULL's order
  assert space.dists["label_smoothing"] == FloatRange(0.0, 0.1)
  assert space.dists["mixup_alpha"] == FloatRange(0.0, 0.3)
  params = sample(space)
  assert 0.0 <= params["label_smoothing"] <= 0.1 and 0.0 <= params["mixup_alpha"] <= 0.3


def test_null_outside_the_preset_adds_nothing():
  space = build_space(study_spec("quick", {"mixup_alpha": None}), (8, 8, 1), "mlp")
  assert tuple(space.dists) == QUICK


@pytest.mark.parametrize("key", ["rotation_angle", "jitter_val", "min_scale"])
def test_augmentation_ranges_are_refused_when_the_trials_do_not_augment(key):
  with pytest.raises(RecipeError) as info:
    parse_overrides({key: {"low": 0, "high": 1}}, TRAINING)
  message = str(info.value)
  assert message == (f"optuna.search_space_overrides.{key}: the trials do not augment (the "
                     f"recipe has no augmentation: section), so {key} would change nothing; add "
                     f"an augmentation: section or remove {key}")
  assert parse_overrides({key: None}, TRAINING).ranges[key] is None  # null: not searched, as said


@pytest.mark.parametrize("training, overrides, key", [
    (TRAINING, {"focal_gamma": {"low": 1.0}}, "focal_gamma"),
    (TRAINING.replace(criterion_type="focal"), {"label_smoothing": {"high": 0.1}},
     "label_smoothing"),
    (TRAINING, {"focal_gamma": {"low": 1.0}, "criterion_type": ["cross_entropy"]}, "focal_gamma"),
])
def test_a_loss_parameter_no_trial_can_use_is_refused(training, overrides, key):
  with pytest.raises(RecipeError, match=f"search_space_overrides.{key} is searched only with "):
    parse_overrides(overrides, training, "quick")


def test_a_loss_parameter_with_its_loss_searched_is_accepted():
  spec = StudySpec(config=OptunaConfig(search_space_preset="quick"), overrides=parse_overrides(
      {"focal_gamma": {"low": 1.0}, "criterion_type": ["cross_entropy", "focal"]}, TRAINING,
      "quick"))
  space = build_space(spec, (8, 8, 1), "mlp")
  assert tuple(space.dists)[-2:] == ("criterion_type", "focal_gamma")


def test_overrides_write_only_what_the_recipe_gives():
  overrides = parse_overrides({"label_smoothing": {"high": 0.1}, "dropout": None}, TRAINING)
  assert overrides.to_dict() == {"label_smoothing": {"low": 0.0, "high": 0.1, "log": False,
                                                     "step": None}, "dropout": None}
  assert parse_overrides(overrides.to_dict(), TRAINING) == overrides


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rat": {"low": 1e-3}}, "did you mean 'learning_rate'"),
    ({"momentum": {"low": 0.9, "high": 0.5}}, "low must be < high"),
    ({"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}, "log: true needs low > 0"),
    ({"learning_rate": {"high": 2.0}}, "2.0 is not a valid training.learning_rate"),
    ({"optimizer_type": ["sgd", "adam"]}, "'adam' is not a valid training.optimizer_type"),
    ({"optimizer_type": {"low": 1}}, "is a choice: give a list"),
    ({"dropout": [0.2, 1.0]}, "dropout must be in [0, 1)"),
    ({"batch_size_low_res": []}, "at least one value"),
    ({"scheduler_patience": {"low": 1.5}}, "must be an integer"),
])
def test_invalid_override_names_the_key_and_the_value(overrides, message):
  with pytest.raises(RecipeError) as info:
    parse_overrides(overrides, TRAINING)
  assert message in str(info.value) and "optuna.search_space_overrides." in str(info.value)


def test_batch_choices_below_four_are_refused_with_amp():
  with pytest.raises(RecipeError, match="batch_size must be >= 4 when use_amp"):
    parse_overrides({"batch_size_low_res": [2, 8]}, TrainingConfig(use_amp=True))


def test_model_search_pool_defaults_to_the_registry_pool_for_the_resolution():
  space = build_space(study_spec("quick", enable_model_search=True), (28, 28, 1), "mini_cnn")
  assert space.model_pool == tuple(available_models(28)) and "mini_cnn" in space.model_pool
  assert sample(space)["model_name"] in space.model_pool


def test_model_pool_entry_that_cannot_take_the_input_is_refused():
  spec = study_spec("quick", enable_model_search=True, model_pool=("mlp", "mini_cnn"))
  with pytest.raises(RecipeError, match="mini_cnn cannot take inputs of shape"):
    build_space(spec, (64,), "mlp")


def test_architecture_that_cannot_take_the_input_is_refused():
  with pytest.raises(RecipeError, match="use 'mlp' for feature vectors"):
    build_space(study_spec("quick"), (64,), "mini_cnn")


def test_fits_input_follows_the_minimum_side():
  assert fits_input("mlp", (64,)) and fits_input("mini_cnn", (8, 8, 1))
  assert not fits_input("mini_cnn", (2, 2, 1)) and not fits_input("mini_cnn", (64,))


def test_apply_params_sets_training_fields_and_caps_min_lr():
  training = apply_params(TRAINING, {"learning_rate": 1e-4, "min_lr": 1e-3, "batch_size": 48,
                                     "dropout": 0.3, "model_name": "mlp"})
  assert (training.learning_rate, training.min_lr, training.batch_size) == (1e-4, 1e-4, 48)


def test_describe_lists_every_parameter_searched_briefly():
  overrides = {"label_smoothing": {"high": 0.1}, "dropout": {"step": None}, "momentum": None,
               "batch_size_low_res": [16, 32]}
  space = build_space(study_spec("quick", overrides, enable_model_search=True,
                                 model_pool=("mlp", "mini_cnn")), (8, 8, 1), "mlp")
  assert space.describe() == (
      "optimizer_type sgd|adamw, learning_rate 1e-05..0.01 log, weight_decay 1e-06..0.001 log, "
      "min_lr 1e-07..1e-05 log, batch_size 16|32, dropout 0.1..0.5, label_smoothing 0..0.1, "
      "model_name mlp|mini_cnn")
