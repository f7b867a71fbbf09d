"""fit: the same loop without Optuna, with early stopping and the best state."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from orchard_jax.engine import evaluate, fit, load_best_state, read_summary


def scripted(values):
  def validate(state, loader, *, epoch, layout):
    return {"loss": 1.0, "auc": values[epoch - 1]}
  return validate


def test_fit_trains_training_epochs_not_optuna_epochs(make_cfg):
  result = fit(make_cfg(training={"epochs": 4}, optuna={"epochs": 2}))
  assert [log.epoch for log in result.history] == [1, 2, 3, 4]
  assert not result.stopped_early


def test_fit_stops_early_after_patience_epochs_without_a_new_best(make_cfg):
  cfg = make_cfg(training={"epochs": 8, "patience": 2},
                 validate_fn=scripted([0.5, 0.7, 0.6, 0.7, 0.9, 0.9, 0.9, 0.9]))
  result = fit(cfg)
  assert len(result.history) == 4 and result.stopped_early
  assert (result.best, result.best_epoch) == (0.7, 2)


def test_fit_returns_the_best_epochs_state(make_cfg):
  cfg = make_cfg(training={"epochs": 4, "monitor_metric": "loss",
                           "monitor_direction": "minimize"})
  result = fit(cfg)
  best_log = result.history[result.best_epoch - 1]
  assert evaluate(result.best_state, cfg.val_loader) == best_log.metrics
  assert result.best == min(log.metrics["loss"] for log in result.history)


def test_fit_saves_the_best_state_and_reloading_it_needs_no_training(make_cfg, tmp_path):
  cfg = make_cfg(training={"epochs": 4, "monitor_metric": "loss",
                           "monitor_direction": "minimize"}, output_dir=tmp_path)
  result = fit(cfg)
  assert result.checkpoint_dir == tmp_path / "fit"
  assert read_summary(result.checkpoint_dir)["epoch"] == result.best_epoch

  def refuse_training(*args, **kwargs):
    raise AssertionError("loading the best state must not train")

  reloaded = load_best_state(cfg.replace(train_epoch_fn=refuse_training))
  jax.tree.map(np.testing.assert_array_equal, reloaded.params, result.best_state.params)
  assert evaluate(reloaded, cfg.val_loader) == result.history[result.best_epoch - 1].metrics


def test_fit_lets_errors_through(make_cfg):
  cfg = make_cfg(validate_fn=lambda *a, **k: {"loss": 1.0})
  with pytest.raises(KeyError, match=r"'auc' is not among the validation metrics"):
    fit(cfg)


def test_load_best_state_needs_an_output_dir(make_cfg):
  with pytest.raises(ValueError, match="output_dir is None"):
    load_best_state(make_cfg())
