"""``run_trial`` (an Optuna objective's body), ``fit`` and the reference's executor.

All three build a :class:`~orchard_jax.core.state.TrainState` from a
:class:`~orchard_jax.config.TrialConfig` and run the same
:func:`~orchard_jax.engine.loop.run_loop`, started by
:mod:`orchard_jax.engine.start`; they differ only in epochs and callbacks:

============  ===================  ==============================================
              epochs               callbacks
============  ===================  ==============================================
run_trial     ``optuna.epochs``    report/prune, LR step, best state
fit           ``training.epochs``  LR step, early stopping, best state
============  ===================  ==============================================

Every per-trial hyperparameter travels as a value into the state's arrays, so
the trials of a study with one architecture, optimizer kind, criterion,
precision and batch shape share one compiled ``train_step`` and ``eval_step``.

Failing fast: what would fail every trial the same way -- a configuration
error, a model that does not fit the contract or the data (checked once per
structure, with ``jax.eval_shape``, when the state is built), a monitored
metric the validation does not produce, bad data -- propagates out of
:func:`run_trial` whatever ``reraise_errors`` says, so Optuna marks the trial
FAIL and the user sees the error at trial 0. Run-time failures (divergence,
three failed validations) return the worst value, as the reference does; a
trial whose every validation failed has no value of its own and is FAIL
(:func:`~orchard_jax.engine.outcome.outcome_of`, the rule of every trial the
engine trains). :func:`train_trial` returns that outcome instead of raising.
"""


from __future__ import annotations

import logging
import pathlib
import time
from typing import NamedTuple

import optuna
from optuna.trial import TrialState

from orchard_jax.config import TrainingConfig, TrialConfig
from orchard_jax.core.state import TrainState
from orchard_jax.engine.callbacks import BestState, EarlyStopping, storage_call
from orchard_jax.engine.checkpoint import load_best
from orchard_jax.engine.loop import EpochLog, LoopResult, run_epochs
from orchard_jax.engine.outcome import Outcome, outcome_of
from orchard_jax.engine.start import (Prepared, best_state_dir, check_direction, initial_state,
                                      prepare, record_config, start_run, trial_record,
                                      trial_training_config)
from orchard_jax.records import CHECKPOINT_ERROR

logger = logging.getLogger(__name__)

__all__ = ["FitResult", "TrialTrainingExecutor", "best_state_dir", "fit",
           "initial_state", "load_best_state", "run_trial", "train_trial", "trial_completed",
           "trial_record", "trial_training_config"]


class FitResult(NamedTuple):
  """What :func:`fit` returns."""
  best: float                      # best monitored value (NaN ignored)
  best_epoch: int | None           # its epoch; None if every value was NaN
  history: tuple[EpochLog, ...]    # one entry per epoch run
  state: TrainState                # the state after the last epoch
  best_state: TrainState | None    # the state with the best epoch's parameters
  stopped_early: bool
  checkpoint_dir: pathlib.Path | None  # where the best state was written


def trial_completed(trial: optuna.Trial, training: TrainingConfig, best: BestState,
                    result: LoopResult) -> None:
  """Records a missing checkpoint's cause and logs a trial's end."""
  if best.write_error is not None:  # the trial keeps its value; its checkpoint is missing
    storage_call(trial.set_user_attr, CHECKPOINT_ERROR, best.write_error)
  logger.info("Trial %d completed", trial.number)
  logger.info("  Best %-13s: %.6f", training.monitor_metric.upper(), result.best)
  logger.info("  %-18s: %.4f", "Final Loss", result.final_train_loss)


