"""run_trial with real Optuna studies and real (tiny) training."""

from __future__ import annotations

import dataclasses
import io
import logging
import math

import jax
import numpy as np
import optuna
import pytest
import torch

from orchard_jax.engine import executables

from orchard_jax.data import make_loader
from orchard_jax.engine import (EpochLoop, TrialTrainingExecutor, evaluate, load_best_state,
                                read_summary, best_state_dir, run_loop, run_trial,
                                trial_training_config)
from orchard_jax.models import MLP

NAN = float("nan")


def scripted(values, metric="auc"):
  def validate(state, loader, *, epoch, layout):
    return {"loss": 1.0, metric: values[epoch - 1]}
  return validate


def failing_validation(bad_epochs):
  def validate(state, loader, *, epoch, layout):
    if epoch in bad_epochs:
      raise RuntimeError(f"validation broke at epoch {epoch}")
    return {"auc": 0.5}
  return validate


def test_returns_the_best_value_ignoring_nan_when_maximizing(make_cfg, study_factory):
  cfg = make_cfg(optuna={"epochs": 4}, validate_fn=scripted([0.5, NAN, 0.8, 0.6]))
  assert run_trial(study_factory().ask(), cfg) == 0.8


def test_returns_the_lowest_loss_ignoring_nan_when_minimizing(make_cfg, study_factory):
  cfg = make_cfg(optuna={"epochs": 4},
                 training={"monitor_metric": "loss", "monitor_direction": "minimize"},
                 validate_fn=scripted([0.5, NAN, 0.3, 0.4], metric="loss"))
  assert run_trial(study_factory(direction="minimize").ask(), cfg) == 0.3


def test_trains_optuna_epochs_not_training_epochs(make_cfg, study_factory):
  study = study_factory()
  cfg = make_cfg(training={"epochs": 9}, optuna={"epochs": 2}, validate_fn=scripted([0.1, 0.2]))
  run_trial(study.ask(), cfg)
  assert study.trials[0].intermediate_values == {1: 0.1, 2: 0.2}


def test_mixup_epochs_are_capped_to_the_trial_epochs(make_cfg):
  training = trial_training_config(make_cfg(training={"mixup_epochs": 20}, optuna={"epochs": 3}))
  assert (training.epochs, training.mixup_epochs) == (3, 3)


def test_pruned_trial_raises_trial_pruned_and_ends_pruned(make_cfg, study_factory, fixed_pruner):
  study = study_factory(fixed_pruner(prune=True))
  cfg = make_cfg(optuna={"epochs": 3, "enable_pruning": True, "pruner_type": "median",
                         "pruning_warmup_epochs": 2})
  study.optimize(lambda trial: run_trial(trial, cfg), n_trials=1)
  trial = study.trials[0]
  assert trial.state == optuna.trial.TrialState.PRUNED
  assert sorted(trial.intermediate_values) == [1, 2] and "error" not in trial.user_attrs


def test_third_validation_failure_returns_the_worst_value_and_records_it(make_cfg, study_factory):
  study = study_factory()
  cfg = make_cfg(optuna={"epochs": 4}, validate_fn=failing_validation({1, 2, 3}))
  assert run_trial(study.ask(), cfg) == -math.inf
  assert study.trials[0].user_attrs["error"] == (
      "RuntimeError: Validation failed 3 consecutive times, aborting trial")


def test_two_validation_failures_use_the_fallback_and_the_trial_completes(make_cfg,
                                                                         study_factory):
  study = study_factory()
  cfg = make_cfg(optuna={"epochs": 3}, validate_fn=failing_validation({1, 2}),
                 fallback_metrics={"auc": 0.25})
  assert run_trial(study.ask(), cfg) == 0.5
  assert study.trials[0].intermediate_values == {1: 0.25, 2: 0.25, 3: 0.5}


def test_a_failure_when_minimizing_returns_plus_inf(make_cfg, study_factory):
  cfg = make_cfg(training={"monitor_metric": "loss", "monitor_direction": "minimize"},
                 validate_fn=failing_validation({1, 2, 3}))
  assert run_trial(study_factory(direction="minimize").ask(), cfg) == math.inf


def test_reraise_errors_lets_optuna_mark_the_trial_failed(make_cfg, study_factory):
  study = study_factory()
  cfg = make_cfg(optuna={"epochs": 4}, validate_fn=failing_validation({1, 2, 3}),
                 reraise_errors=True)
  study.optimize(lambda trial: run_trial(trial, cfg), n_trials=1, catch=(RuntimeError,))
  trial = study.trials[0]
  assert trial.state == optuna.trial.TrialState.FAIL
  assert "Validation failed 3 consecutive times" in trial.user_attrs["error"]


