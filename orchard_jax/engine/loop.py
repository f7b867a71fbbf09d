"""The one epoch loop, shared by :func:`run_trial` and :func:`fit`.

Each epoch, in this order (the reference's trial loop, UPSTREAM.md):

1. write the epoch's learning rate into the state and switch MixUp on iff
   ``epoch <= mixup_epochs`` (both are arrays: nothing recompiles);
2. train one epoch; a NaN or Inf loss, whatever training function gave it,
   is divergence: ``RuntimeError("Training diverged: loss=nan at epoch 2")``
   (:func:`diverged`, the one place of that check and message);
3. validate; a ``RuntimeError`` or ``ValueError`` -- raised by the validation
   function *or by fetching its results to the host*, where XLA runtime errors
   surface -- is logged and the epoch uses a fresh copy of the fallback
   metrics; the third consecutive failure aborts the run. Bad data
   (:class:`~orchard_jax.errors.DataError`, neither of those types) is not a
   failed validation: it ends the run at once, with the data's message;
4. extract the monitored metric (a missing key raises
   :class:`~orchard_jax.errors.MissingMetricError`, a ``KeyError``);
5. track the best value, direction-aware, ignoring NaN and the fallback's
   values (a failed epoch never sets the best: the run's value always comes
   from a validation that ran);
6. run the epoch-end callbacks in order (Optuna report and prune, LR
   scheduler step, early stopping, best-state keeping); any of them may stop
   the run;
7. log at every ``log_interval``-th epoch, the last one, and a stopping one;
8. a run that ends (its last epoch, or stopped by a callback) with every
   validation failed raises
   :class:`~orchard_jax.errors.ValidationFailedError`: ``"every validation
   failed (2 of 2 epochs): ValueError: ..."`` -- it has no value of its own.

The progress bar (``progress``) is drawn only when ``sys.stderr`` is a
terminal: in a redirected log its ``\\r`` updates would be noise.

Everything that differs between ``run_trial`` and ``fit`` is a callback.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
from tqdm.auto import tqdm

from orchard_jax.core.state import TrainState
from orchard_jax.errors import MissingMetricError, ValidationFailedError

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_VAL_FAILURES = 3
DEFAULT_FALLBACK = MappingProxyType({"loss": 999.0})
DIRECTIONS = ("maximize", "minimize")

TrainFn = Callable[[TrainState, int], tuple[TrainState, float]]
ValidateFn = Callable[[TrainState, int], Mapping[str, Any]]


class EpochLog(NamedTuple):
  """What one epoch produced; the argument of every epoch-end callback."""
  epoch: int                     # 1-indexed
  epochs: int                    # epochs planned for the run
  learning_rate: float           # the rate this epoch trained with
  mixup: bool                    # whether MixUp was on this epoch
  train_loss: float              # sample-weighted mean training loss
  metrics: Mapping[str, float]   # validation metrics (or the fallback's copy)
  value: float                   # metrics[monitor_metric]
  best: float                    # best value so far, this epoch included
  improved: bool                 # whether this epoch set ``best``
  validation_failed: bool        # whether ``metrics`` is the fallback


class Callback:
  """Epoch-end hook of :func:`run_loop`. Subclasses override what they need.

  ``on_epoch_measured`` runs first, once the epoch's value is known (a trial's report to its
  study: a cohort reports every member's value before any member is judged). ``on_epoch_end``
  runs after it with the epoch's log and the trained
  state, and returns True to stop the run after this epoch. Raising stops the
  run too (``optuna.TrialPruned``). The state is donated to the next epoch's
  ``train_step``: copy any array that must outlive the call.
  ``on_train_end`` runs once after the last epoch of a run that was not
  stopped by an exception.
  """

  def on_epoch_measured(self, log: EpochLog) -> None:
    del log

  def on_epoch_end(self, log: EpochLog, state: TrainState) -> bool:
    del log, state
    return False

  def on_train_end(self, result: "LoopResult") -> None:
    del result


@dataclasses.dataclass(frozen=True)
class EpochLoop:
  """The settings of one run of :func:`run_loop`.

  Attributes:
    epochs: Epochs to run, ``>= 1``.
    train_fn: ``fn(state, epoch) -> (state, train_loss)``.
    validate_fn: ``fn(state, epoch) -> metrics`` (values may be device arrays).
    lr_for_epoch: ``fn(epoch) -> learning rate`` for 1-indexed epochs.
    monitor_metric: The metric that is tracked and given to the callbacks.
    direction: ``'maximize'`` or ``'minimize'``.
    mixup_epochs: MixUp is on while ``epoch <= mixup_epochs``.
    fallback: The task's metrics for an epoch whose validation failed; None
      means ``{'loss': 999.0}``. Stored as :func:`fallback_metrics` makes it
      (the monitored metric added, read-only).
    log_interval: Log every ``log_interval`` epochs, ``>= 1``.
    label: Prefix of the progress lines, e.g. ``'T3'`` for trial 3.
    progress: Show a tqdm bar that advances once per epoch, on a terminal only
      (tqdm's ``disable=None``: off when ``sys.stderr`` is not a tty).
  """
  epochs: int
  train_fn: TrainFn
  validate_fn: ValidateFn
  lr_for_epoch: Callable[[int], float]
  monitor_metric: str
  direction: str = "maximize"
  mixup_epochs: int = 0
  fallback: Mapping[str, float] | None = None
  log_interval: int = 1
  label: str = "run"
  progress: bool = False

  def __post_init__(self):
    if self.direction not in DIRECTIONS:
      raise ValueError(f"direction must be one of {DIRECTIONS}, got direction={self.direction!r}")
    if self.epochs < 1 or self.log_interval < 1:
      raise ValueError(f"epochs and log_interval must be >= 1, got epochs={self.epochs}, "
                       f"log_interval={self.log_interval}")
    object.__setattr__(self, "fallback", fallback_metrics(self.fallback, self.monitor_metric))


class LoopResult(NamedTuple):
  """What :func:`run_loop` returns."""
  state: TrainState            # the state after the last epoch
  best: float                  # best monitored value; -inf/+inf if every value was NaN
  best_epoch: int | None       # epoch of ``best``; None if every value was NaN
  history: tuple[EpochLog, ...]
  stopped_early: bool          # a callback stopped the run before ``epochs``

  @property
  def final_train_loss(self) -> float:
    return self.history[-1].train_loss


def worst_value(direction: str) -> float:
  """``-inf`` when maximizing, ``+inf`` when minimizing: the start of the best."""
  return -math.inf if direction == "maximize" else math.inf


def diverged(loss: float, epoch: int | None) -> RuntimeError | None:
  """The divergence error of a NaN or Inf epoch ``loss`` (the reference's message), else
  None: ``RuntimeError("Training diverged: loss=nan at epoch 3")``."""
  if math.isfinite(loss):
    return None
  return RuntimeError(f"Training diverged: loss={loss} at epoch {epoch}")


def update_best(best: float, value: float, direction: str) -> tuple[float, bool]:
  """``(new_best, improved)``: strict improvement; a NaN value never improves."""
  if math.isnan(value):
    return best, False
  improved = value > best if direction == "maximize" else value < best
  return (value, True) if improved else (best, False)


def fallback_metrics(task_fallback: Mapping[str, float] | None,
                     monitor_metric: str) -> Mapping[str, float]:
  """The read-only fallback: the task's mapping, else ``{'loss': 999.0}``,
  with ``monitor_metric`` added as ``0.0`` when missing."""
  base = dict(DEFAULT_FALLBACK if task_fallback is None else task_fallback)
  base.setdefault(monitor_metric, 0.0)
  return MappingProxyType(base)


def validate_with_fallback(loop: EpochLoop, state: TrainState, epoch: int,
                           failures: int) -> tuple[dict[str, float], int, Exception | None]:
  """Validates one epoch; returns ``(metrics, consecutive_failures, error)``: ``error`` is
  the failure that made ``metrics`` the fallback's copy, None when the validation ran.

  Raises:
    RuntimeError: on the third consecutive failure.
    orchard_jax.errors.DataError: bad validation data, at once (no fallback).
  """
  try:
    raw = jax.device_get(dict(loop.validate_fn(state, epoch)))  # the host fetch
    metrics = {name: float(value) for name, value in raw.items()}
  except (RuntimeError, ValueError) as e:
    failures += 1
    logger.error("Validation failed (x%d) at epoch %d: %s", failures, epoch, e)
    if failures >= MAX_CONSECUTIVE_VAL_FAILURES:
      raise RuntimeError(
          f"Validation failed {failures} consecutive times, aborting trial") from e
    return dict(loop.fallback), failures, e
  return metrics, 0, None


def monitored_value(metrics: Mapping[str, float], name: str) -> float:
  """``metrics[name]``; raises :class:`~orchard_jax.errors.MissingMetricError`
  (a ``KeyError``) listing the available keys."""
  if name not in metrics:
    raise MissingMetricError(f"monitor_metric {name!r} is not among the validation metrics; "
                             f"available: {sorted(metrics)}")
  return metrics[name]


def _log_epoch(loop: EpochLoop, log: EpochLog) -> None:
  logger.info("%s E%d/%d | Loss:%.4f | %s:%.4f (Best:%.4f)", loop.label, log.epoch,
              log.epochs, log.train_loss, loop.monitor_metric, log.value, log.best)


def _run_callbacks(callbacks: Sequence[Callback], log: EpochLog, state: TrainState) -> bool:
  stop = False
  for callback in callbacks:  # every callback runs, even after one asked to stop
    stop = bool(callback.on_epoch_end(log, state)) or stop
  return stop


class LoopRun:
  """One run of the epoch loop, one epoch at a time: :func:`run_loop`'s body, for a driver that
  trains the epoch itself (a cohort trains many runs' epochs in one program).

  Per epoch: :meth:`begin_epoch` gives the epoch, its learning rate and MixUp switch; the driver
  trains with them; :meth:`end_epoch` validates (``loop.validate_fn``), tracks the best, runs
  the callbacks and logs, as :func:`run_loop` does (a cohort calls its two halves,
  :meth:`measure` and :meth:`conclude`, for every member in turn). :meth:`finish` ends the run.
  """

  def __init__(self, loop: EpochLoop, callbacks: Sequence[Callback] = ()):
    self.loop, self.callbacks = loop, tuple(callbacks)
    self.best, self.best_epoch, self.failures = worst_value(loop.direction), None, 0
    self.history: list[EpochLog] = []
    self.epoch, self.stop = 0, False
    self._lr, self._mixup = 0.0, False
    self._error: Exception | None = None  # the last measured epoch's validation failure

  @property
  def done(self) -> bool:
    """Whether the run has ended: its last epoch ran, or a callback stopped it."""
    return self.stop or self.epoch >= self.loop.epochs

  def begin_epoch(self) -> tuple[int, float, bool]:
    """``(epoch, learning_rate, mixup)`` of the next epoch (1-indexed)."""
    self.epoch += 1
    self._lr = self.loop.lr_for_epoch(self.epoch)
    self._mixup = self.epoch <= self.loop.mixup_epochs
    return self.epoch, self._lr, self._mixup

  def end_epoch(self, state: TrainState, train_loss: float) -> EpochLog:
    """Checks the epoch's loss, validates the trained ``state``, updates the best, runs the
    callbacks and logs: :meth:`measure`, then :meth:`conclude`.

    Raises:
      RuntimeError: the loss is NaN or Inf (:func:`diverged`), or validation failed three
        consecutive times.
      orchard_jax.errors.ValidationFailedError: the run ended with every validation failed.
    """
    return self.conclude(self.measure(state, train_loss), state)

  def measure(self, state: TrainState, train_loss: float) -> EpochLog:
    """The first half of :meth:`end_epoch`: checks the loss, validates, updates the best and
    runs the callbacks' ``on_epoch_measured``."""
    loop, epoch = self.loop, self.epoch
    train_loss = float(train_loss)  # a training function's device scalar: the epoch's one fetch
    divergence = diverged(train_loss, epoch)
    if divergence is not None:
      raise divergence
    metrics, self.failures, error = validate_with_fallback(loop, state, epoch, self.failures)
    value = monitored_value(metrics, loop.monitor_metric)
    improved = False
    if error is None:  # the fallback's value is no measurement: it never becomes the best
      self.best, improved = update_best(self.best, value, loop.direction)
    self.best_epoch = epoch if improved else self.best_epoch
    log = EpochLog(epoch, loop.epochs, self._lr, self._mixup, train_loss, metrics, value,
                   self.best, improved, error is not None)
    self.history.append(log)
    self._error = error
    for callback in self.callbacks:
      callback.on_epoch_measured(log)
    return log

  def conclude(self, log: EpochLog, state: TrainState) -> EpochLog:
    """The second half of :meth:`end_epoch`: runs the callbacks' ``on_epoch_end`` and logs."""
    loop, epoch, error = self.loop, self.epoch, self._error
    self.stop = _run_callbacks(self.callbacks, log, state)
    if epoch % loop.log_interval == 0 or epoch == loop.epochs or self.stop:
      _log_epoch(loop, log)
    if self.done and self.failures == epoch:  # no epoch of the run was validated
      raise ValidationFailedError(f"every validation failed ({epoch} of {epoch} epochs): "
                                  f"{type(error).__name__}: {error}")
    return log

  def finish(self, state: TrainState) -> LoopResult:
    """The run's result, after every callback's ``on_train_end``."""
    result = LoopResult(state, self.best, self.best_epoch, tuple(self.history),
                        self.stop and self.epoch < self.loop.epochs)
    for callback in self.callbacks:
      callback.on_train_end(result)
    return result


def run_loop(state: TrainState, loop: EpochLoop,
             callbacks: Sequence[Callback] = ()) -> LoopResult:
  """Runs up to ``loop.epochs`` epochs; see the module docstring for the order.

  Args:
    state: The initial state; donated (do not reuse it).
    loop: The run's settings.
    callbacks: Epoch-end hooks, called in order every epoch.

  Returns:
    A :class:`LoopResult`; ``best`` is the best monitored value, NaN ignored.

  Raises:
    RuntimeError: training diverged (a NaN or Inf loss from ``loop.train_fn``,
      whatever it is), or validation failed three consecutive times.
      ``orchard_jax.errors.ValidationFailedError`` (a ``RuntimeError``): the
      run ended with every validation failed (fewer than three epochs, or
      stopped by a callback). ``orchard_jax.errors.MissingMetricError`` (a
      ``KeyError``): the monitored metric is missing.
      ``orchard_jax.errors.DataError``: bad training or validation data.
      Whatever a callback raises (e.g. ``optuna.TrialPruned``).
  """
  return run_epochs(LoopRun(loop, callbacks), state)


def run_epochs(run: LoopRun, state: TrainState) -> LoopResult:
  """Runs ``run``'s epochs from ``state`` to its end, training each with ``run.loop.train_fn``
  (:func:`run_loop`'s body; ``run.history`` holds every epoch that ended, also when one raises)."""
  loop = run.loop
  with tqdm(total=loop.epochs, desc=loop.label, unit="epoch", leave=False, mininterval=0,
            disable=None if loop.progress else True) as bar:  # None: a terminal only
    while not run.done:
      epoch, lr, mixup = run.begin_epoch()
      state = state.with_learning_rate(lr).with_mixup(mixup)
      state, train_loss = loop.train_fn(state, epoch)
      log = run.end_epoch(state, train_loss)
      bar.set_postfix({"train_loss": f"{log.train_loss:.4f}",
                       f"val_{loop.monitor_metric}": f"{log.value:.4f}",
                       "best": f"{log.best:.4f}"})
      bar.update()
  return run.finish(state)