class TrialTrainingExecutor:
  """The reference's executor: ``TrialTrainingExecutor(cfg).execute(trial)``.

  ``execute`` is the bare trial loop: it returns the best monitored value and
  lets every exception through (``TrialPruned`` included). Inside an Optuna
  objective prefer :func:`run_trial`, which adds the reference's objective
  guard (a failed trial returns the worst value instead of crashing).
  ``log_pruned``: whether a pruned trial's line is logged.

  Attributes:
    prepared: The started trial (:func:`~orchard_jax.engine.start.prepare`) once
      ``execute`` has started it; its ``run.history`` holds every epoch that ended.
    result: The loop's result once the trial ran to its end.
  """

  def __init__(self, cfg: TrialConfig, *, log_pruned: bool = True):
    if not isinstance(cfg, TrialConfig):
      raise TypeError(f"cfg must be a TrialConfig, got {type(cfg).__name__}")
    self.cfg, self.log_pruned = cfg, log_pruned
    self.prepared: Prepared | None = None
    self.result: LoopResult | None = None

  def execute(self, trial: optuna.Trial) -> float:
    """Trains ``optuna.epochs`` epochs, reporting to ``trial``; returns the best value."""
    self.prepared = prepared = prepare(trial, self.cfg, log_pruned=self.log_pruned)
    self.result = run_epochs(prepared.run, prepared.state)
    trial_completed(trial, prepared.training, prepared.best, self.result)
    return self.result.best


def train_trial(trial: optuna.Trial, cfg: TrialConfig, *, log_outcome: bool = True) -> Outcome:
  """Trains one trial as :func:`run_trial` does and returns how it ended, never raising.

  What would end :func:`run_trial` with an exception ends the outcome instead
  (:func:`~orchard_jax.engine.outcome.outcome_of`): PRUNED with the
  ``TrialPruned``, FAIL with the error (a ``KeyboardInterrupt`` among them: the
  caller tells the trial, then raises it again), COMPLETE with the worst value
  and the run-time failure behind it. The outcome holds every epoch that ended
  and the seconds from the start to the end. ``log_outcome=False``: the
  trial's failure and pruning are not logged (a caller that logs each finished
  trial itself); a failure is still recorded as the trial's ``error``.
  """
  started, executor = time.monotonic(), None
  try:
    check_direction(trial, cfg)
  except ValueError as e:  # before the trial starts: nothing logged or recorded
    return outcome_of(e, trial, None)._replace(seconds=time.monotonic() - started)
  try:
    record_config(trial, cfg)
    executor = TrialTrainingExecutor(cfg, log_pruned=log_outcome)
    value = executor.execute(trial)
    outcome = Outcome(TrialState.COMPLETE, value, None, executor.result)
  except BaseException as e:  # pylint: disable=broad-except  # told by the caller
    outcome = outcome_of(e, trial, cfg, log=log_outcome)
  prepared = None if executor is None else executor.prepared
  history = () if prepared is None else tuple(prepared.run.history)
  return outcome._replace(history=history, seconds=time.monotonic() - started)


def run_trial(trial: optuna.Trial, cfg: TrialConfig) -> float:
  """Trains one trial and returns its best monitored value, as the reference.

  Use it as an objective's body: suggest values, build ``cfg``, then
  ``return run_trial(trial, cfg)``. Trains ``cfg.optuna.epochs`` epochs,
  reports each non-NaN value to ``trial`` and prunes from epoch
  ``pruning_warmup_epochs`` on (see :mod:`orchard_jax.engine.loop`).

  At its start it logs, at info level, the trial's precision and active
  regularisation: ``Trial 3: precision float32, MixUp alpha 0.2 for 15
  epochs, label smoothing 0.0, class weights off``.

  Returns:
    The best value (direction-aware, NaN and the fallback's values ignored).
    If the trial fails at run time (the loss diverged -- a NaN or Inf loss of
    any training epoch function, ``cfg.train_epoch_fn``'s too --, validation
    failed three consecutive times, or anything not listed under Raises),
    the failure is logged, stored as ``trial.user_attrs["error"]``
    (``"<Type>: <message>"``) and the worst value is returned: ``-inf`` when
    maximizing, ``+inf`` when minimizing.

  Raises:
    optuna.TrialPruned: when the pruner stops the trial.
    orchard_jax.errors.StorageFault: a call to the study's storage (``trial.report``,
      ``should_prune``, ``set_user_attr``) failed: the fault is the storage's,
      not the trial's, so no value is returned for it (the study runner
      retries such a trial).
    orchard_jax.errors.DataError: bad training or validation data, whatever
      ``cfg.reraise_errors`` says: logged and stored as
      ``trial.user_attrs["error"]`` first, then re-raised, so Optuna stores
      the trial as FAIL and never as COMPLETE with the worst value (a value
      must come from the work it claims to measure; see
      ``docs/differences.md``).
    orchard_jax.errors.SetupError: whatever ``cfg.reraise_errors`` says, what
      would fail every trial the same way: a Linen module without a ``train``
      argument, logits that are not ``[B, num_classes]``, a ``TypeError``
      while the state is built, a monitored metric the validation does not
      return (``MissingMetricError``, a ``KeyError``). Logged and stored as
      ``trial.user_attrs["error"]`` first, like ``DataError``.
    orchard_jax.config.ConfigError: likewise, a configuration error.
    orchard_jax.errors.ValidationFailedError: likewise, every validation of a
      trial of one or two epochs failed: FAIL, never the fallback's value.
    Exception: any other failure, when ``cfg.reraise_errors`` (Optuna then
      marks the trial FAIL).
    ValueError: before training, if the study's direction disagrees with
      ``cfg.training.monitor_direction``.
  """
  outcome = train_trial(trial, cfg)
  if outcome.trial_state == TrialState.COMPLETE:
    return outcome.value
  raise outcome.error  # TrialPruned, or the failure


