"""What would fail every trial fails trial 0 (FAIL, with its error); run-time failures stay values.

Each test runs a real Optuna study of 3 trials through ``run_trial`` with the
default ``reraise_errors=False``, catching the error as a user's
``study.optimize(..., catch=...)`` would, and reads the trials back from the
study's storage: a setup mistake (configuration, model, monitored metric,
data format) gives 3 FAIL trials, each with the error in its ``error``
attribute, and never a COMPLETE trial with the worst value. Divergence and
three failed validations are run-time failures: COMPLETE with the worst value,
as in the reference.
"""

from __future__ import annotations

import logging
import math

import flax.linen as nn
import numpy as np
import optuna
import pytest

from orchard_jax.config import ConfigError
from orchard_jax.engine import fit, run_trial
from orchard_jax.engine.start import logits_problem
from orchard_jax.errors import DataError, MissingMetricError, SetupError

FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
N_TRIALS = 3


@pytest.fixture
def optimize(tmp_path):
  """``optimize(objective, catch, direction="maximize")``: runs a 3-trial study in an SQLite
  file and returns its trials as a fresh read of that storage shows them."""
  storage = f"sqlite:///{tmp_path / 'study.db'}"

  def run(objective, catch, direction="maximize"):
    study = optuna.create_study(study_name="fail_fast", storage=storage, direction=direction,
                                load_if_exists=True)
    study.optimize(objective, n_trials=N_TRIALS, catch=catch)
    return optuna.load_study(study_name="fail_fast", storage=storage).trials

  return run


def assert_failed_at_trial_0(trials, error: str):
  assert [t.state for t in trials] == [FAIL] * N_TRIALS
  assert trials[0].number == 0 and trials[0].value is None
  assert trials[0].user_attrs["error"] == error


class Dense(nn.Module):
  """A Linen module of ``width`` logits with the contract's ``train`` flag."""
  width: int

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.width)(x.reshape(x.shape[0], -1))