@pytest.mark.parametrize("reraise_errors", [False, True])
def test_missing_monitored_metric_is_a_key_error_listing_the_keys(make_cfg, study_factory,
                                                                 reraise_errors):
  # Raised whatever reraise_errors says: it would fail every trial (test_fail_fast.py).
  cfg = make_cfg(validate_fn=lambda *a, **k: {"loss": 1.0, "f1": 0.5},
                 reraise_errors=reraise_errors)
  with pytest.raises(KeyError, match=r"available: \['f1', 'loss'\]"):
    run_trial(study_factory().ask(), cfg)


def test_a_diverging_learning_rate_fails_with_the_divergence_message(make_cfg, study_factory,
                                                                    train_data, caplog):
  images, labels = train_data
  loader = [(images[i:i + 16] * 1e4, labels[i:i + 16]) for i in range(0, 80, 16)]
  cfg = make_cfg(train_loader=loader,
                 training={"learning_rate": 0.9, "momentum": 0.9, "grad_clip": 0.0})
  study = study_factory()
  assert run_trial(study.ask(), cfg) == -math.inf
  assert study.trials[0].user_attrs["error"].startswith("RuntimeError: Training diverged: loss=")
  assert "Trial 0 failed: RuntimeError: Training diverged" in caplog.text


@pytest.mark.parametrize("bad, shown", [(NAN, "nan"), (math.inf, "inf"), (-math.inf, "-inf")])
@pytest.mark.parametrize("as_array", [False, True], ids=["float", "device_scalar"])
def test_a_train_epoch_fn_s_nonfinite_loss_is_divergence_as_the_built_in_s(
    make_cfg, study_factory, caplog, tmp_path, bad, shown, as_array):
  from orchard_jax.engine import train_epoch

  def own_epoch(state, loader, *, epoch, layout):  # the task's own training epoch
    state, loss = train_epoch(state, loader, epoch=epoch, layout=layout)
    loss = bad if epoch == 2 else loss
    return state, (jax.numpy.asarray(loss) if as_array else loss)

  storage = f"sqlite:///{tmp_path / 'study.db'}"
  study = study_factory(storage=storage)
  cfg = make_cfg(optuna={"epochs": 3}, train_epoch_fn=own_epoch)
  study.optimize(lambda trial: run_trial(trial, cfg), n_trials=1)
  (trial,) = optuna.load_study(study_name=study.study_name, storage=storage).trials
  # as the built-in epoch's divergence: the worst value, with the reference's message
  assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == -math.inf
  assert trial.user_attrs["error"] == f"RuntimeError: Training diverged: loss={shown} at epoch 2"
  assert list(trial.intermediate_values) == [1]  # epoch 2 was neither validated nor reported
  assert f"Trial 0 failed: RuntimeError: Training diverged: loss={shown} at epoch 2" in caplog.text


def test_study_and_config_directions_must_agree(make_cfg, study_factory):
  with pytest.raises(ValueError, match="study direction is 'minimize'"):
    run_trial(study_factory(direction="minimize").ask(), make_cfg())


def test_the_best_value_is_reset_between_trials(make_cfg, study_factory):
  study = study_factory()
  assert run_trial(study.ask(), make_cfg(validate_fn=scripted([0.9, 0.8, 0.7]))) == 0.9
  assert run_trial(study.ask(), make_cfg(validate_fn=scripted([0.2, 0.3, 0.1]))) == 0.3


def test_logs_epoch_lines_and_the_completion_summary(make_cfg, study_factory, caplog):
  caplog.set_level(logging.INFO, logger="orchard_jax")
  cfg = make_cfg(optuna={"epochs": 5}, log_interval=2,
                 validate_fn=scripted([0.1, 0.2, 0.3, 0.4, 0.5]))
  run_trial(study_factory().ask(), cfg)
  messages = [r.getMessage() for r in caplog.records]
  epochs = [m.split(" |")[0] for m in messages if m.startswith("T0 E")]
  assert epochs == ["T0 E2/5", "T0 E4/5", "T0 E5/5"]
  assert "Trial 0 completed" in messages
  assert any(m.startswith("  Best AUC") and m.endswith(": 0.500000") for m in messages)
  assert any(m.startswith("  Final Loss") for m in messages)


