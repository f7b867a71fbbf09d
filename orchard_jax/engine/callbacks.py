"""Epoch-end callbacks of :func:`orchard_jax.engine.loop.run_loop`.

* :class:`OptunaReportPrune` -- ``trial.report`` (NaN skipped) and, from
  ``pruning_warmup_epochs`` on, ``trial.should_prune()`` -> ``TrialPruned``.
* :class:`LRSchedulerStep` -- one scheduler step per epoch; the plateau
  scheduler gets the monitored value.
* :class:`EarlyStopping` -- stops after ``patience`` epochs without a new best.
* :class:`BestState` -- keeps the best epoch's parameters (a device copy) and,
  given a directory, writes them with orbax-checkpoint at the end of the run;
  :func:`load_best` reads them back into a state of the same structure. The
  folder appears whole or not at all (:func:`orchard_jax.fileio.atomic_directory`),
  and a write that fails (a full disk) is one warning and ``write_error``, never
  the loss of the trained run; its traceback comes with the warning only when
  the logger is enabled for DEBUG (``orchard-jax ... --debug``).

Orbax logs through absl's logger: INFO lines for every save, and, from its
threads, ERROR tracebacks of a failed write (hundreds of lines per trial).
While this module saves or restores, records from orbax's code are dropped
there (:func:`quiet_orbax`); the caller's logging is left as it was.

Orbax runs each write in a fresh event loop that it closes as soon as the
first array fails, while TensorStore still writes the others; when such a
write ends, TensorStore's thread hands its result to the closed loop, and
the ``RuntimeError('Event loop is closed')`` goes to ``sys.unraisablehook``,
which prints a bare traceback. The event loops made while this module saves
or restores therefore wait for their unfinished tasks before they close, and
a save or load ends only after the threads orbax started in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import math
import os
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import optuna

from orchard_jax.core.schedules import LRController
from orchard_jax.core.state import TrainState
from orchard_jax.errors import StorageFault, root_cause
from orchard_jax.fileio import atomic_directory
from orchard_jax.engine.loop import Callback, EpochLog, LoopResult

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoint"
SUMMARY_FILE = "best.json"


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

  ``trial.report(value, epoch)`` unless the value is NaN. When pruning is
  enabled and ``epoch >= warmup_epochs``, asks ``trial.should_prune()`` and,
  if so, logs (unless ``log_pruned`` is False: a caller that logs each
  finished trial itself) and raises ``optuna.TrialPruned``. With warmup 2 the
  first possible prune is at epoch 2, as in the reference.
  """

  def __init__(self, trial: optuna.Trial, *, enable_pruning: bool, warmup_epochs: int,
               metric_name: str, log_pruned: bool = True):
    self.trial, self.enable_pruning = trial, enable_pruning
    self.warmup_epochs, self.metric_name = warmup_epochs, metric_name
    self.log_pruned = log_pruned

  def on_epoch_end(self, log: EpochLog, state: TrainState) -> bool:
    if not math.isnan(log.value):
      storage_call(self.trial.report, log.value, log.epoch)
    if (self.enable_pruning and log.epoch >= self.warmup_epochs
        and storage_call(self.trial.should_prune)):
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
_ORBAX_LOCK = threading.Lock()


class _FromOrbax(logging.Filter):
  """Drops the records logged from orbax's own code."""

  def __init__(self):
    super().__init__()
    spec = importlib.util.find_spec("orbax.checkpoint")
    locations = list(spec.submodule_search_locations or ()) if spec else []
    self.roots = tuple(os.path.dirname(p) + os.sep for p in locations)

  def filter(self, record: logging.LogRecord) -> bool:
    return not (self.roots and record.pathname.startswith(self.roots))


# How long a closing event loop of orbax waits for its unfinished writes, and the end of a save or
# load for the threads orbax started in it; then each goes on as before.
_DRAIN_TIMEOUT_S = 60.0


def _drain(loop: asyncio.AbstractEventLoop) -> None:
  """Runs ``loop`` (stopped, not closed) until it has no unfinished task and has run the
  callbacks already due (a ``gather`` takes its tasks' errors there), for at most
  ``_DRAIN_TIMEOUT_S``; the errors of the tasks it waited for are taken, not logged."""
  deadline, waited = time.monotonic() + _DRAIN_TIMEOUT_S, set()
  while not (loop.is_closed() or loop.is_running()):
    loop.run_until_complete(asyncio.sleep(0))
    pending, left = asyncio.all_tasks(loop), deadline - time.monotonic()
    if not pending or left <= 0:
      break
    waited |= pending
    loop.run_until_complete(asyncio.wait(pending, timeout=left))
  for task in waited:
    if task.done() and not task.cancelled():
      task.exception()  # asyncio logs an error nobody took when the task is freed


def _drain_then_close(loop: asyncio.AbstractEventLoop) -> None:
  """Makes ``loop.close()`` first :func:`_drain` the loop, so that no result of TensorStore
  reaches it closed; a loop whose class takes no attribute closes as before."""
  close = loop.close

  def draining_close() -> None:
    try:
      _drain(loop)
    except Exception:  # pylint: disable=broad-except  # the loop closes all the same
      pass
    finally:
      close()

  try:
    loop.close = draining_close  # type: ignore[method-assign]
  except (AttributeError, TypeError):
    pass


