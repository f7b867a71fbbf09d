"""A trial's start: its first state, built and checked, and its run of the epoch loop.

:func:`prepare` starts a trial as :func:`~orchard_jax.engine.trial.run_trial` and a cohort's
member (:mod:`orchard_jax.engine.member`) both start one: its settings line, its callbacks
(report and prune, LR step, best state), its LR controller and
:class:`~orchard_jax.engine.loop.LoopRun` and its first state, checked
against the contract and the data (fail fast, once per structure: a Linen module without
``train``, logits that are not ``[B, num_classes]``). :func:`start_run` is the part that
:func:`~orchard_jax.engine.trial.fit` shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optuna
from flax import linen as nn

from orchard_jax.config import TrainingConfig, TrialConfig, resolve_precision
from orchard_jax.core.losses import compute_class_weights
from orchard_jax.core.schedules import LRController
from orchard_jax.core.sharding import data_mesh, replicate_state
from orchard_jax.core.state import TrainState
from orchard_jax.data.adapter import Where, device_batches, loader_error
from orchard_jax.engine.callbacks import (BestState, LRSchedulerStep, OptunaReportPrune,
                                          storage_call)
from orchard_jax.engine.epoch import evaluate, train_epoch
from orchard_jax.engine.loop import Callback, EpochLoop, LoopRun, ValidateFn
from orchard_jax.engine.first_state import state_from_config
from orchard_jax.errors import DataError, EmptyLoaderError, SetupError
from orchard_jax.records import TRIAL_CONFIG

logger = logging.getLogger(__name__)


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
  ``precision float32, MixUp alpha 0.2 for 20 epochs, label smoothing 0.0, class weights off``
  (and, when on, ``, augmentation hflip 0.5, rotation 10, jitter 0.2, min_scale 0.9``)."""
  precision = resolve_precision(training, jax.default_backend())
  if training.mixup_alpha > 0 and training.mixup_epochs > 0:
    mixup = f"MixUp alpha {round(training.mixup_alpha, 6)} for {training.mixup_epochs} epochs"
  else:
    mixup = "MixUp off"
  aug = training.augmentation
  augmentation = "" if aug is None else (
      f", augmentation hflip {round(aug.hflip, 6)}, rotation {aug.rotation_angle}, jitter "
      f"{round(aug.jitter_val, 6)}, min_scale {round(aug.min_scale, 6)}")
  return (f"precision {precision}, {mixup}, label smoothing "
          f"{round(training.label_smoothing, 6)}, "
          f"class weights {'on' if training.weighted_loss else 'off'}{augmentation}")


def epoch_loop(cfg: TrialConfig, training: TrainingConfig, controller: LRController,
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


def controller(training: TrainingConfig) -> LRController:
  return LRController(training.scheduler_type, learning_rate=training.learning_rate,
                      min_lr=training.min_lr, epochs=training.epochs,
                      step_size=training.step_size, factor=training.scheduler_factor,
                      patience=training.scheduler_patience,
                      monitor_direction=training.monitor_direction)


def trial_callbacks(trial: optuna.Trial, cfg: TrialConfig, training: TrainingConfig, *,
                    log_pruned: bool = True) -> tuple[BestState, OptunaReportPrune]:
  """A trial's best-state keeper (writing to ``best_state_dir``) and its report/prune hook
  (``log_pruned``: whether it logs the trial's pruning)."""
  number = trial.number
  best = BestState(None if cfg.output_dir is None else best_state_dir(cfg.output_dir, number),
                   metric_name=training.monitor_metric, trial_number=number)
  report = OptunaReportPrune(trial, enable_pruning=cfg.optuna.enable_pruning,
                             warmup_epochs=cfg.optuna.pruning_warmup_epochs,
                             metric_name=training.monitor_metric, log_pruned=log_pruned)
  return best, report


def check_direction(trial: optuna.Trial, cfg: TrialConfig) -> None:
  """Raises ``ValueError`` (before the trial starts) if ``trial``'s study optimizes in the
  other direction than ``cfg.training.monitor_direction``."""
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


def trial_record(cfg: TrialConfig) -> dict[str, Any]:
  """What ``cfg`` holds, as JSON-ready data: the training and optuna fields, the model's
  ``repr`` (one line, clipped), classes, input shape, layout and ``output_dir`` (absolute).
  :func:`record_config` stores it as the trial's ``trial_config`` attribute, which
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



def record_config(trial: optuna.Trial, cfg: TrialConfig) -> None:
  """Stores :func:`trial_record` as ``trial``'s ``trial_config`` attribute."""
  storage_call(trial.set_user_attr, TRIAL_CONFIG, trial_record(cfg))


def _trained_by_the_cohort(state: TrainState, epoch: int):
  raise AssertionError("a cohort trains its members' epochs itself")


def start_run(cfg: TrialConfig, training: TrainingConfig, label: str, *, best: BestState,
              report: Callback | None = None, early: Callback | None = None,
              reseed: bool = True,
              validate_fn: ValidateFn | None = None) -> tuple[LoopRun, TrainState]:
  """A run of the epoch loop and its first state (:func:`checked_state`), with the callbacks
  in the reference's order: report/prune, LR step, early stopping, best state.

  ``validate_fn``: a cohort member's, whose metrics come from its cohort's pass (the cohort
  trains its epochs too); None for the config's own epoch functions.
  """
  schedule = controller(training)
  loop = epoch_loop(cfg, training, schedule, label)
  if validate_fn is not None:
    loop = dataclasses.replace(loop, train_fn=_trained_by_the_cohort, validate_fn=validate_fn)
  callbacks = [c for c in (report, LRSchedulerStep(schedule), early, best) if c is not None]
  return LoopRun(loop, callbacks), checked_state(cfg, training, reseed=reseed)


class Prepared(NamedTuple):
  """A trial ready for its first epoch."""
  training: TrainingConfig  # its TrainingConfig (:func:`trial_training_config`)
  best: BestState           # its best-state keeper
  run: LoopRun              # its run of the epoch loop, with its callbacks
  state: TrainState         # its first state


def prepare(trial: optuna.Trial, cfg: TrialConfig, *, reseed: bool = True,
            log_pruned: bool = True, validate_fn: ValidateFn | None = None) -> Prepared:
  """Starts ``trial``: logs its settings line (``Trial 3: precision float32, ...``), makes its
  callbacks (:func:`trial_callbacks`), LR controller and run of the epoch loop, and builds its
  checked first state (see :func:`start_run` for ``validate_fn``; ``reseed``: restart the
  training loader's shuffling, see :func:`initial_state`).

  Raises:
    SetupError: see :func:`checked_state`; and whatever building the state raises (bad data).
  """
  training = trial_training_config(cfg)
  logger.info("Trial %d: %s", trial.number, settings_line(training))
  best, report = trial_callbacks(trial, cfg, training, log_pruned=log_pruned)
  run, state = start_run(cfg, training, f"T{trial.number}", best=best, report=report,
                         reseed=reseed, validate_fn=validate_fn)
  return Prepared(training, best, run, state)
