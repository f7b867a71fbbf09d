"""Epoch-end callbacks of :func:`orchard_jax.engine.loop.run_loop`.

* :class:`OptunaReportPrune` -- ``trial.report`` (NaN skipped) once the value is measured and,
  from ``pruning_warmup_epochs`` on, ``trial.should_prune()`` -> ``TrialPruned`` (a cohort's
  members: one :class:`~orchard_jax.engine.pruning.EpochView` per epoch).
* :class:`LRSchedulerStep` -- one scheduler step per epoch; the plateau
  scheduler gets the monitored value.
* :class:`EarlyStopping` -- stops after ``patience`` epochs without a new best.
* :class:`BestState` -- keeps the best epoch's parameters (a device copy) and,
  given a directory, writes them at the end of the run
  (:func:`orchard_jax.engine.checkpoint.save_best`); a write that fails (a
  full disk) is one warning and ``write_error``, never the loss of the
  trained run; its traceback comes with the warning only when the logger is
  enabled for DEBUG (``orchard-jax ... --debug``).
"""

from __future__ import annotations

import logging
import math
import pathlib
from typing import Any

import jax
import optuna

from orchard_jax.core.schedules import LRController
from orchard_jax.core.state import TrainState
from orchard_jax.engine.checkpoint import save_best
from orchard_jax.engine.loop import Callback, EpochLog, LoopResult
from orchard_jax.engine.pruning import EpochView
from orchard_jax.errors import StorageFault, root_cause

logger = logging.getLogger(__name__)

def storage_call(method: Any, *args: Any) -> Any:
  """``method(*args)``, a call of an Optuna trial; its failure is the study storage's, not the
  trial's: raised as :class:`~orchard_jax.errors.StorageFault`, chained to the original."""
  try:
    return method(*args)
  except Exception as e:  # pylint: disable=broad-except
    raise StorageFault(f"{getattr(method, '__name__', 'a call of the study storage')} failed: "
                       f"{root_cause(e)}") from e


class OptunaReportPrune(Callback):
  """Reports each epoch's value to an Optuna trial and prunes after warmup.

  ``trial.report(value, epoch)`` unless the value is NaN, as soon as the value is measured.
  When pruning is enabled and ``epoch >= warmup_epochs``, asks ``trial.should_prune()`` (or,
  for a cohort's member, its cohort's :attr:`view` of the epoch) and, if so, logs (unless
  ``log_pruned`` is False: a caller that logs each finished trial itself) and raises
  ``optuna.TrialPruned``. With warmup 2 the first possible prune is at epoch 2, as in the
  reference.
  """

  def __init__(self, trial: optuna.Trial, *, enable_pruning: bool, warmup_epochs: int,
               metric_name: str, log_pruned: bool = True):
    self.trial, self.enable_pruning = trial, enable_pruning
    self.warmup_epochs, self.metric_name = warmup_epochs, metric_name
    self.log_pruned = log_pruned
    self.view: EpochView | None = None  # a cohort's, set for each of its epochs

  def on_epoch_measured(self, log: EpochLog) -> None:
    if not math.isnan(log.value):
      storage_call(self.trial.report, log.value, log.epoch)

  def on_epoch_end(self, log: EpochLog, state: TrainState) -> bool:
    if not self.enable_pruning or log.epoch < self.warmup_epochs:
      return False
    if self.view is None:
      prune = storage_call(self.trial.should_prune)
    else:
      prune = storage_call(self.view.should_prune, self.trial)
    if prune:
      if self.log_pruned:
        logger.info("Trial %d pruned at epoch %d (%s=%.4f)", self.trial.number, log.epoch,
                    self.metric_name, log.value)
      raise optuna.TrialPruned(f"Trial {self.trial.number} pruned at epoch {log.epoch} "
                               f"({self.metric_name}={log.value:.4f})")
    return False


class LRSchedulerStep(Callback):
  """Steps an :class:`LRController` once per epoch with the monitored value
  (only the plateau scheduler reads it, as torch's ``step(metric)``)."""

  def __init__(self, controller: LRController):
    self.controller = controller

  def on_epoch_end(self, log: EpochLog, state: TrainState) -> bool:
    self.controller.step(log.value)
    return False


class EarlyStopping(Callback):
  """Stops the run once ``patience`` consecutive epochs set no new best."""

  def __init__(self, patience: int, *, metric_name: str):
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
      raise ValueError(f"patience must be an int >= 1, got patience={patience!r}")
    self.patience, self.metric_name, self.wait = patience, metric_name, 0

  def on_epoch_end(self, log: EpochLog, state: TrainState) -> bool:
    self.wait = 0 if log.improved else self.wait + 1
    if self.wait < self.patience:
      return False
    logger.info("Early stopping at epoch %d: no new best %s for %d epochs (best %.4f)",
                log.epoch, self.metric_name, self.wait, log.best)
    return True


def _copy(tree: Any) -> Any:
  """A device copy that outlives the donated state (a buffer copy: no program to compile)."""
  return jax.device_put(tree, may_alias=False)


class BestState(Callback):
  """Keeps the parameters and model state of the best epoch.

  The copy stays on the device (the state itself is donated to the next
  step). With a ``directory``, the best is written there at the end of the
  run: an orbax checkpoint of ``{"params", "model_state"}`` in
  ``directory/checkpoint`` and ``directory/best.json`` (epoch, value,
  metric). Read it back with :func:`load_best`.

  A write that fails (a full disk, any error of orbax) costs nothing of the
  run: it is logged as one warning with its cause, kept in ``write_error``,
  and ``directory`` keeps what it held before (or stays absent).

  Attributes:
    epoch: The best epoch, or None before any epoch improved.
    value: Its monitored value.
    params, model_state: Copies of that epoch's arrays.
    write_error: Why the best state could not be written (one line), or None.
  """

  def __init__(self, directory: str | pathlib.Path | None = None, *, metric_name: str,
               trial_number: int | None = None):
    self.directory = None if directory is None else pathlib.Path(directory).absolute()
    self.metric_name, self.trial_number = metric_name, trial_number
    self.epoch: int | None = None
    self.value = math.nan
    self.params = self.model_state = None
    self.write_error: str | None = None

  def on_epoch_end(self, log: EpochLog, state: TrainState) -> bool:
    if log.improved:
      self.epoch, self.value = log.epoch, log.value
      self.params, self.model_state = _copy((state.params, state.model_state))
    return False

  def on_train_end(self, result: LoopResult) -> None:
    if self.directory is None:
      return
    if self.epoch is None:
      logger.warning("No epoch set a best %s (all NaN); nothing written to %s",
                     self.metric_name, self.directory)
      return
    try:
      save_best(self.directory, self.params, self.model_state,
                {"epoch": self.epoch, "value": self.value, "metric": self.metric_name})
    except Exception as e:  # pylint: disable=broad-except  # the run's value must survive
      self.write_error = root_cause(e)
      who, keeps = (("Fit", "the run keeps its result") if self.trial_number is None else
                    (f"Trial {self.trial_number}", "the trial keeps its value"))
      logger.warning("%s: the best state could not be written to %s: %s; %s", who,
                     self.directory, self.write_error, keeps,
                     exc_info=e if logger.isEnabledFor(logging.DEBUG) else None)

  def apply_to(self, state: TrainState) -> TrainState | None:
    """``state`` with the best parameters and model state; None if none yet."""
    if self.epoch is None:
      return None
    return state.replace(params=self.params, model_state=self.model_state)


# Orbax's checkpointers wait on process-wide signals: two of them saving at once in one process
# (trials in ``optuna.n_jobs`` threads) deadlock, so this process's saves and loads take turns.
