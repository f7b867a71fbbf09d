"""Study callbacks of the runner, and its SIGINT handler.

Each callback is ``callback(study, frozen_trial)``, called by
``study.optimize`` after every finished trial. :class:`StudyOutputs` is the
one for a study of one's own objective.

One line per event: a study's :class:`Progress` logs each finished trial
once, with why it failed; while the study's objective runs the engine's own
"Trial N pruned/failed" lines are left out (:func:`engine_outcomes_muted`).
"""

from __future__ import annotations

import logging
import math
import pathlib
import shutil
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.study.outputs import ERROR, best_trial, trial_error, write_outputs

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_THRESHOLDS", "FailureStreak", "GracefulInterrupt", "KeepBestCheckpoint",
           "Progress", "StudyEarlyStopping", "StudyOutputs", "engine_outcomes_muted",
           "threshold_for"]

MAX_CONSECUTIVE_FAILURES = 3
# The reference's default early-stopping thresholds (orchard-ml optimization/early_stopping.py).
DEFAULT_THRESHOLDS = {"maximize": {"auc": 0.9999, "accuracy": 0.995, "f1": 0.98},
                      "minimize": {"loss": 0.01}}


def threshold_for(metric: str, direction: str, threshold: float | None) -> float | None:
  """The early-stopping threshold: the configured one, else the metric's default."""
  return threshold if threshold is not None else DEFAULT_THRESHOLDS[direction].get(metric)


def _reached(value: float | None, threshold: float, direction: str) -> bool:
  if value is None or math.isnan(value):
    return False
  return value >= threshold if direction == "maximize" else value <= threshold


class StudyEarlyStopping:
  """Stops the study after ``patience`` consecutive finished trials reach ``threshold``.

  A pruned or failed trial, or one below the threshold, resets the count.
  ``count`` may start from stored trials (see :meth:`count_from`); ``value`` is
  the last counted trial's value. A study it stops is announced in one line
  (:meth:`announcement`): the metric, its value, the threshold and the trials
  run, as the reference's callback reports them.
  """

  def __init__(self, threshold: float, direction: str, patience: int, count: int = 0, *,
               metric: str = "value"):
    self.threshold, self.direction, self.patience, self.count = threshold, direction, patience, count
    self.metric, self.value = metric, math.nan

  @property
  def reached(self) -> bool:
    return self.count >= self.patience

  def count_from(self, trials: Sequence[FrozenTrial]) -> "StudyEarlyStopping":
    """Sets ``count`` to the trailing streak of the stored, finished trials."""
    self.count = 0
    for trial in sorted((t for t in trials if t.state.is_finished()), key=lambda t: t.number):
      self._observe(trial)
    return self

  def _observe(self, trial: FrozenTrial) -> None:
    ok = trial.state == TrialState.COMPLETE and _reached(trial.value, self.threshold, self.direction)
    self.count = self.count + 1 if ok else 0
    self.value = trial.value if ok else math.nan

  def announcement(self, trials_run: int, n_trials: int | None = None) -> str:
    """The one line of a study this stopped, e.g. ``Early stopping: auc 1.000000 >= threshold
    0.9999 in 2 consecutive trials; the study stopped after 2 of 50 trials (48 not run)``."""
    sign = ">=" if self.direction == "maximize" else "<="
    of = "" if n_trials is None else f" of {n_trials}"
    saved = "" if n_trials is None else f" ({max(n_trials - trials_run, 0)} not run)"
    return (f"Early stopping: {self.metric} {self.value:.6f} {sign} threshold {self.threshold:g} "
            f"in {self.count} consecutive trial{'s' if self.count != 1 else ''}; the study "
            f"stopped after {trials_run}{of} trials{saved}")

  def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
    self._observe(trial)
    if self.reached:
      finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
      logger.info("%s", self.announcement(finished))
      study.stop()


class FailureStreak:
  """Stops the study after ``limit`` consecutive failed trials (a broken setup)."""

  def __init__(self, limit: int = MAX_CONSECUTIVE_FAILURES):
    self.limit, self.count = limit, 0

  def observe(self, trial: FrozenTrial) -> bool:
    """Counts ``trial``; True once ``limit`` trials in a row have failed."""
    self.count = self.count + 1 if trial.state == TrialState.FAIL else 0
    return self.count >= self.limit

  def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
    if self.observe(trial):
      logger.error("%d consecutive trials failed (last: %s); stopping the study", self.count,
                   trial.user_attrs.get(ERROR, "see the log"))
      study.stop()


class KeepBestCheckpoint:
  """Deletes the checkpoints of finished trials that are not the best."""

  def __init__(self, trials_dir: pathlib.Path, direction: str):
    self.trials_dir, self.direction = trials_dir, direction

  def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
    trials = study.get_trials(deepcopy=False)
    best = best_trial(trials, self.direction)
    for t in trials:
      if t.state.is_finished() and (best is None or t.number != best.number):
        shutil.rmtree(self.trials_dir / f"trial_{t.number}", ignore_errors=True)


