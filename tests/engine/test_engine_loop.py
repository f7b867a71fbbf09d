"""The epoch loop on its own: fake training, scripted validation."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys

import pytest

from orchard_jax.core.state import create_train_state
from orchard_jax.engine.loop import (Callback, EpochLoop, fallback_metrics, run_loop,
                                     update_best, worst_value)
from orchard_jax.errors import ValidationFailedError
from orchard_jax.models import MLP

NAN = float("nan")


@pytest.fixture(scope="module")
def state():
  return create_train_state(MLP(num_classes=3, hidden=(4,)), input_shape=(8, 8, 1),
                            num_classes=3, mixup_alpha=0.4)


def make_loop(values=None, *, validate=None, epochs=None, **kw) -> EpochLoop:
  """A loop whose training is a no-op (loss 0.5) and whose validation is scripted."""
  epochs = epochs or len(values)
  validate = validate or (lambda state, epoch: {"auc": values[epoch - 1], "loss": 1.0})
  kw.setdefault("lr_for_epoch", lambda epoch: 0.1)
  return EpochLoop(epochs=epochs, train_fn=lambda state, epoch: (state, 0.5),
                   validate_fn=validate, monitor_metric=kw.pop("monitor_metric", "auc"), **kw)


class Recorder(Callback):
  def __init__(self, stop_at=None):
    self.logs, self.ended, self.stop_at = [], None, stop_at

  def on_epoch_end(self, log, state):
    self.logs.append(log)
    return log.epoch == self.stop_at

  def on_train_end(self, result):
    self.ended = result


def test_worst_value_is_minus_inf_maximizing_and_plus_inf_minimizing():
  assert worst_value("maximize") == -math.inf
  assert worst_value("minimize") == math.inf


def test_update_best_is_strict_and_ignores_nan():
  assert update_best(0.5, 0.7, "maximize") == (0.7, True)
  assert update_best(0.5, 0.5, "maximize") == (0.5, False)
  assert update_best(0.5, 0.3, "minimize") == (0.3, True)
  assert update_best(0.5, NAN, "maximize") == (0.5, False)


def test_best_ignores_nan_when_maximizing(state):
  result = run_loop(state, make_loop([0.5, NAN, 0.8, 0.6]))
  assert (result.best, result.best_epoch) == (0.8, 3)
  assert [log.best for log in result.history] == [0.5, 0.5, 0.8, 0.8]


def test_best_ignores_nan_when_minimizing(state):
  loop = make_loop(validate=lambda s, e: {"loss": [0.5, NAN, 0.3, 0.4][e - 1]}, epochs=4,
                   monitor_metric="loss", direction="minimize")
  result = run_loop(state, loop)
  assert (result.best, result.best_epoch) == (0.3, 3)


def test_best_stays_at_worst_when_every_value_is_nan(state):
  result = run_loop(state, make_loop([NAN, NAN]))
  assert result.best == -math.inf and result.best_epoch is None


def test_fallback_defaults_to_loss_999_plus_monitored_metric_at_zero():
  assert dict(fallback_metrics(None, "auc")) == {"loss": 999.0, "auc": 0.0}
  assert dict(fallback_metrics({"auc": 0.5}, "auc")) == {"auc": 0.5}
  assert dict(fallback_metrics({"f1": 0.1}, "auc")) == {"f1": 0.1, "auc": 0.0}


def test_fallback_is_read_only():
  with pytest.raises(TypeError):
    fallback_metrics(None, "auc")["auc"] = 1.0


def failing_at(bad_epochs, values=None, error=RuntimeError):
  def validate(state, epoch):
    if epoch in bad_epochs:
      raise error(f"boom at {epoch}")
    return {"auc": 0.9 if values is None else values[epoch - 1]}
  return validate


def test_validation_failing_twice_uses_fresh_fallback_copies_and_recovers(state, caplog):
  caplog.set_level(logging.ERROR, logger="orchard_jax")
  result = run_loop(state, make_loop(validate=failing_at({2, 3}), epochs=4))
  metrics = [log.metrics for log in result.history]
  assert metrics[1] == metrics[2] == {"loss": 999.0, "auc": 0.0}
  assert metrics[1] is not metrics[2]
  metrics[1]["auc"] = 5.0  # a copy: the next failure must not see this
  assert [log.validation_failed for log in result.history] == [False, True, True, False]
  assert "Validation failed (x2) at epoch 3: boom at 3" in caplog.text


def test_each_failing_epoch_gets_its_own_copy_of_the_fallback(state):
  seen = []

  class Mutator(Callback):
    def on_epoch_end(self, log, state):
      seen.append(dict(log.metrics))
      log.metrics["auc"] = 7.0

  run_loop(state, make_loop(validate=failing_at({1, 2}), epochs=3), [Mutator()])
  assert seen[1] == {"loss": 999.0, "auc": 0.0}


def test_successful_validation_resets_the_failure_counter(state):
  result = run_loop(state, make_loop(validate=failing_at({1, 2, 4, 5}), epochs=6))
  assert len(result.history) == 6


def test_third_consecutive_validation_failure_aborts(state):
  with pytest.raises(RuntimeError, match="^Validation failed 3 consecutive times, aborting trial$"):
    run_loop(state, make_loop(validate=failing_at({2, 3, 4}), epochs=5))


def test_a_failed_epoch_s_fallback_value_never_becomes_the_best(state):
  # the reference would take the fallback's 0.95 as the best; it measured nothing
  loop = make_loop(validate=failing_at({2}, values=[0.5, None, 0.6]), epochs=3,
                   fallback={"auc": 0.95})
  result = run_loop(state, loop)
  assert [log.value for log in result.history] == [0.5, 0.95, 0.6]
  assert (result.best, result.best_epoch) == (0.6, 3)
  assert [log.improved for log in result.history] == [True, False, True]


def test_a_run_stopped_with_every_validation_failed_has_no_value(state):
  with pytest.raises(ValidationFailedError,
                     match=r"^every validation failed \(2 of 2 epochs\): RuntimeError: boom at 2$"):
    run_loop(state, make_loop(validate=failing_at({1, 2, 3}), epochs=5), [Recorder(stop_at=2)])


@pytest.mark.parametrize("loss, shown", [(NAN, "nan"), (math.inf, "inf")])
def test_any_training_function_s_nonfinite_loss_is_divergence(state, loss, shown):
  loop = make_loop([0.5, 0.6, 0.7])
  loop = dataclasses.replace(loop, train_fn=lambda s, e: (s, loss if e == 2 else 0.5))
  recorder = Recorder()
  with pytest.raises(RuntimeError, match=rf"^Training diverged: loss={shown} at epoch 2$"):
    run_loop(state, loop, [recorder])
  assert [log.epoch for log in recorder.logs] == [1]  # epoch 2 never validated nor reported


def test_value_errors_also_fall_back(state):
  result = run_loop(state, make_loop(validate=failing_at({1}, error=ValueError), epochs=2))
  assert result.history[0].validation_failed


def test_other_validation_errors_propagate_at_once(state):
  with pytest.raises(TypeError, match="boom at 1"):
    run_loop(state, make_loop(validate=failing_at({1}, error=TypeError), epochs=2))


class FailsOnFetch:
  """A device value whose host fetch fails, as an XLA runtime error does."""

  def __float__(self):
    raise RuntimeError("XLA runtime error surfaced on fetch")


def test_a_failing_host_fetch_of_the_metrics_uses_the_fallback(state):
  loop = make_loop(validate=lambda s, e: {"auc": FailsOnFetch() if e == 1 else 0.7}, epochs=2)
  result = run_loop(state, loop)
  assert result.history[0].metrics == {"loss": 999.0, "auc": 0.0}
  assert result.best == 0.7


def test_missing_monitored_metric_raises_key_error_listing_keys(state):
  loop = make_loop(validate=lambda s, e: {"loss": 1.0, "accuracy": 0.5}, epochs=1)
  with pytest.raises(KeyError, match=r"'auc'.*available: \['accuracy', 'loss'\]"):
    run_loop(state, loop)


def test_logs_every_log_interval_and_the_last_epoch(state, caplog):
  caplog.set_level(logging.INFO, logger="orchard_jax")
  run_loop(state, make_loop([0.1, 0.2, 0.3, 0.4, 0.5], log_interval=2, label="T7"))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("T7 E")]
  assert lines == ["T7 E2/5 | Loss:0.5000 | auc:0.2000 (Best:0.2000)",
                   "T7 E4/5 | Loss:0.5000 | auc:0.4000 (Best:0.4000)",
                   "T7 E5/5 | Loss:0.5000 | auc:0.5000 (Best:0.5000)"]


def test_learning_rate_and_mixup_are_written_into_the_state_each_epoch(state):
  seen = []

  def train(s, epoch):
    seen.append((epoch, float(s.learning_rate), bool(s.hparams.mixup_on)))
    return s, 0.5

  loop = EpochLoop(epochs=4, train_fn=train, validate_fn=lambda s, e: {"auc": 0.5},
                   lr_for_epoch=lambda e: 0.5**e, monitor_metric="auc", mixup_epochs=2)
  result = run_loop(state, loop)
  assert seen == [(1, 0.5, True), (2, 0.25, True), (3, 0.125, False), (4, 0.0625, False)]
  assert [log.mixup for log in result.history] == [True, True, False, False]


def test_a_callback_can_stop_the_run_and_every_callback_still_runs(state):
  first, second = Recorder(stop_at=2), Recorder()
  result = run_loop(state, make_loop([0.1, 0.2, 0.3, 0.4]), [first, second])
  assert [log.epoch for log in second.logs] == [1, 2]
  assert result.stopped_early and second.ended is result


def test_callbacks_see_the_epoch_log(state):
  recorder = Recorder()
  run_loop(state, make_loop([0.3, 0.2]), [recorder])
  log = recorder.logs[1]
  assert (log.epoch, log.epochs, log.value, log.best, log.improved) == (2, 2, 0.2, 0.3, False)
  assert (log.train_loss, log.learning_rate) == (0.5, pytest.approx(0.1))


def test_progress_bar_advances_per_epoch(state, capsys, monkeypatch):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a terminal: drawn
  run_loop(state, make_loop([0.1, 0.2], progress=True, label="T0"))
  err = capsys.readouterr().err
  assert "T0" in err and "2/2" in err
