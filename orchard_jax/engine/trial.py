"""``run_trial`` (an Optuna objective's body), ``fit`` and the reference's executor.

All three build a :class:`~orchard_jax.core.state.TrainState` from a
:class:`~orchard_jax.config.TrialConfig` and run the same
:func:`~orchard_jax.engine.loop.run_loop`; they differ only in epochs and
callbacks:

============  ===================  ==============================================
              epochs               callbacks
============  ===================  ==============================================
run_trial     ``optuna.epochs``    report/prune, LR step, best state
fit           ``training.epochs``  LR step, early stopping, best state
============  ===================  ==============================================

Every per-trial hyperparameter travels as a value into the state's arrays, so
the trials of a study with one architecture, optimizer kind, criterion,
precision and batch shape share one compiled ``train_step`` and ``eval_step``.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import sys
from typing import Any, NamedTuple

import numpy as np
import optuna

from orchard_jax.config import TrainingConfig, TrialConfig
from orchard_jax.core.losses import compute_class_weights
from orchard_jax.core.schedules import LRController
from orchard_jax.core.sharding import data_mesh, replicate_state
from orchard_jax.core.state import TrainState, state_from_config
from orchard_jax.data.adapter import Where, device_batches, loader_error
from orchard_jax.engine.callbacks import (BestState, EarlyStopping, LRSchedulerStep,
                                          OptunaReportPrune, load_best, storage_call)
from orchard_jax.engine.epoch import evaluate, train_epoch
from orchard_jax.engine.loop import (Callback, EpochLog, EpochLoop, LoopResult, run_loop,
                                     worst_value)
from orchard_jax.errors import DataError, EmptyLoaderError, StorageFault

logger = logging.getLogger(__name__)


class FitResult(NamedTuple):
  """What :func:`fit` returns."""
  best: float                      # best monitored value (NaN ignored)
  best_epoch: int | None           # its epoch; None if every value was NaN
  history: tuple[EpochLog, ...]    # one entry per epoch run
  state: TrainState                # the state after the last epoch
  best_state: TrainState | None    # the state with the best epoch's parameters
  stopped_early: bool
  checkpoint_dir: pathlib.Path | None  # where the best state was written


# ------------------------------------------------------------ preparation ---


def trial_training_config(cfg: TrialConfig) -> TrainingConfig:
  """The TrainingConfig of one trial: ``optuna.epochs`` epochs, ``mixup_epochs``
  capped to them (the reference's trial config builder)."""
  epochs = cfg.optuna.epochs
  return cfg.training.replace(epochs=epochs, mixup_epochs=min(cfg.training.mixup_epochs, epochs))


def best_state_dir(output_dir: str | pathlib.Path, trial_number: int | None = None) -> pathlib.Path:
  """Where a run writes its best state: ``output_dir/trial_<n>`` or ``output_dir/fit``."""
  name = "fit" if trial_number is None else f"trial_{trial_number}"
  return pathlib.Path(output_dir).absolute() / name


def _reseed(loader: Any, seed: int) -> None:
  """Restarts a torch DataLoader's shuffling stream, so reruns see the same order."""
  generator = getattr(loader, "generator", None)
  torch = sys.modules.get("torch")
  if torch is not None and isinstance(generator, torch.Generator):
    generator.manual_seed(seed)


def _first_input_shape(cfg: TrialConfig) -> tuple[int, ...]:
  batches = device_batches(cfg.train_loader, num_classes=cfg.num_classes, layout=cfg.layout,
                           role="training")
  with contextlib.closing(batches):
    for batch in batches:
      return tuple(batch["image"].shape[1:])
  raise EmptyLoaderError("the training loader yielded no batch, so the input shape cannot be "
                         "inferred from it")


def _loader_labels(loader: Any) -> np.ndarray:
  """The training labels, from one pass over ``loader`` (for ``weighted_loss``)."""
  labels, iterator = [], None
  while True:
    try:
      iterator = iter(loader) if iterator is None else iterator
      batch = next(iterator)
    except StopIteration:
      break
    except BaseException as e:
      raise loader_error(e, Where("training", len(labels), None)) from e
    labels.append(np.asarray(batch[1]).reshape(-1))
  if not labels:
    raise EmptyLoaderError("the training loader yielded no batch, so weighted_loss has no labels "
                           "to weigh")
  return np.concatenate(labels)


def _class_weights(cfg: TrialConfig, training: TrainingConfig) -> np.ndarray | None:
  if not training.weighted_loss:
    return None
  labels = cfg.train_labels
  if labels is None:  # one pass over the loader's labels
    labels = _loader_labels(cfg.train_loader)
  try:
    return compute_class_weights(labels, cfg.num_classes)
  except ValueError as e:  # labels outside [0, num_classes)
    raise DataError(f"training labels (for weighted_loss): {e}") from e


def initial_state(cfg: TrialConfig, training: TrainingConfig | None = None) -> TrainState:
  """A fresh state for ``cfg`` (input shape from the first batch unless given),
  replicated over ``cfg.devices`` when that is more than one device."""
  training = cfg.training if training is None else training
  _reseed(cfg.train_loader, training.seed)
  input_shape = cfg.input_shape or _first_input_shape(cfg)
  state = state_from_config(cfg.model, training, input_shape=input_shape,
                            num_classes=cfg.num_classes,
                            class_weights=_class_weights(cfg, training))
  mesh = data_mesh(cfg.devices)
  return replicate_state(state, mesh) if mesh.size > 1 else state


def _epoch_loop(cfg: TrialConfig, training: TrainingConfig, controller: LRController,
                label: str) -> EpochLoop:
  train_fn = cfg.train_epoch_fn or train_epoch
  validate_fn = cfg.validate_fn or evaluate
  return EpochLoop(
      epochs=training.epochs,
      train_fn=lambda state, epoch: train_fn(state, cfg.train_loader, epoch=epoch,
                                             layout=cfg.layout),
      validate_fn=lambda state, epoch: validate_fn(state, cfg.val_loader, epoch=epoch,
                                                   layout=cfg.layout),
      lr_for_epoch=controller.lr_for_epoch,
      monitor_metric=training.monitor_metric, direction=training.monitor_direction,
      mixup_epochs=training.mixup_epochs,
      fallback=cfg.fallback_metrics,
      log_interval=cfg.log_interval, label=label, progress=training.use_tqdm)


def _controller(training: TrainingConfig) -> LRController:
  return LRController(training.scheduler_type, learning_rate=training.learning_rate,
                      min_lr=training.min_lr, epochs=training.epochs,
                      step_size=training.step_size, factor=training.scheduler_factor,
                      patience=training.scheduler_patience,
                      monitor_direction=training.monitor_direction)


def _run(cfg: TrialConfig, training: TrainingConfig, label: str, *, best: BestState,
         report: Callback | None = None, early: Callback | None = None) -> LoopResult:
  """Builds the state, the LR controller and the loop; runs it with the callbacks
  in the reference's order: report/prune, LR step, early stopping, best state."""
  if training.use_tta:
    logger.warning("use_tta=True: test-time augmentation is not implemented in orchard_jax; "
                   "validation runs without it")
  controller = _controller(training)
  state = initial_state(cfg, training)
  callbacks = [c for c in (report, LRSchedulerStep(controller), early, best) if c is not None]
  return run_loop(state, _epoch_loop(cfg, training, controller, label), callbacks)


def _check_direction(trial: optuna.Trial, cfg: TrialConfig) -> None:
  study = getattr(trial, "study", None)
  directions = getattr(study, "directions", None)
  if not directions or len(directions) != 1:
    return
  study_direction = directions[0].name.lower()
  if study_direction != cfg.training.monitor_direction:
    raise ValueError(
        f"the study direction is {study_direction!r} but TrialConfig.training."
        f"monitor_direction is {cfg.training.monitor_direction!r}; they must agree "
        f"(create_study(direction={cfg.training.monitor_direction!r}) or change the config)")


# ------------------------------------------------------------------ entry ---


class TrialTrainingExecutor:
  """The reference's executor: ``TrialTrainingExecutor(cfg).execute(trial)``.

  ``execute`` is the bare trial loop: it returns the best monitored value and
  lets every exception through (``TrialPruned`` included). Inside an Optuna
  objective prefer :func:`run_trial`, which adds the reference's objective
  guard (a failed trial returns the worst value instead of crashing).
  """

  def __init__(self, cfg: TrialConfig):
    if not isinstance(cfg, TrialConfig):
      raise TypeError(f"cfg must be a TrialConfig, got {type(cfg).__name__}")
    self.cfg = cfg

  def execute(self, trial: optuna.Trial) -> float:
    """Trains ``optuna.epochs`` epochs, reporting to ``trial``; returns the best value."""
    cfg, number = self.cfg, trial.number
    training = trial_training_config(cfg)
    best = BestState(None if cfg.output_dir is None else best_state_dir(cfg.output_dir, number),
                     metric_name=training.monitor_metric, trial_number=number)
    report = OptunaReportPrune(trial, enable_pruning=cfg.optuna.enable_pruning,
                               warmup_epochs=cfg.optuna.pruning_warmup_epochs,
                               metric_name=training.monitor_metric)
    result = _run(cfg, training, f"T{number}", best=best, report=report)
    if best.write_error is not None:  # the trial keeps its value; its checkpoint is missing
      storage_call(trial.set_user_attr, "checkpoint_error", best.write_error)
    logger.info("Trial %d completed", number)
    logger.info("  Best %-13s: %.6f", training.monitor_metric.upper(), result.best)
    logger.info("  %-18s: %.4f", "Final Loss", result.final_train_loss)
    return result.best


def run_trial(trial: optuna.Trial, cfg: TrialConfig) -> float:
  """Trains one trial and returns its best monitored value, as the reference.

  Use it as an objective's body: suggest values, build ``cfg``, then
  ``return run_trial(trial, cfg)``. Trains ``cfg.optuna.epochs`` epochs,
  reports each non-NaN value to ``trial`` and prunes from epoch
  ``pruning_warmup_epochs`` on (see :mod:`orchard_jax.engine.loop`).

  Returns:
    The best value (direction-aware, NaN ignored). If the trial fails with
    anything but ``optuna.TrialPruned`` or bad data, the failure is logged,
    stored as ``trial.user_attrs["error"]`` (``"<Type>: <message>"``) and the
    worst value is returned: ``-inf`` when maximizing, ``+inf`` when
    minimizing.

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
    Exception: any other failure, when ``cfg.reraise_errors`` (Optuna then
      marks the trial FAIL).
    ValueError: before training, if the study's direction disagrees with
      ``cfg.training.monitor_direction``.
  """
  _check_direction(trial, cfg)
  try:
    return TrialTrainingExecutor(cfg).execute(trial)
  except (optuna.TrialPruned, StorageFault):  # a storage fault is not the trial's own: retried
    raise
  except DataError as e:  # deterministic: the data fail, not the trial's hyperparameters
    logger.error("Trial %d failed on bad data: %s: %s", trial.number, type(e).__name__, e)
    storage_call(trial.set_user_attr, "error", f"{type(e).__name__}: {e}")
    raise
  except Exception as e:  # one bad trial must not crash the study
    logger.error("Trial %d failed: %s: %s", trial.number, type(e).__name__, e)
    storage_call(trial.set_user_attr, "error", f"{type(e).__name__}: {e}")
    if cfg.reraise_errors:
      raise
    return worst_value(cfg.training.monitor_direction)


def fit(cfg: TrialConfig) -> FitResult:
  """Trains ``cfg.training.epochs`` epochs with early stopping; no Optuna.

  Early stopping ends the run after ``training.patience`` epochs without a
  new best. With ``cfg.output_dir`` the best state is written to
  ``best_state_dir(cfg.output_dir)``; if that write fails (a full disk) the
  result keeps its values, with a warning and ``checkpoint_dir`` None.
  Exceptions of the training propagate.
  """
  training = cfg.training
  directory = None if cfg.output_dir is None else best_state_dir(cfg.output_dir)
  best = BestState(directory, metric_name=training.monitor_metric)
  early = EarlyStopping(training.patience, metric_name=training.monitor_metric)
  result = _run(cfg, training, "fit", best=best, early=early)
  logger.info("Training completed: best %s %.6f at epoch %s, final loss %.4f",
              training.monitor_metric, result.best, result.best_epoch,
              result.final_train_loss)
  return FitResult(result.best, result.best_epoch, result.history, result.state,
                   best.apply_to(result.state), result.stopped_early,
                   directory if best.epoch is not None and best.write_error is None else None)


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
