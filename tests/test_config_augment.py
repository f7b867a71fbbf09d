"""AugmentationConfig: the reference's augmentation section, on TrainingConfig.augmentation."""

from __future__ import annotations

import pytest

import orchard_jax
from orchard_jax import AugmentationConfig, ConfigError, TrainingConfig

# orchard-ml 0.2.6, core/config/augmentation_config.py: field names and defaults.
REFERENCE_AUGMENTATION = dict(hflip=0.5, rotation_angle=10, jitter_val=0.2, min_scale=0.9,
                              tta_mode="full", tta_translate=2.0, tta_scale=1.1,
                              tta_blur_sigma=0.4, tta_blur_kernel_size=3)


def test_defaults_equal_the_reference_plus_the_dataset_flags_and_normalisation():
  assert AugmentationConfig().to_dict() == {**REFERENCE_AUGMENTATION, "is_anatomical": False,
                                            "is_texture_based": False, "mean": None, "std": None}


def test_it_is_exported_and_off_by_default():
  assert orchard_jax.AugmentationConfig is AugmentationConfig
  assert TrainingConfig().augmentation is None


@pytest.mark.parametrize("kwargs, message", [
    ({"hflip": 1.5}, "AugmentationConfig.hflip must be in [0, 1], got 1.5"),
    ({"hflip": -0.1}, "AugmentationConfig.hflip must be in [0, 1], got -0.1"),
    ({"rotation_angle": 10.5}, "AugmentationConfig.rotation_angle must be an int, got 10.5 (float)"),
    ({"rotation_angle": 361}, "AugmentationConfig.rotation_angle must be in [0, 360], got 361"),
    ({"jitter_val": -0.2}, "AugmentationConfig.jitter_val must be >= 0, got -0.2"),
    ({"min_scale": 1.1}, "AugmentationConfig.min_scale must be in [0, 1], got 1.1"),
    ({"tta_mode": "ful"}, "AugmentationConfig.tta_mode must be one of 'full', 'light', got 'ful' "
                          "(did you mean 'full'?)"),
    ({"tta_translate": 51.0}, "AugmentationConfig.tta_translate must be in [0, 50], got 51.0"),
    ({"tta_scale": 0.0}, "AugmentationConfig.tta_scale must be in (0, 2], got 0.0"),
    ({"tta_scale": 2.5}, "AugmentationConfig.tta_scale must be in (0, 2], got 2.5"),
    ({"tta_blur_sigma": 5.5}, "AugmentationConfig.tta_blur_sigma must be in [0, 5], got 5.5"),
    ({"tta_blur_kernel_size": 33}, "AugmentationConfig.tta_blur_kernel_size must be in [1, 31], "
                                   "got 33"),
    ({"tta_blur_kernel_size": 4}, "AugmentationConfig.tta_blur_kernel_size must be odd, got 4"),
    ({"is_anatomical": 1}, "AugmentationConfig.is_anatomical must be True or False, got 1 (int)"),
    ({"mean": (0.5,)}, "AugmentationConfig.mean and std must be given together"),
    ({"mean": [0.5, 0.5], "std": [0.2]}, "AugmentationConfig.mean and std must have one value per "
                                          "channel each, got 2 and 1 values"),
    ({"mean": [0.5], "std": [0.0]}, "AugmentationConfig.std must be > 0 in every channel, "
                                    "got (0.0,)"),
    ({"mean": [], "std": []}, "AugmentationConfig.mean must be None or a non-empty list"),
    ({"mean": "0.5", "std": [1.0]}, "AugmentationConfig.mean must be None or a list of floats"),
    ({"hflp": 0.5}, "AugmentationConfig has no field 'hflp' (did you mean 'hflip'?)"),
])
def test_invalid_values_raise_one_line_errors(kwargs, message):
  with pytest.raises(ConfigError) as info:
    AugmentationConfig(**kwargs)
  assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_section_on_training_config_takes_a_mapping_and_round_trips():
  training = TrainingConfig(augmentation={"hflip": 0.0, "mean": [0.5], "std": [0.25]})
  assert training.augmentation == AugmentationConfig(hflip=0.0, mean=(0.5,), std=(0.25,))
  data = training.to_dict()
  assert data["augmentation"]["mean"] == [0.5]  # plain data
  assert TrainingConfig.from_dict(data) == training
  assert hash(training) == hash(TrainingConfig.from_dict(data))
  assert TrainingConfig.from_dict({"augmentation": None}).augmentation is None


def test_a_wrong_section_value_is_named():
  with pytest.raises(ConfigError, match=r"^TrainingConfig.augmentation must be None, an "
                                        r"AugmentationConfig or a mapping, got 'on' \(str\)$"):
    TrainingConfig(augmentation="on")
  with pytest.raises(ConfigError, match=r"^AugmentationConfig.min_scale must be in \[0, 1\]"):
    TrainingConfig.from_dict({"augmentation": {"min_scale": 2.0}})


def test_strengths_are_the_per_trial_floats():
  assert AugmentationConfig(rotation_angle=15).strengths == {
      "hflip": 0.5, "rotation_angle": 15.0, "jitter_val": 0.2, "min_scale": 0.9}
