"""Study callbacks: early stopping, failure streak, progress, best checkpoint, outputs.

Each callback is ``callback(study, frozen_trial)``, called by
``study.optimize`` after every finished trial. :class:`StudyOutputs` is the
one for a study of one's own objective.

One line per event: a study's :class:`Progress` logs each finished trial
once, with why it failed (the study's driver asks the engine not to log
its own "Trial N pruned/failed" lines).
"""

from __future__ import annotations

import logging
import math
import pathlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.records import ERROR
from orchard_jax.study.best_files import remove_other_checkpoints
from orchard_jax.study.outputs import write_outputs
from orchard_jax.study.tables import best_trial, trial_error

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_THRESHOLDS", "FailureStreak", "KeepBestCheckpoint", "Progress",
           "StudyEarlyStopping", "StudyOutputs", "threshold_for"]

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
  """Deletes the checkpoints of finished trials that are not the best
  (:func:`~orchard_jax.study.best_files.remove_other_checkpoints`)."""

  def __init__(self, trials_dir: pathlib.Path, direction: str):
    self.trials_dir, self.direction = trials_dir, direction

  def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
    trials = study.get_trials(deepcopy=False)
    remove_other_checkpoints(trials, best_trial(trials, self.direction),
                             lambda _: self.trials_dir)


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
  ``write_outputs`` call. As on the command line, only the best trial's
  checkpoint is kept (each finished trial's other than the best is deleted
  from where it was written); ``keep_checkpoints=True`` keeps every trial's.
  Safe with ``n_jobs`` threads.
  """

  def __init__(self, run_dir: str | os.PathLike, *, metric: str | None = None,
               direction: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
               plots: bool = True, keep_checkpoints: bool = False):
    self.run_dir, self.metric, self.direction = run_dir, metric, direction
    self.checkpoint_dir, self.plots, self.keep_checkpoints = checkpoint_dir, plots, keep_checkpoints
    self._lock = threading.Lock()
    self.best: FrozenTrial | None = None

  def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
    with self._lock:
      self.best = write_outputs(study, self.run_dir, metric=self.metric,
                                direction=self.direction, checkpoint_dir=self.checkpoint_dir,
                                plots=self.plots, keep_checkpoints=self.keep_checkpoints)
