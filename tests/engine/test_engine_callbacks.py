"""Epoch-end callbacks: Optuna report/prune, LR step, early stopping, best state."""

from __future__ import annotations

import logging

import jax
import numpy as np
import optuna
import pytest

from orchard_jax.core.schedules import LRController
from orchard_jax.core.state import create_train_state
from orchard_jax.engine.callbacks import (BestState, EarlyStopping, LRSchedulerStep,
                                          OptunaReportPrune)
from orchard_jax.engine.checkpoint import load_best, read_summary
from orchard_jax.engine.loop import EpochLoop, run_loop
from orchard_jax.models import MLP

NAN = float("nan")


def fresh_state(seed=0):
  return create_train_state(MLP(num_classes=3, hidden=(4,)), input_shape=(8, 8, 1),
                            num_classes=3, seed=seed)


def scripted_loop(values, *, lr_for_epoch=lambda e: 0.1, train_fn=None) -> EpochLoop:
  return EpochLoop(epochs=len(values), train_fn=train_fn or (lambda s, e: (s, 0.5)),
                   validate_fn=lambda s, e: {"auc": values[e - 1]},
                   lr_for_epoch=lr_for_epoch, monitor_metric="auc")


def report_prune(trial, warmup, enable=True):
  return OptunaReportPrune(trial, enable_pruning=enable, warmup_epochs=warmup, metric_name="auc")


def test_reports_each_epoch_value_at_its_epoch_and_skips_nan(study_factory):
  study = study_factory()
  trial = study.ask()
  run_loop(fresh_state(), scripted_loop([0.5, NAN, 0.7]), [report_prune(trial, 0, enable=False)])
  assert study.trials[0].intermediate_values == {1: 0.5, 3: 0.7}


@pytest.mark.parametrize("warmup, first_prune", [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_first_possible_prune_is_at_epoch_max_warmup_1(study_factory, fixed_pruner, caplog,
                                                        warmup, first_prune):
  caplog.set_level(logging.INFO, logger="orchard_jax")
  pruner = fixed_pruner(prune=True)
  study = study_factory(pruner)
  trial = study.ask()
  with pytest.raises(optuna.TrialPruned):
    run_loop(fresh_state(), scripted_loop([0.5] * 4), [report_prune(trial, warmup)])
  assert pruner.asked_at == [first_prune]
  assert max(study.trials[0].intermediate_values) == first_prune
  assert f"Trial 0 pruned at epoch {first_prune} (auc=0.5000)" in caplog.text


def test_a_never_pruning_pruner_is_asked_every_epoch_from_warmup_on(study_factory, fixed_pruner):
  pruner = fixed_pruner(prune=False)
  trial = study_factory(pruner).ask()
  result = run_loop(fresh_state(), scripted_loop([0.5] * 4), [report_prune(trial, 2)])
  assert pruner.asked_at == [2, 3, 4] and len(result.history) == 4


def test_disabled_pruning_never_asks_the_pruner(study_factory, fixed_pruner):
  pruner = fixed_pruner(prune=True)
  trial = study_factory(pruner).ask()
  run_loop(fresh_state(), scripted_loop([0.5] * 3), [report_prune(trial, 0, enable=False)])
  assert pruner.asked_at == []


def plateau_controller(epochs):
  return LRController("plateau", learning_rate=0.4, min_lr=1e-3, epochs=epochs, step_size=1,
                      factor=0.5, patience=0, monitor_direction="maximize")


def test_plateau_halves_the_lr_after_each_epoch_without_improvement():
  controller = plateau_controller(4)
  loop = scripted_loop([0.5, 0.5, 0.5, 0.5], lr_for_epoch=controller.lr_for_epoch)
  result = run_loop(fresh_state(), loop, [LRSchedulerStep(controller)])
  assert [log.learning_rate for log in result.history] == pytest.approx([0.4, 0.4, 0.2, 0.1])


def test_plateau_keeps_the_lr_while_the_metric_improves():
  controller = plateau_controller(4)
  loop = scripted_loop([0.5, 0.6, 0.7, 0.8], lr_for_epoch=controller.lr_for_epoch)
  result = run_loop(fresh_state(), loop, [LRSchedulerStep(controller)])
  assert [log.learning_rate for log in result.history] == pytest.approx([0.4] * 4)


def test_early_stopping_stops_after_patience_epochs_without_a_new_best(caplog):
  caplog.set_level(logging.INFO, logger="orchard_jax")
  result = run_loop(fresh_state(), scripted_loop([0.5, 0.6, 0.6, 0.55, 0.9, 0.9]),
                    [EarlyStopping(2, metric_name="auc")])
  assert len(result.history) == 4 and result.stopped_early
  assert "Early stopping at epoch 4: no new best auc for 2 epochs" in caplog.text


def test_early_stopping_refuses_patience_below_one():
  with pytest.raises(ValueError, match="patience must be an int >= 1, got patience=0"):
    EarlyStopping(0, metric_name="auc")


def shifting_train(s, epoch):
  """Each epoch adds ``epoch`` to every parameter (distinct params per epoch)."""
  return s.replace(params=jax.tree.map(lambda p: p + epoch, s.params)), 0.5


def test_best_state_keeps_a_copy_of_the_best_epochs_params():
  initial = jax.device_get(fresh_state().params)
  best = BestState(metric_name="auc")
  result = run_loop(fresh_state(), scripted_loop([0.1, 0.9, 0.3], train_fn=shifting_train),
                    [best])
  assert best.epoch == 2 and best.value == 0.9
  kept = best.apply_to(result.state).params
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, (b + 1.0) + 2.0), kept, initial)


def test_best_state_writes_and_load_best_restores_it(tmp_path):
  best = BestState(tmp_path / "run", metric_name="auc")
  run_loop(fresh_state(), scripted_loop([0.1, 0.9, 0.3], train_fn=shifting_train), [best])
  restored = load_best(tmp_path / "run", fresh_state(seed=5))
  jax.tree.map(np.testing.assert_array_equal, restored.params, best.params)
  assert read_summary(tmp_path / "run") == {"epoch": 2, "value": 0.9, "metric": "auc"}


def test_best_state_writes_nothing_when_every_value_is_nan(tmp_path, caplog):
  best = BestState(tmp_path / "run", metric_name="auc")
  run_loop(fresh_state(), scripted_loop([NAN, NAN]), [best])
  assert not (tmp_path / "run").exists() and "all NaN" in caplog.text


def test_load_best_names_the_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no best-state checkpoint"):
    load_best(tmp_path, fresh_state())
