"""Augmentation in recipes and the search space: the augmentation: section, the dataset's
flags, the full preset's three ranges when the recipe augments, and the trial's values in
its state."""

from __future__ import annotations

import optuna
import pytest
import yaml

from orchard_jax import AugmentationConfig
from orchard_jax.core.augment import AugmentSpec
from orchard_jax.core.state import augmentation_spec
from orchard_jax.study.build import trial_config
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.recipe import bundled_recipe_text, parse_recipe
from orchard_jax.study.sources import load_source
from orchard_jax.study.space import (AUGMENTATION, DEFAULTS, FULL, QUICK, FloatRange, IntRange,
                                     apply_params, build_space)

BUNDLED = yaml.safe_load(bundled_recipe_text())


def recipe(augmentation=None, overrides=None, preset="full", dataset=None, training=None):
  data = {**BUNDLED, "augmentation": augmentation,
          "dataset": {**BUNDLED["dataset"], **(dataset or {})},
          "training": {**BUNDLED["training"], **(training or {})},
          "optuna": {**BUNDLED["optuna"], "search_space_preset": preset,
                     "search_space_overrides": overrides or {}}}
  return parse_recipe(data)


def error_of(**kw) -> str:
  with pytest.raises(RecipeError) as info:
    recipe(**kw)
  assert "\n" not in str(info.value)
  return str(info.value)


def test_the_default_ranges_are_the_references():
  assert DEFAULTS["rotation_angle"] == IntRange(0, 15)
  assert DEFAULTS["jitter_val"] == FloatRange(0.0, 0.15)
  assert DEFAULTS["min_scale"] == FloatRange(0.9, 1.0)
  assert FULL[-3:] == AUGMENTATION and not set(AUGMENTATION) & set(QUICK)


def test_the_bundled_recipe_does_not_augment():
  assert BUNDLED["augmentation"] is None and "augmentation:" in bundled_recipe_text()
  assert parse_recipe(BUNDLED).training.augmentation is None


def test_the_full_preset_searches_the_three_when_augmenting_and_the_values_reach_the_state():
  r = recipe(augmentation={"hflip": 0.0})
  space = build_space(r.study, (8, 8, 1), "mini_cnn")
  assert tuple(space.dists)[-3:] == AUGMENTATION
  trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).ask()
  params = space.sample(trial, r.training)
  assert isinstance(params["rotation_angle"], int) and 0 <= params["rotation_angle"] <= 15
  assert 0.0 <= params["jitter_val"] <= 0.15 and 0.9 <= params["min_scale"] <= 1.0
  augmentation = apply_params(r.training, params).augmentation
  assert (augmentation.rotation_angle, augmentation.jitter_val, augmentation.min_scale) == (
      params["rotation_angle"], params["jitter_val"], params["min_scale"])
  assert augmentation.hflip == 0.0  # the recipe's, not searched


def test_the_full_preset_does_not_search_them_without_augmentation():
  space = build_space(recipe().study, (8, 8, 1), "mini_cnn")
  assert not set(AUGMENTATION) & set(space.dists)


def test_their_overrides_work_as_the_others():
  r = recipe(augmentation={}, overrides={"rotation_angle": {"high": 30}, "jitter_val": [0.0, 0.1],
                                         "min_scale": None})
  dists = build_space(r.study, (8, 8, 1), "mini_cnn").dists
  assert dists["rotation_angle"] == IntRange(0, 30) and dists["jitter_val"] == (0.0, 0.1)
  assert "min_scale" not in dists
  quick = build_space(recipe(augmentation={}, preset="quick",
                             overrides={"min_scale": {"low": 0.5}}).study, (8, 8, 1), "mini_cnn")
  assert quick.dists["min_scale"] == FloatRange(0.5, 1.0)  # a range given adds it to quick


@pytest.mark.parametrize("overrides, message", [
    ({"rotation_angle": {"high": 400}}, "optuna.search_space_overrides.rotation_angle: 400 is not "
                                        "a valid augmentation.rotation_angle: augmentation."
                                        "rotation_angle must be in [0, 360], got 400"),
    ({"min_scale": {"high": 1.5}}, "optuna.search_space_overrides.min_scale: 1.5 is not a valid "
                                   "augmentation.min_scale"),
    ({"rotation_angle": {"low": 0.5}}, "optuna.search_space_overrides.rotation_angle.low must be"),
])
def test_their_bad_ranges_are_refused(overrides, message):
  assert error_of(augmentation={}, overrides=overrides).startswith(message)


def test_a_range_without_augmentation_is_refused_and_so_is_applying_one():
  assert error_of(overrides={"jitter_val": {"high": 0.1}}).startswith(
      "optuna.search_space_overrides.jitter_val: the trials do not augment")
  with pytest.raises(RecipeError, match="min_scale: the trials do not augment"):
    apply_params(recipe().training, {"min_scale": 0.95})


def test_the_dataset_flags_reach_the_augmentation_spec_of_the_trial():
  r = recipe(augmentation={"hflip": 0.0}, dataset={"is_anatomical": True})
  assert r.training.augmentation == AugmentationConfig(hflip=0.0, is_anatomical=True)
  source = load_source(r.dataset, batch_size=r.training.batch_size, seed=r.training.seed)
  cfg = trial_config(r, source, {"rotation_angle": 7}, output_dir=None)
  assert cfg.training.augmentation.rotation_angle == 7
  assert augmentation_spec(cfg.training.augmentation, source.input_shape) == AugmentSpec(
      geometric=False, photometric=True)
  texture = recipe(augmentation={}, dataset={"is_texture_based": True}).training.augmentation
  assert augmentation_spec(texture, (8, 8, 1)) == AugmentSpec(photometric=False)


def test_the_section_round_trips_with_its_flags_in_the_dataset():
  r = recipe(augmentation={"hflip": 0.0, "tta_mode": "light"}, dataset={"is_anatomical": True})
  data = r.to_dict()
  assert data["augmentation"]["tta_mode"] == "light" and "is_anatomical" not in data["augmentation"]
  assert data["dataset"]["is_anatomical"] is True
  assert parse_recipe(yaml.safe_load(yaml.safe_dump(data))) == r
  assert "augmentation" not in recipe().to_dict()  # absent: off


@pytest.mark.parametrize("kw, message", [
    ({"augmentation": {"hflip": 2.0}}, "augmentation.hflip must be in [0, 1], got 2.0"),
    ({"augmentation": {"hflp": 0.0}}, "unknown key 'augmentation.hflp'"),
    ({"augmentation": {"is_anatomical": True}}, "augmentation.is_anatomical: in a recipe the "
                                                "dataset's flags are in its dataset: section"),
    ({"augmentation": {"mean": [0.5], "std": [0.2]}}, "augmentation.mean/std are the "
                                                      "normalisation of images a function"),
    ({"augmentation": "on"}, "augmentation must be a mapping"),
    ({"training": {"augmentation": {}}}, "training.augmentation: in a recipe augmentation is a "
                                         "section of its own"),
    ({"dataset": {"is_texture_based": True}}, "dataset.is_texture_based is read through the "
                                              "augmentation: section (by the training "
                                              "augmentation and by TTA)"),
    ({"dataset": {"is_anatomical": True}, "training": {"use_tta": True}},
     "dataset.is_anatomical is read through the augmentation: section"),
])
def test_bad_sections_are_refused_in_one_line(kw, message):
  assert message in error_of(**kw)