def test_a_20_trial_study_of_one_structure_compiles_each_step_once(make_cfg, study_factory):
  # A model no other test uses, so the first trial compiles and no later one may.
  cfg = make_cfg(model=MLP(num_classes=3, hidden=(7,)), optuna={"epochs": 2},
                 reraise_errors=True)
  before = {name: executables.stats(name)["compiled"] for name in ("train_step", "eval_step")}

  def objective(trial):
    training = cfg.training.replace(
        learning_rate=trial.suggest_float("learning_rate", 1e-3, 0.3, log=True),
        momentum=trial.suggest_float("momentum", 0.0, 0.95),
        weight_decay=trial.suggest_float("weight_decay", 0.0, 0.01),
        grad_clip=trial.suggest_float("grad_clip", 0.0, 5.0),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.3),
        mixup_alpha=trial.suggest_float("mixup_alpha", 0.0, 0.4),
        scheduler_type=trial.suggest_categorical("scheduler_type", ["cosine", "plateau", "step"]),
        seed=trial.number)
    return run_trial(trial, cfg.replace(training=training))

  study = study_factory()
  study.optimize(objective, n_trials=20)
  assert len(study.trials) == 20
  assert executables.stats("train_step")["compiled"] - before["train_step"] == 1
  assert executables.stats("eval_step")["compiled"] - before["eval_step"] == 1


def test_mixup_is_switched_off_after_mixup_epochs_without_recompiling(make_cfg, study_factory):
  from orchard_jax.engine import train_epoch
  seen = []

  def recording_train(state, loader, *, epoch, layout):
    seen.append(bool(state.hparams.mixup_on))
    return train_epoch(state, loader, epoch=epoch, layout=layout)

  cfg = make_cfg(training={"mixup_alpha": 0.4, "mixup_epochs": 1}, optuna={"epochs": 3},
                 reraise_errors=True)
  run_trial(study_factory().ask(), cfg)  # compiles (or reuses) the step for this structure
  before = executables.stats("train_step")["compiled"]
  run_trial(study_factory().ask(), cfg.replace(train_epoch_fn=recording_train))
  assert seen == [True, False, False]
  assert executables.stats("train_step")["compiled"] == before


def test_weighted_loss_uses_class_weights_of_the_training_labels(make_cfg):
  from orchard_jax.core.losses import compute_class_weights
  from orchard_jax.engine import initial_state
  labels = np.array([0] * 40 + [1] * 30 + [2] * 10)
  images = np.zeros((80, 1, 8, 8), np.float32)
  cfg = make_cfg(train_loader=[(images[i:i + 16], labels[i:i + 16]) for i in range(0, 80, 16)],
                 training={"weighted_loss": True})
  state = initial_state(cfg)
  np.testing.assert_allclose(state.hparams.class_weights, compute_class_weights(labels, 3))
  np.testing.assert_allclose(state.hparams.class_weights, [80 / 120, 80 / 90, 80 / 30], rtol=1e-6)


def test_input_shape_comes_from_the_first_batch_in_channels_last(make_cfg):
  from orchard_jax.engine import initial_state
  assert initial_state(make_cfg()).spec.input_shape == (8, 8, 1)
  assert initial_state(make_cfg(input_shape=(64,))).spec.input_shape == (64,)


def test_the_same_seed_gives_the_same_result_twice(make_cfg, train_data, study_factory):
  # A shuffling DataLoader, MixUp and a cosine schedule; the validation loss is
  # monitored because it changes every epoch.
  dataset = torch.utils.data.TensorDataset(torch.from_numpy(train_data[0]),
                                           torch.from_numpy(train_data[1]))
  cfg = make_cfg(train_loader=make_loader(dataset, 16, shuffle=True, seed=3),
                 training={"mixup_alpha": 0.3, "scheduler_type": "cosine",
                           "monitor_metric": "loss", "monitor_direction": "minimize"},
                 reraise_errors=True)
  study = study_factory(direction="minimize")
  a, b = run_trial(study.ask(), cfg), run_trial(study.ask(), cfg)
  assert a == b and math.isfinite(a)
  assert study.trials[0].intermediate_values == study.trials[1].intermediate_values


