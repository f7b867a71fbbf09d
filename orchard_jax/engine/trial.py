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

Failing fast: what would fail every trial the same way -- a configuration
error, a model that does not fit the contract or the data (checked once per
structure, with ``jax.eval_shape``, when the state is built), a monitored
metric the validation does not produce, bad data -- propagates out of
:func:`run_trial` whatever ``reraise_errors`` says, so Optuna marks the trial
FAIL and the user sees the error at trial 0. Run-time failures (divergence,
three failed validations) return the worst value, as the reference does; a
trial whose every validation failed has no value of its own and is FAIL.
"""

from __future__ import annotations

import contextlib
import json
import inspect
import logging
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optuna
from flax import linen as nn

from orchard_jax.config import ConfigError, TrainingConfig, TrialConfig, resolve_precision
from orchard_jax.core.losses import compute_class_weights
from orchard_jax.core.schedules import LRController
from orchard_jax.core.sharding import data_mesh, replicate_state
from orchard_jax.core.state import TrainState
from orchard_jax.data.adapter import Where, device_batches, loader_error
from orchard_jax.engine.callbacks import (BestState, EarlyStopping, LRSchedulerStep,
                                          OptunaReportPrune, load_best, storage_call)
from orchard_jax.engine.epoch import evaluate, train_epoch
from orchard_jax.engine.loop import (Callback, EpochLog, EpochLoop, LoopResult, run_loop,
                                     worst_value)
from orchard_jax.engine.state import state_from_config
from orchard_jax.errors import (DataError, EmptyLoaderError, SetupError, StorageFault,
                                ValidationFailedError)

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


def initial_state(cfg: TrialConfig, training: TrainingConfig | None = None, *,
                  reseed: bool = True) -> TrainState:
  """A fresh state for ``cfg`` (input shape from the first batch unless given),
  replicated over ``cfg.devices`` when that is more than one device, else committed to
  the one device (as its batches are: the steps compile once). ``reseed`` restarts the
  training loader's shuffling at ``training.seed`` (a cohort's later members read the
  cohort's order instead)."""
  from orchard_jax.core.state import on_device  # pylint: disable=import-outside-toplevel

  training = cfg.training if training is None else training
  if reseed:
    _reseed(cfg.train_loader, training.seed)
  input_shape = cfg.input_shape or _first_input_shape(cfg)
  state = state_from_config(cfg.model, training, input_shape=input_shape,
                            num_classes=cfg.num_classes,
                            class_weights=_class_weights(cfg, training))
  mesh = data_mesh(cfg.devices)
  return replicate_state(state, mesh) if mesh.size > 1 else on_device(state, mesh.devices.flat[0])


# ------------------------------------------------------------ fail fast ---

_PROBE_BATCH = 2   # the batch size of the logits check (2, so that B shows apart from 1)
_CHECKED_SPECS: dict[Any, None] = {}  # structures whose logits were checked (insertion order)
_CHECKED_MAX = 64


def check_linen_contract(model: Any) -> None:
  """Raises :class:`SetupError` for a Linen module that cannot take ``train``.

  The contract is ``__call__(x, train: bool)``; a module whose flag has
  another name or meaning is adapted with
  ``orchard_jax.models.as_model(module, train_kwarg=..., invert=...)``.
  """
  if not isinstance(model, nn.Module):
    return
  try:
    signature = inspect.signature(model.__call__)
  except (TypeError, ValueError):  # no signature to read: as_model decides
    return
  params = signature.parameters.values()
  if any(p.name == "train" or p.kind is p.VAR_KEYWORD for p in params):
    return
  raise SetupError(
      f"{type(model).__name__}.__call__{signature} has no `train` argument: a Linen module must "
      f"be callable as __call__(x, train: bool) (train=True while training, False to evaluate); "
      f"for a flag of another name or meaning pass orchard_jax.models.as_model(module, "
      f"train_kwarg='deterministic', invert=True)")


