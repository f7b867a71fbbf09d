"""Augmentation in the engine: a trial's state from TrainingConfig.augmentation, its settings
line, and a cohort of four strengths whose members equal their solo trials."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from orchard_jax import AugmentationConfig, TrainingConfig
from orchard_jax.core.augment import AugmentSpec
from orchard_jax.engine.member import cohort_key
from orchard_jax.engine.start import initial_state, settings_line
from orchard_jax.records import COHORT

from tests.engine.test_cohort_engine import LOSS, assert_members_match, solo_and_cohort

STRENGTHS = ({"hflip": 0.0, "rotation_angle": 0, "jitter_val": 0.0, "min_scale": 1.0},
             {"hflip": 0.5, "rotation_angle": 10, "jitter_val": 0.2, "min_scale": 0.9},
             {"hflip": 1.0, "rotation_angle": 40, "jitter_val": 0.4, "min_scale": 0.5},
             {"hflip": 0.2, "rotation_angle": 90, "jitter_val": 0.1, "min_scale": 0.3})
# the engine tests' synthetic images are N(1.5, 0.5)-ish: normalised as such
NORMALISED = {"mean": [0.5], "std": [0.5]}


def test_the_engine_builds_the_state_of_the_configs_augmentation(make_cfg):
  off = initial_state(make_cfg())
  assert off.spec.augment is None and off.hparams.augment is None
  on = initial_state(make_cfg(training={"augmentation": {"is_anatomical": True, "hflip": 0.25,
                                                         **NORMALISED}}))
  assert on.spec.augment == AugmentSpec(geometric=False, mean=(0.5,), std=(0.5,))
  assert float(on.hparams.augment.hflip) == 0.25


def test_strengths_share_a_cohort_and_the_structure_does_not(make_cfg):
  def key(**augmentation):
    cfg = make_cfg(training={"augmentation": {**NORMALISED, **augmentation}})
    return cohort_key(cfg, initial_state(cfg))
  base = key(hflip=0.1, rotation_angle=5)
  assert key(hflip=0.9, rotation_angle=30, jitter_val=0.4, min_scale=0.5) == base
  assert key(hflip=0.1, rotation_angle=5, is_texture_based=True) != base
  off = make_cfg()
  assert cohort_key(off, initial_state(off)) != base


def test_the_settings_line_shows_the_augmentation_when_on():
  assert "augmentation" not in settings_line(TrainingConfig(use_amp=False))
  assert settings_line(TrainingConfig(use_amp=False, augmentation=AugmentationConfig())).endswith(
      "class weights off, augmentation hflip 0.5, rotation 10, jitter 0.2, min_scale 0.9")


def test_a_cohort_of_four_strengths_matches_its_solo_trials(make_cfg):
  def configure(trial: optuna.Trial):
    strengths = {"hflip": trial.suggest_float("hflip", 0.0, 1.0),
                 "rotation_angle": trial.suggest_int("rotation_angle", 0, 90),
                 "jitter_val": trial.suggest_float("jitter_val", 0.0, 0.5),
                 "min_scale": trial.suggest_float("min_scale", 0.3, 1.0)}
    return make_cfg(training={**LOSS, "learning_rate": 0.05,
                              "augmentation": {**strengths, **NORMALISED}})
  solo, cohort = solo_and_cohort(configure, list(STRENGTHS), cohort_size=4)
  assert_members_match(solo, cohort)
  assert [t.user_attrs[COHORT] for t in cohort] == [{"size": 4, "slot": i} for i in range(4)]
  assert all(t.state == TrialState.COMPLETE for t in cohort)
  curves = {tuple(t.intermediate_values.values()) for t in cohort}
  assert len(curves) == 4  # the strengths did change the training
