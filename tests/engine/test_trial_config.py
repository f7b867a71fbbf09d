"""TrialConfig: required fields, checks with messages, sections from mappings."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from orchard_jax.config import ConfigError, OptunaConfig, TrainingConfig, TrialConfig
from orchard_jax.engine import TrialTrainingExecutor

REQUIRED = dict(model=object(), train_loader=[], val_loader=[], num_classes=3)


def test_defaults_are_the_reference_sections_and_log_interval_10():
  cfg = TrialConfig(**REQUIRED)
  assert cfg.training == TrainingConfig() and cfg.optuna == OptunaConfig()
  assert (cfg.log_interval, cfg.layout, cfg.reraise_errors) == (10, "NCHW", False)


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_each_required_field_is_named_when_missing(missing):
  fields = {k: v for k, v in REQUIRED.items() if k != missing}
  with pytest.raises(ConfigError, match=f"TrialConfig.{missing} is required; pass {missing}="):
    TrialConfig(**fields)


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 1, "TrialConfig.num_classes must be >= 2, got 1"),
    ("train_loader", 5, "TrialConfig.train_loader must be an iterable of"),
    ("log_interval", 0, "TrialConfig.log_interval must be >= 1, got 0"),
    ("input_shape", (8, 0), "TrialConfig.input_shape must be None or a non-empty tuple"),
    ("layout", "NWHC", "TrialConfig.layout must be one of 'NCHW', 'NHWC', got 'NWHC'"),
    ("validate_fn", "evaluate", "TrialConfig.validate_fn must be None or a callable"),
    ("fallback_metrics", {"auc": "low"}, "TrialConfig.fallback_metrics must be None or a mapping"),
    ("train_labels", [0.5, 1.5], "TrialConfig.train_labels must be None or a non-empty 1-D"),
    ("output_dir", 3, "TrialConfig.output_dir must be None or a non-empty path"),
    ("training", 3, "TrialConfig.training must be a TrainingConfig or a mapping"),
])
def test_bad_values_are_refused_naming_field_and_value(field, value, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    TrialConfig(**{**REQUIRED, field: value})


def test_sections_can_be_given_as_mappings_and_keep_their_own_checks():
  cfg = TrialConfig(**REQUIRED, training={"learning_rate": 0.01}, optuna={"epochs": 7})
  assert (cfg.training.learning_rate, cfg.optuna.epochs) == (0.01, 7)
  with pytest.raises(ConfigError, match="pruning_warmup_epochs must be < epochs"):
    TrialConfig(**REQUIRED, optuna={"epochs": 3, "pruning_warmup_epochs": 3})


def test_fallback_metrics_are_stored_read_only_as_floats():
  cfg = TrialConfig(**REQUIRED, fallback_metrics={"auc": 0})
  assert dict(cfg.fallback_metrics) == {"auc": 0.0}
  with pytest.raises(TypeError):
    cfg.fallback_metrics["auc"] = 1.0


def test_is_frozen_and_refuses_unknown_fields():
  cfg = TrialConfig(**REQUIRED, output_dir=pathlib.Path("out"))
  assert cfg.output_dir == "out"
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.log_interval = 3
  with pytest.raises(ConfigError, match="has no field 'epochs'"):
    TrialConfig(**REQUIRED, epochs=3)


def test_executor_lets_failures_through(make_cfg, study_factory):
  cfg = make_cfg(validate_fn=lambda *a, **k: {"loss": 1.0})
  with pytest.raises(KeyError, match="available"):
    TrialTrainingExecutor(cfg).execute(study_factory().ask())


def test_executor_returns_the_trials_best_value(make_cfg, study_factory):
  study = study_factory()
  value = TrialTrainingExecutor(make_cfg()).execute(study.ask())
  assert value == max(study.trials[0].intermediate_values.values())


# ------------------------------------------- monitored metric and direction --


@pytest.mark.parametrize("training, message", [
    ({"monitor_metric": "roc_auc"},
     "TrialConfig.training.monitor_metric must be one of 'auc', 'accuracy', 'f1', 'loss' (the "
     "metrics the default validation computes; pass validate_fn= for others), got 'roc_auc' "
     "(did you mean 'auc'?)"),
    ({"monitor_metric": "acc"},
     "TrialConfig.training.monitor_metric must be one of 'auc', 'accuracy', 'f1', 'loss' (the "
     "metrics the default validation computes; pass validate_fn= for others), got 'acc' "
     "(did you mean 'accuracy'?)"),
    ({"monitor_metric": "val_loss", "monitor_direction": "minimize"},
     "got 'val_loss' (did you mean 'loss'?)"),
    ({"monitor_metric": "perplexity"}, "got 'perplexity'"),
    ({"monitor_metric": "loss"},
     "TrialConfig.training.monitor_direction must be 'minimize' for 'loss' and 'maximize' for "
     "'auc', 'accuracy', 'f1', got monitor_metric='loss', monitor_direction='maximize'"),
    ({"monitor_metric": "accuracy", "monitor_direction": "minimize"},
     "got monitor_metric='accuracy', monitor_direction='minimize'"),
    ({"monitor_metric": "f1", "monitor_direction": "minimize"},
     "got monitor_metric='f1', monitor_direction='minimize'"),
])
def test_with_the_default_validation_the_metric_and_direction_are_checked_as_the_cli(training,
                                                                                    message):
  with pytest.raises(ConfigError) as raised:
    TrialConfig(**REQUIRED, training=training)
  assert message in str(raised.value)
  if "did you mean" not in message and "direction" not in message:
    assert "did you mean" not in str(raised.value)


@pytest.mark.parametrize("metric, direction", [
    ("auc", "maximize"), ("accuracy", "maximize"), ("f1", "maximize"), ("loss", "minimize")])
def test_the_default_validations_metrics_are_accepted_with_their_direction(metric, direction):
  cfg = TrialConfig(**REQUIRED, training={"monitor_metric": metric,
                                          "monitor_direction": direction})
  assert cfg.training.monitor_metric == metric


def test_a_validate_fn_may_monitor_any_metric_in_either_direction():
  cfg = TrialConfig(**REQUIRED, validate_fn=lambda *a, **k: {},
                    training={"monitor_metric": "roc_auc", "monitor_direction": "minimize"})
  assert cfg.training.monitor_metric == "roc_auc"
  with pytest.raises(ConfigError, match="got 'roc_auc'"):
    cfg.replace(validate_fn=None)  # replace checks again


def test_the_check_runs_when_a_section_is_replaced():
  cfg = TrialConfig(**REQUIRED)
  with pytest.raises(ConfigError, match="must be 'minimize' for 'loss'"):
    cfg.replace(training=cfg.training.replace(monitor_metric="loss"))