def _shape_text(shape: tuple[int, ...]) -> str:
  dims = ["B" if i == 0 and d == _PROBE_BATCH else str(d) for i, d in enumerate(shape)]
  return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def logits_problem(state: TrainState) -> str | None:
  """Why the model's logits are not ``[B, num_classes]``, or None when they are.

  Traces the model once (``jax.eval_shape``: no compile, no computation) on a
  batch of :data:`_PROBE_BATCH` inputs of the state's per-sample shape.
  """
  spec = state.spec
  sample = jax.ShapeDtypeStruct((_PROBE_BATCH, *spec.input_shape), jnp.float32)
  out = jax.eval_shape(
      lambda params, model_state, x: spec.model.apply(params, model_state, x, train=False,
                                                      rng=jax.random.key(0)),
      state.params, state.model_state, sample)
  logits = out[0] if isinstance(out, (tuple, list)) and out else out
  expected = f"(B, {spec.num_classes}) for num_classes={spec.num_classes}"
  shape = getattr(logits, "shape", None)
  if shape is None:
    return f"the model returns a {type(logits).__name__}, expected logits of shape {expected}"
  shape = tuple(shape)
  if shape == (_PROBE_BATCH, spec.num_classes):
    return None
  problem = f"the model's logits have shape {_shape_text(shape)}, expected {expected}"
  if shape == (_PROBE_BATCH, 1) and spec.num_classes == 2:
    problem += (": a binary model needs 2 logits, one per class (the loss is softmax "
                "cross-entropy), not a single sigmoid logit")
  elif not shape or shape[0] != _PROBE_BATCH:
    problem += f" (for a batch of {_PROBE_BATCH} inputs of shape {spec.input_shape})"
  return problem


def check_logits(state: TrainState) -> None:
  """Raises :class:`SetupError` unless the logits are ``[B, num_classes]``;
  checked once per structure (``state.spec``) in a process."""
  if state.spec in _CHECKED_SPECS:
    return
  problem = logits_problem(state)
  if problem is not None:
    raise SetupError(problem)
  if len(_CHECKED_SPECS) >= _CHECKED_MAX:
    _CHECKED_SPECS.pop(next(iter(_CHECKED_SPECS)))
  _CHECKED_SPECS[state.spec] = None


def checked_state(cfg: TrialConfig, training: TrainingConfig, *, reseed: bool = True) -> TrainState:
  """:func:`initial_state`, with the model checked against the contract and the data.

  Raises:
    SetupError: a Linen module without ``train``, logits that are not
      ``[B, num_classes]``, or a ``TypeError`` while the state is built
      (chained to it).
  """
  check_linen_contract(cfg.model)
  try:
    state = initial_state(cfg, training, reseed=reseed)
    check_logits(state)
  except TypeError as e:
    raise SetupError(f"building the trial's state failed: {type(e).__name__}: {e}") from e
  return state


def settings_line(training: TrainingConfig) -> str:
  """The run's active regularisation and precision, in words, e.g.
  ``precision float32, MixUp alpha 0.2 for 20 epochs, label smoothing 0.0, class weights off``."""
  precision = resolve_precision(training, jax.default_backend())
  if training.mixup_alpha > 0 and training.mixup_epochs > 0:
    mixup = f"MixUp alpha {round(training.mixup_alpha, 6)} for {training.mixup_epochs} epochs"
  else:
    mixup = "MixUp off"
  return (f"precision {precision}, {mixup}, label smoothing "
          f"{round(training.label_smoothing, 6)}, "
          f"class weights {'on' if training.weighted_loss else 'off'}")


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
  warn_tta(training)
  controller = _controller(training)
  state = checked_state(cfg, training)
  callbacks = [c for c in (report, LRSchedulerStep(controller), early, best) if c is not None]
  return run_loop(state, _epoch_loop(cfg, training, controller, label), callbacks)


def warn_tta(training: TrainingConfig) -> None:
  if training.use_tta:
    logger.warning("use_tta=True: test-time augmentation is not implemented in orchard_jax; "
                   "validation runs without it")