def fit(cfg: TrialConfig) -> FitResult:
  """Trains ``cfg.training.epochs`` epochs with early stopping; no Optuna.

  Early stopping ends the run after ``training.patience`` epochs without a
  new best. With ``cfg.output_dir`` the best state is written to
  ``best_state_dir(cfg.output_dir)``; if that write fails (a full disk) the
  result keeps its values, with a warning and ``checkpoint_dir`` None.
  Exceptions of the training propagate: divergence, three consecutive failed
  validations (``RuntimeError``), and a run that ends with every validation
  failed (:class:`~orchard_jax.errors.ValidationFailedError`), as
  :func:`run_trial` fails a trial: the fallback's value is never a result.
  """
  training = cfg.training
  directory = None if cfg.output_dir is None else best_state_dir(cfg.output_dir)
  best = BestState(directory, metric_name=training.monitor_metric)
  early = EarlyStopping(training.patience, metric_name=training.monitor_metric)
  result = run_epochs(*start_run(cfg, training, "fit", best=best, early=early))
  logger.info("Training completed: best %s %.6f at epoch %s, final loss %.4f",
              training.monitor_metric, result.best, result.best_epoch,
              result.final_train_loss)
  written = directory if best.epoch is not None and best.write_error is None else None
  if written is not None:
    _record_model(cfg, result.state, written)
  return FitResult(result.best, result.best_epoch, result.history, result.state,
                   best.apply_to(result.state), result.stopped_early, written)


def _record_model(cfg: TrialConfig, state: TrainState, directory: pathlib.Path) -> None:
  """``model.json`` beside the best state (:mod:`orchard_jax.engine.inference`), so that
  :func:`orchard_jax.load_model` rebuilds a built-in model from the folder alone (one of
  one's own code is passed to it). A failed write is a warning: the checkpoint stays."""
  from orchard_jax.engine.inference import write_model_record  # pylint: disable=import-outside-toplevel
  try:
    write_model_record(directory, architecture=None, num_classes=cfg.num_classes,
                       input_shape=state.spec.input_shape, layout=cfg.layout,
                       precision=str(state.spec.policy), model=trial_record(cfg)["model"])
  except OSError as e:
    logger.warning("model.json not written beside the best state in %s: %s", directory, e)


def load_best_state(cfg: TrialConfig, trial_number: int | None = None) -> TrainState:
  """Rebuilds the best state that a run of ``cfg`` wrote, without retraining.

  Args:
    cfg: The run's config (its ``output_dir``, model, input shape and
      precision define where and what to read).
    trial_number: The Optuna trial (e.g. ``study.best_trial.number``); None
      for a :func:`fit` run.

  Returns:
    A state with the best parameters, ready for
    :func:`orchard_jax.engine.evaluate`.
  """
  if cfg.output_dir is None:
    raise ValueError("TrialConfig.output_dir is None: nothing was written to load from")
  return load_best(best_state_dir(cfg.output_dir, trial_number), initial_state(cfg))