def test_a_sqlite_study_runs_trials_and_saves_the_best_state(make_cfg, tmp_path):
  storage = f"sqlite:///{tmp_path / 'study.db'}"
  study = optuna.create_study(direction="minimize", storage=storage,
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
  cfg = make_cfg(training={"monitor_metric": "loss", "monitor_direction": "minimize"},
                 optuna={"enable_pruning": True, "pruner_type": "median",
                         "pruning_warmup_epochs": 1},
                 output_dir=tmp_path / "out", reraise_errors=True)

  def objective(trial):
    lr = trial.suggest_float("learning_rate", 0.01, 0.1, log=True)
    return run_trial(trial, cfg.replace(training=cfg.training.replace(learning_rate=lr)))

  study.optimize(objective, n_trials=2)
  best = optuna.load_study(study_name=study.study_name, storage=storage).best_trial
  best_cfg = cfg.replace(training=cfg.training.replace(**best.params))
  state = load_best_state(best_cfg, best.number)
  summary = read_summary(best_state_dir(cfg.output_dir, best.number))
  assert evaluate(state, cfg.val_loader)["loss"] == summary["value"] == best.value


def test_a_storage_fault_is_raised_as_such_never_the_worst_value(make_cfg, tmp_path):
  """A real SQLite lock held by another process, a short busy timeout: ``trial.report`` fails.
  run_trial raises StorageFault (the runner retries the trial) even without reraise_errors,
  instead of returning -inf as if the trial had failed on its own."""
  import subprocess
  import sys

  from orchard_jax.errors import StorageFault
  from orchard_jax.study.storage import open_storage

  db = tmp_path / "study.db"
  storage = open_storage(f"sqlite:///{db}", sqlite_timeout=0.2)
  study = optuna.create_study(direction="maximize", storage=storage)
  trial = study.ask()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sqlite3, sys, time\n"
       "c = sqlite3.connect(sys.argv[1], isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\n"
       "print('held', flush=True)\ntime.sleep(60)\n", str(db)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(StorageFault, match="database is locked"):
      run_trial(trial, make_cfg(reraise_errors=False))
  finally:
    holder.kill()
    holder.wait()
  assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # nothing claims a value


# ------------------------------------------------------- visible defaults ---


@pytest.mark.parametrize("training, line", [
    ({}, "Trial 0: precision float32, MixUp off, label smoothing 0.0, class weights off"),
    ({"mixup_alpha": 0.2, "mixup_epochs": 20, "label_smoothing": 0.1, "weighted_loss": True,
      "precision": "bfloat16"},
     "Trial 0: precision bfloat16, MixUp alpha 0.2 for 3 epochs, label smoothing 0.1, "
     "class weights on"),
    ({"mixup_alpha": 0.4, "mixup_epochs": 0},
     "Trial 0: precision float32, MixUp off, label smoothing 0.0, class weights off"),
])
def test_run_trial_logs_its_precision_and_regularisation_first(make_cfg, study_factory, caplog,
                                                               training, line):
  caplog.set_level(logging.INFO, logger="orchard_jax")
  run_trial(study_factory().ask(), make_cfg(training=training))  # 3 epochs: MixUp capped
  messages = [r.getMessage() for r in caplog.records if r.name.startswith("orchard_jax")]
  assert messages[0] == line
  assert [r.levelno for r in caplog.records if r.getMessage() == line] == [logging.INFO]


def test_the_reference_defaults_are_visible(make_cfg, study_factory, caplog):
  from orchard_jax.config import TrainingConfig
  caplog.set_level(logging.INFO, logger="orchard_jax")
  cfg = make_cfg(training={"mixup_alpha": TrainingConfig().mixup_alpha,
                           "mixup_epochs": TrainingConfig().mixup_epochs},
                 optuna={"epochs": 3})
  run_trial(study_factory().ask(), cfg)
  assert "MixUp alpha 0.2 for 3 epochs" in caplog.text


# ------------------------------------------------------------ progress bar ---


class _Terminal:
  """A text stream that says it is a terminal."""

  def __init__(self):
    self.parts = []

  def write(self, text):
    self.parts.append(text)

  def flush(self):
    pass

  def isatty(self):
    return True


def _loop_with_progress():
  return EpochLoop(epochs=3, train_fn=lambda state, epoch: (state, 0.5),
                   validate_fn=lambda state, epoch: {"auc": 0.5}, lr_for_epoch=lambda e: 0.1,
                   monitor_metric="auc", label="T7", progress=True)


class _State:
  def with_learning_rate(self, lr):
    return self

  def with_mixup(self, on):
    return self


def test_the_progress_bar_is_not_drawn_into_a_redirected_stderr(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr("sys.stderr", stream)
  run_loop(_State(), _loop_with_progress())
  assert stream.getvalue() == ""


def test_the_progress_bar_is_drawn_on_a_terminal(monkeypatch):
  terminal = _Terminal()
  monkeypatch.setattr("sys.stderr", terminal)
  run_loop(_State(), _loop_with_progress())
  assert "T7" in "".join(terminal.parts) and "\r" in "".join(terminal.parts)


def test_use_tqdm_false_draws_no_bar_even_on_a_terminal(monkeypatch):
  terminal = _Terminal()
  monkeypatch.setattr("sys.stderr", terminal)
  run_loop(_State(), dataclasses.replace(_loop_with_progress(), progress=False))
  assert terminal.parts == []