def trial_callbacks(trial: optuna.Trial, cfg: TrialConfig,
                    training: TrainingConfig) -> tuple[BestState, OptunaReportPrune]:
  """A trial's best-state keeper (writing to ``best_state_dir``) and its report/prune hook."""
  number = trial.number
  best = BestState(None if cfg.output_dir is None else best_state_dir(cfg.output_dir, number),
                   metric_name=training.monitor_metric, trial_number=number)
  report = OptunaReportPrune(trial, enable_pruning=cfg.optuna.enable_pruning,
                             warmup_epochs=cfg.optuna.pruning_warmup_epochs,
                             metric_name=training.monitor_metric)
  return best, report


def trial_completed(trial: optuna.Trial, training: TrainingConfig, best: BestState,
                    result: LoopResult) -> None:
  """Records a missing checkpoint's cause and logs a trial's end."""
  if best.write_error is not None:  # the trial keeps its value; its checkpoint is missing
    storage_call(trial.set_user_attr, "checkpoint_error", best.write_error)
  logger.info("Trial %d completed", trial.number)
  logger.info("  Best %-13s: %.6f", training.monitor_metric.upper(), result.best)
  logger.info("  %-18s: %.4f", "Final Loss", result.final_train_loss)


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
    logger.info("Trial %d: %s", number, settings_line(training))
    best, report = trial_callbacks(trial, cfg, training)
    result = _run(cfg, training, f"T{number}", best=best, report=report)
    trial_completed(trial, training, best, result)
    return result.best


TRIAL_CONFIG = "trial_config"  # the trial's user attribute: what its TrialConfig held


def trial_record(cfg: TrialConfig) -> dict[str, Any]:
  """What ``cfg`` holds, as JSON-ready data: the training and optuna fields, the model's
  ``repr`` (one line, clipped), classes, input shape, layout and ``output_dir`` (absolute).
  :func:`run_trial` stores it as the trial's ``trial_config`` attribute, which
  :func:`orchard_jax.write_outputs` turns into the best trial's ``best_trial.yaml``."""
  def plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))
  model = " ".join(repr(cfg.model).split())
  return {
      "model": model if len(model) <= 500 else model[:497] + "...",
      "num_classes": cfg.num_classes,
      "input_shape": None if cfg.input_shape is None else list(cfg.input_shape),
      "layout": cfg.layout,
      "output_dir": None if cfg.output_dir is None else str(pathlib.Path(cfg.output_dir).absolute()),
      "training": plain(cfg.training.to_dict()),
      "optuna": plain(cfg.optuna.to_dict()),
  }


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
  _check_direction(trial, cfg)
  storage_call(trial.set_user_attr, TRIAL_CONFIG, trial_record(cfg))
  try:
    return TrialTrainingExecutor(cfg).execute(trial)
  except (optuna.TrialPruned, StorageFault):  # a storage fault is not the trial's own: retried
    raise
  except DataError as e:  # deterministic: the data fail, not the trial's hyperparameters
    logger.error("Trial %d failed on bad data: %s: %s", trial.number, type(e).__name__, e)
    storage_call(trial.set_user_attr, "error", f"{type(e).__name__}: {e}")
    raise
  except (SetupError, ConfigError) as e:  # would fail every trial: shown at trial 0
    logger.error("Trial %d failed on its setup: %s: %s", trial.number, type(e).__name__, e)
    storage_call(trial.set_user_attr, "error", f"{type(e).__name__}: {e}")
    raise
  except Exception as e:  # one bad trial must not crash the study
    logger.error("Trial %d failed: %s: %s", trial.number, type(e).__name__, e)
    storage_call(trial.set_user_attr, "error", f"{type(e).__name__}: {e}")
    if cfg.reraise_errors or isinstance(e, ValidationFailedError):  # no value of its own
      raise
    return worst_value(cfg.training.monitor_direction)


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