class NoTrain(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class WrongInput(nn.Module):
  """Multiplies its 64 features by a [5, 3] matrix: a TypeError when it is built."""

  @nn.compact
  def __call__(self, x, train: bool):
    kernel = self.param("kernel", nn.initializers.zeros, (5, 3))
    return x.reshape(x.shape[0], -1) @ kernel


class TupleOut(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    return {"logits": nn.Dense(3)(x.reshape(x.shape[0], -1))}


# --------------------------------------------------------------- the model --


@pytest.mark.parametrize("model, num_classes, message", [
    (Dense(5), 3, "the model's logits have shape (B, 5), expected (B, 3) for num_classes=3"),
    (Dense(10), 3, "the model's logits have shape (B, 10), expected (B, 3) for num_classes=3"),
    (Dense(1), 2, "the model's logits have shape (B, 1), expected (B, 2) for num_classes=2: a "
                  "binary model needs 2 logits, one per class (the loss is softmax "
                  "cross-entropy), not a single sigmoid logit"),
])
def test_logits_of_the_wrong_width_fail_trial_0_with_their_shape(make_cfg, train_data, model,
                                                                  num_classes, message, optimize):
  images, labels = train_data
  loader = [(images[i:i + 16], labels[i:i + 16] % num_classes) for i in range(0, 80, 16)]
  cfg = make_cfg(model=model, num_classes=num_classes, train_loader=loader, val_loader=loader)
  trials = optimize(lambda trial: run_trial(trial, cfg), catch=(SetupError,))
  assert_failed_at_trial_0(trials, f"SetupError: {message}")
  assert "\n" not in message


def test_the_logits_check_traces_without_training_or_compiling(make_cfg):
  from orchard_jax.engine import executables
  from orchard_jax.engine import initial_state
  state = initial_state(make_cfg(model=Dense(4)))
  before = executables.stats("train_step")["compiled"]
  assert logits_problem(state) == (
      "the model's logits have shape (B, 4), expected (B, 3) for num_classes=3")
  assert logits_problem(initial_state(make_cfg(model=Dense(3)))) is None
  assert executables.stats("train_step")["compiled"] == before


def test_a_model_that_returns_a_dict_is_told_what_logits_must_be(make_cfg):
  from orchard_jax.engine import initial_state
  assert logits_problem(initial_state(make_cfg(model=TupleOut()))) == (
      "the model returns a dict, expected logits of shape (B, 3) for num_classes=3")


def test_a_linen_module_without_train_fails_trial_0_naming_the_contract(make_cfg, optimize):
  cfg = make_cfg(model=NoTrain())
  trials = optimize(lambda trial: run_trial(trial, cfg), catch=(SetupError,))
  assert_failed_at_trial_0(
      trials, "SetupError: NoTrain.__call__(x) has no `train` argument: a Linen module must be "
              "callable as __call__(x, train: bool) (train=True while training, False to "
              "evaluate); for a flag of another name or meaning pass "
              "orchard_jax.models.as_model(module, train_kwarg='deterministic', invert=True)")


def test_a_type_error_while_the_state_is_built_fails_trial_0(make_cfg, optimize):
  cfg = make_cfg(model=WrongInput())
  trials = optimize(lambda trial: run_trial(trial, cfg), catch=(SetupError,))
  assert [t.state for t in trials] == [FAIL] * N_TRIALS
  assert trials[0].user_attrs["error"].startswith(
      "SetupError: building the trial's state failed: TypeError: ")


def test_setup_errors_fail_fit_too(make_cfg):
  with pytest.raises(SetupError, match=r"logits have shape \(B, 5\)"):
    fit(make_cfg(model=Dense(5)))


# ---------------------------------------------------- the monitored metric --


def test_a_metric_the_validation_does_not_return_fails_trial_0_listing_the_keys(make_cfg,
                                                                                 optimize):
  cfg = make_cfg(training={"monitor_metric": "roc_auc"},
                 validate_fn=lambda *a, **k: {"loss": 1.0, "auc": 0.5})
  trials = optimize(lambda trial: run_trial(trial, cfg), catch=(KeyError,))
  assert_failed_at_trial_0(
      trials, "MissingMetricError: monitor_metric 'roc_auc' is not among the validation "
              "metrics; available: ['auc', 'loss']")
  assert list(trials[0].intermediate_values) == []


def test_the_missing_metric_error_is_a_key_error_and_a_setup_error():
  error = MissingMetricError("monitor_metric 'x' is not among the validation metrics")
  assert isinstance(error, KeyError) and isinstance(error, SetupError)
  assert str(error) == "monitor_metric 'x' is not among the validation metrics"


def test_an_unknown_metric_with_the_default_validation_stops_the_study_at_trial_0(make_cfg,
                                                                                optimize):
  def objective(trial):  # the TrialConfig refuses it, before any training
    return run_trial(trial, make_cfg(training={"monitor_metric": "roc_auc"}))

  with pytest.raises(ConfigError, match=r"^TrialConfig\.training\.monitor_metric must be one of "
                     r"'auc', 'accuracy', 'f1', 'loss' .* got 'roc_auc' \(did you mean 'auc'\?\)$"):
    optimize(objective, catch=())
  trials = optimize(objective, catch=(ConfigError,))  # the same storage: trial 0 is there
  assert trials[0].state == FAIL and trials[0].number == 0
  assert [t.state for t in trials] == [FAIL] * (N_TRIALS + 1)


@pytest.mark.parametrize("reraise_errors", [False, True])
def test_a_configuration_error_inside_the_trial_fails_it(make_cfg, reraise_errors, optimize):
  def train(state, loader, *, epoch, layout):
    raise ConfigError("TrainingConfig.learning_rate must be in (1e-08, 1), got 3")

  cfg = make_cfg(train_epoch_fn=train, reraise_errors=reraise_errors)
  trials = optimize(lambda trial: run_trial(trial, cfg), catch=(ConfigError,))
  assert_failed_at_trial_0(
      trials, "ConfigError: TrainingConfig.learning_rate must be in (1e-08, 1), got 3")


# ------------------------------------------------------------------- data --


@pytest.mark.parametrize("make_loader, message", [
    (lambda x, y: [(x[i:i + 16], y[i:i + 16].astype(np.float32)) for i in range(0, 80, 16)],
     "DataError: training labels must be integer class ids, got dtype float32 in batch 0"),
    (lambda x, y: [{"image": x[i:i + 16], "label": y[i:i + 16]} for i in range(0, 80, 16)],
     "DataError: training batches must be (inputs, labels) pairs, got dict in batch 0"),
])
def test_a_data_format_error_fails_trial_0(make_cfg, train_data, make_loader, message, optimize):
  cfg = make_cfg(train_loader=make_loader(*train_data))
  trials = optimize(lambda trial: run_trial(trial, cfg), catch=(DataError,))
  assert [t.state for t in trials] == [FAIL] * N_TRIALS
  assert trials[0].user_attrs["error"].startswith(message)


# ----------------------------------------------- run-time failures: values --


def test_divergence_still_returns_the_worst_value(make_cfg, train_data, optimize):
  images, labels = train_data
  loader = [(images[i:i + 16] * 1e4, labels[i:i + 16]) for i in range(0, 80, 16)]
  cfg = make_cfg(train_loader=loader,
                 training={"learning_rate": 0.9, "momentum": 0.9, "grad_clip": 0.0})
  trials = optimize(lambda trial: run_trial(trial, cfg), catch=())
  assert [(t.state, t.value) for t in trials] == [(COMPLETE, -math.inf)] * N_TRIALS
  assert trials[0].user_attrs["error"].startswith("RuntimeError: Training diverged: loss=")


def test_three_failed_validations_still_return_the_worst_value(make_cfg, optimize):
  def validate(state, loader, *, epoch, layout):
    raise RuntimeError(f"validation broke at epoch {epoch}")

  cfg = make_cfg(training={"monitor_metric": "loss", "monitor_direction": "minimize"},
                 validate_fn=validate)
  trials = optimize(lambda trial: run_trial(trial, cfg), catch=(), direction="minimize")
  assert [(t.state, t.value) for t in trials] == [(COMPLETE, math.inf)] * N_TRIALS
  assert trials[0].user_attrs["error"] == (
      "RuntimeError: Validation failed 3 consecutive times, aborting trial")


def test_a_setup_error_is_logged_as_such(make_cfg, caplog, optimize):
  caplog.set_level(logging.ERROR, logger="orchard_jax")
  optimize(lambda trial: run_trial(trial, make_cfg(model=Dense(5))), catch=(SetupError,))
  assert ("Trial 0 failed on its setup: SetupError: the model's logits have shape (B, 5), "
          "expected (B, 3) for num_classes=3") in caplog.text


def test_a_good_model_passes_the_checks_and_completes(make_cfg, optimize):
  trials = optimize(lambda trial: run_trial(trial, make_cfg(model=Dense(3))), catch=())
  assert [t.state for t in trials] == [COMPLETE] * N_TRIALS
  assert all(math.isfinite(t.value) for t in trials)


def test_an_nnx_module_of_the_wrong_width_fails_too(make_cfg, optimize):
  from flax import nnx

  class Linear(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
      return self.dense(x.reshape(x.shape[0], -1))

  cfg = make_cfg(model=Linear(nnx.Rngs(0)))
  trials = optimize(lambda trial: run_trial(trial, cfg), catch=(SetupError,))
  assert_failed_at_trial_0(
      trials, "SetupError: the model's logits have shape (B, 4), expected (B, 3) for "
              "num_classes=3")