class _DrainingPolicy(asyncio.AbstractEventLoopPolicy):
  """The current event loop policy, but each new loop drains its tasks before it closes."""

  def __init__(self, base: asyncio.AbstractEventLoopPolicy):
    self.base = base

  def get_event_loop(self) -> asyncio.AbstractEventLoop:
    return self.base.get_event_loop()

  def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
    self.base.set_event_loop(loop)

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    loop = self.base.new_event_loop()
    _drain_then_close(loop)
    return loop

  def get_child_watcher(self) -> Any:
    return self.base.get_child_watcher()

  def set_child_watcher(self, watcher: Any) -> None:
    self.base.set_child_watcher(watcher)


def _orbax_threads() -> set[threading.Thread]:
  """The running threads of orbax's own thread classes (its commit threads)."""
  return {t for t in threading.enumerate() if type(t).__module__.startswith("orbax.")}


def _join_new(threads: set[threading.Thread]) -> None:
  """Waits (at most ``_DRAIN_TIMEOUT_S`` in all) for orbax's threads not in ``threads``."""
  deadline = time.monotonic() + _DRAIN_TIMEOUT_S
  for thread in _orbax_threads() - threads - {threading.current_thread()}:
    # threading's own join: orbax's raises the thread's error, which its save already raised
    threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Orbax's log records dropped while the block runs (held under ``_ORBAX_LOCK``).

  Orbax logs through absl's logger (``"absl"``); a filter on it drops the
  records whose code is orbax's, and is removed after the block. absl calls
  ``logging.basicConfig()`` before its first record when the root logger has
  no handler, which would configure a program's logging for good: a
  ``NullHandler`` stands in on the root logger for the block instead. The
  levels and handlers of every logger are as they were after it.

  The event loops made in the block (orbax makes one per write, in its own
  threads) run their unfinished tasks to the end before they close: a write
  that fails leaves none of TensorStore's results to arrive at a closed loop
  and be printed as a bare traceback. A save that fails can also leave
  orbax's commit threads running; the block ends when they have ended, so
  that none logs or writes after it. The asyncio event loop policy is the
  caller's again after the block.
  """
  absl, root, drop = logging.getLogger("absl"), logging.getLogger(), _FromOrbax()
  stand_in = None if root.handlers else logging.NullHandler()
  policy, threads = asyncio.get_event_loop_policy(), _orbax_threads()
  absl.addFilter(drop)
  if stand_in is not None:
    root.addHandler(stand_in)
  draining = _DrainingPolicy(policy)
  asyncio.set_event_loop_policy(draining)
  try:
    yield
  finally:
    try:
      _join_new(threads)
    finally:
      if asyncio.get_event_loop_policy() is draining:
        asyncio.set_event_loop_policy(policy)
      absl.removeFilter(drop)
      if stand_in is not None:
        root.removeHandler(stand_in)


def save_best(directory: str | pathlib.Path, params: Any, model_state: Any,
              summary: dict[str, Any]) -> pathlib.Path:
  """Writes ``{"params", "model_state"}`` with orbax and ``summary`` as JSON.

  ``directory`` is the best state's own folder: both are written into a
  temporary sibling that then replaces ``directory`` as a whole
  (:func:`~orchard_jax.fileio.atomic_directory`), so ``directory/checkpoint``
  and ``directory/best.json`` appear together or not at all. On an error (a
  full disk) the temporary folder, with orbax's own
  ``checkpoint.orbax-checkpoint-tmp`` in it, is removed and ``directory``
  keeps its previous best. Returns the directory.
  """
  directory = pathlib.Path(directory).absolute()
  with atomic_directory(directory) as temporary, _ORBAX_LOCK, quiet_orbax():
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  # it logs too
    with ocp.StandardCheckpointer() as checkpointer:  # waits for orbax's writes on leaving
      checkpointer.save(temporary / CHECKPOINT_SUBDIR,
                        {"params": params, "model_state": model_state})
    (temporary / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
  return directory


def load_best(directory: str | pathlib.Path, template: TrainState) -> TrainState:
  """``template`` with the parameters and model state saved in ``directory``.

  Args:
    directory: A directory written by :class:`BestState` / :func:`save_best`.
    template: A state of the same structure (same model, precision and
      input shape), e.g. a freshly initialised one; only its structure and
      non-parameter fields are used.

  Raises:
    FileNotFoundError: when ``directory`` holds no checkpoint.
  """
  path = pathlib.Path(directory).absolute() / CHECKPOINT_SUBDIR
  if not path.is_dir():
    raise FileNotFoundError(f"no best-state checkpoint in {directory} (expected {path}); "
                            f"was the run given an output directory, and did it finish?")
  target = {"params": template.params, "model_state": template.model_state}
  with _ORBAX_LOCK, quiet_orbax():
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, target)
  return template.replace(params=restored["params"], model_state=restored["model_state"])


def read_summary(directory: str | pathlib.Path) -> dict[str, Any]:
  """The ``best.json`` written beside a checkpoint: epoch, value and metric."""
  return json.loads((pathlib.Path(directory) / SUMMARY_FILE).read_text())