class Progress:
  """A tqdm bar over trials and one log line per finished trial (a failed one at warning
  level, with its error)."""

  def __init__(self, bar: Any, metric: str, direction: str):
    self.bar, self.metric, self.direction = bar, metric, direction

  def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
    best = best_trial(study.get_trials(deepcopy=False), self.direction)
    seconds = (trial.duration.total_seconds() if trial.duration else float("nan"))
    value = trial.value if trial.state == TrialState.COMPLETE else (
        trial.intermediate_values.get(trial.last_step) if trial.last_step is not None else None)
    shown = "-" if value is None else f"{value:.4f}"
    best_text = "-" if best is None else f"{best.value:.4f} (trial {best.number})"
    line = (f"Trial {trial.number} {trial.state.name} | {self.metric} {shown} | epochs "
            f"{trial.last_step or 0} | {seconds:.1f} s | best {best_text}")
    if trial.state == TrialState.FAIL:
      logger.warning("%s | %s", line, trial_error(trial) or "unknown error")
    else:
      logger.info("%s", line)
    self.bar.update(1)
    if best is not None:
      self.bar.set_postfix({"best": f"{best.value:.4f}", "trial": best.number})


# The engine's lines that a study's Progress line says again (the engine logs them for
# objectives of one's own, which have no Progress).
_ENGINE_OUTCOMES = {"orchard_jax.engine.trial": ("Trial %d failed",),
                    "orchard_jax.engine.cohort": ("Trial %d failed",),
                    "orchard_jax.engine.callbacks": ("Trial %d pruned",)}


class _MuteOutcomes(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and
                record.msg.startswith(_ENGINE_OUTCOMES.get(record.name, ())))


_muted = {"count": 0, "lock": threading.Lock(), "filter": _MuteOutcomes()}


@contextlib.contextmanager
def engine_outcomes_muted() -> Iterator[None]:
  """While entered (by any thread), the engine's "Trial N failed" and "Trial N pruned"
  lines are not logged: the study's :class:`Progress` logs each finished trial once."""
  with _muted["lock"]:
    if _muted["count"] == 0:
      for name in _ENGINE_OUTCOMES:
        logging.getLogger(name).addFilter(_muted["filter"])
    _muted["count"] += 1
  try:
    yield
  finally:
    with _muted["lock"]:
      _muted["count"] -= 1
      if _muted["count"] == 0:
        for name in _ENGINE_OUTCOMES:
          logging.getLogger(name).removeFilter(_muted["filter"])


class StudyOutputs:
  """A study callback that writes a study's outputs after each finished trial.

  For a plain Optuna study whose objective calls
  :func:`~orchard_jax.engine.run_trial`::

    outputs = orchard_jax.StudyOutputs("runs/mine", metric="accuracy")
    study.optimize(objective, n_trials=20, callbacks=[outputs])

  ``run_dir`` then holds, as of the last finished trial, what
  :func:`~orchard_jax.study.outputs.write_outputs` writes (``trials.csv``,
  ``plots/``, ``best_trial.yaml``, ``best_model/``); the arguments are its
  own. ``plots=False`` leaves the plots (about a second per trial) to a last
  ``write_outputs`` call. Safe with ``n_jobs`` threads.
  """

  def __init__(self, run_dir: str | os.PathLike, *, metric: str | None = None,
               direction: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
               plots: bool = True):
    self.run_dir, self.metric, self.direction = run_dir, metric, direction
    self.checkpoint_dir, self.plots = checkpoint_dir, plots
    self._lock = threading.Lock()
    self.best: FrozenTrial | None = None

  def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
    with self._lock:
      self.best = write_outputs(study, self.run_dir, metric=self.metric,
                                direction=self.direction, checkpoint_dir=self.checkpoint_dir,
                                plots=self.plots)


class StopSignals:
  """While entered, SIGINT and SIGTERM call ``self._handle(signum, frame)``.

  The previous handlers come back on exit. Outside the main thread, where
  Python cannot set signal handlers, entering changes nothing.
  """

  _previous: dict[int, Any]

  def __enter__(self):
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    raise NotImplementedError


class GracefulInterrupt(StopSignals):
  """SIGINT and SIGTERM handler of a study run (a context manager; main thread only).

  * SIGINT (Ctrl-C): the first stops the study after the running trial, the
    second stops at once.
  * SIGTERM: stops at once. Inside a trial it raises ``KeyboardInterrupt``
    there (the objective stores the trial as FAIL with ``interrupted``, so
    it is retried); between trials the study stops before the next one.

  The objective sets ``in_trial`` while it runs and raises
  ``KeyboardInterrupt`` itself when :attr:`immediate` is already set (a
  signal that came while the trial was being created). ``exit_status`` is
  128 + the last signal (130 for SIGINT, 143 for SIGTERM).
  """

  def __init__(self, study: optuna.Study):
    self.study, self.requested, self.immediate, self.in_trial = study, False, False, False
    self.signum: int | None = None

  @property
  def exit_status(self) -> int:
    return 128 + (self.signum or signal.SIGINT)

  def _stop(self) -> None:
    try:
      self.study.stop()
    except RuntimeError:  # not optimizing yet; the runner checks `requested` before optimize
      pass

  def _handle(self, signum: int, frame: Any) -> None:
    again, self.requested, self.signum = self.requested, True, signum
    if signum == signal.SIGTERM or again:
      self.immediate = True
      if signum == signal.SIGTERM and not again:
        print("\nTerminated: the running trial stops now and is stored as interrupted (it is "
              "retried); then the outputs are written.", file=sys.stderr, flush=True)
      self._stop()
      if self.in_trial or signum == signal.SIGINT:
        raise KeyboardInterrupt
      return
    print("\nInterrupted: the running trial finishes, then the study stops and its outputs are "
          "written (Ctrl-C again stops now). The same command resumes.", file=sys.stderr, flush=True)
    self._stop()
