"""A study's trials read back: their records, the best of them, ``trials.csv`` and the table.

Each trial of a recipe's study carries scalar user attributes to sort on in
optuna-dashboard (``best_epoch``, ``epochs_run``, ``seconds``) and one
attribute per epoch, ``epoch_01``, ``epoch_02``, ...: that epoch's training
loss and validation metrics, a few hundred characters (the dashboard cuts
each attribute at 1,024). Studies stored before keep one ``history`` list;
:func:`trial_history` reads both. The keys are :mod:`orchard_jax.records`'.
"""

from __future__ import annotations

import csv
import io
import math
import pathlib
from collections.abc import Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from orchard_jax.fileio import atomic_write_text
from orchard_jax.records import (BEST_EPOCH, CHECKPOINT_ERROR, EPOCH_PREFIX, EPOCHS_RUN, ERROR,
                                 HISTORY, INTERRUPTED, LOST, RESOURCE_FAULT, RETRY_OF, SECONDS,
                                 STORAGE_FAULT)

__all__ = ["TOP_K", "best_trial", "epoch_attrs", "epoch_key", "format_table", "ranked",
           "retry_source", "trial_error", "trial_history", "write_trials_csv"]

TOP_K = 5  # the best trials the table lists


def best_trial(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
  """The complete trial with the best finite value (lowest number on ties); None if none."""
  done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
          and math.isfinite(t.value)]
  if not done:
    return None
  sign = -1.0 if direction == "maximize" else 1.0
  return min(done, key=lambda t: (sign * t.value, t.number))


def ranked(trials: Sequence[FrozenTrial], direction: str) -> list[FrozenTrial]:
  done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
          and math.isfinite(t.value)]
  sign = -1.0 if direction == "maximize" else 1.0
  return sorted(done, key=lambda t: (sign * t.value, t.number))


def epoch_key(epoch: int, epochs: int | None = None) -> str:
  """The user attribute of one epoch: ``epoch_01`` (zero-padded to the width of ``epochs``, at
  least 2 digits, so the dashboard lists them in order)."""
  return f"{EPOCH_PREFIX}{epoch:0{max(2, len(str(epochs or 0)))}d}"


def epoch_attrs(epochs: Sequence[dict[str, float]],
                total: int | None = None) -> dict[str, dict[str, float]]:
  """``{"epoch_01": {"train_loss": ..., "val_accuracy": ...}, ...}``: one compact attribute per
  epoch of a :class:`~orchard_jax.study.build.History` (the epoch is in the name)."""
  return {epoch_key(int(e["epoch"]), total): {k: v for k, v in e.items() if k != "epoch"}
          for e in epochs}


def trial_history(trial: FrozenTrial) -> list[dict[str, float]]:
  """The trial's per-epoch records (``{"epoch", "train_loss", "val_<metric>"...}``), from its
  ``epoch_NN`` attributes or, for a trial stored before those, its ``history`` list."""
  epochs = []
  for key, value in trial.user_attrs.items():
    number = key[len(EPOCH_PREFIX):]
    if key.startswith(EPOCH_PREFIX) and number.isdigit() and isinstance(value, dict):
      epochs.append({"epoch": int(number), **value})
  if epochs:
    return sorted(epochs, key=lambda e: e["epoch"])
  return list(trial.user_attrs.get(HISTORY) or [])


def _seconds(trial: FrozenTrial) -> float | None:
  seconds = trial.user_attrs.get(SECONDS)
  if isinstance(seconds, (int, float)):
    return float(seconds)
  return trial.duration.total_seconds() if trial.duration is not None else None


def _epochs(trial: FrozenTrial) -> int:
  epochs = trial.user_attrs.get(EPOCHS_RUN)
  return epochs if isinstance(epochs, int) else (trial.last_step or 0)


def _value(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(trials: Sequence[FrozenTrial], metric: str, direction: str, k: int = TOP_K) -> str:
  """The best ``k`` complete trials as a fixed-width text table."""
  rows = ranked(trials, direction)[:k]
  header = f"{'rank':>4}  {'trial':>5}  {metric:>10}  {'epochs':>6}  {'seconds':>7}  params"
  lines = [header]
  for rank, t in enumerate(rows, 1):
    seconds = _seconds(t)
    params = "  ".join(f"{name}={_value(v)}" for name, v in t.params.items())
    lines.append(f"{rank:>4}  {t.number:>5}  {t.value:>10.4f}  {_epochs(t):>6}  "
                 f"{'-' if seconds is None else f'{seconds:.1f}':>7}  {params}")
  return "\n".join(lines)


def retry_source(trial: FrozenTrial) -> int | None:
  """The trial ``trial`` retries: ``retry_of`` (interrupted, lost, storage or memory faults)
  or Optuna's heartbeat retry (system attribute ``failed_trial``); None for a new one."""
  number = trial.user_attrs.get(RETRY_OF)
  return trial.system_attrs.get("failed_trial") if number is None else number


def trial_error(trial: FrozenTrial) -> str:
  """Why a trial did not finish: ``memory: ...`` (retried), its error, ``interrupted``,
  ``lost: ...``, ``storage: ...``."""
  if trial.user_attrs.get(RESOURCE_FAULT):
    return trial.user_attrs[RESOURCE_FAULT]
  if trial.user_attrs.get(ERROR):
    return trial.user_attrs[ERROR]
  if trial.user_attrs.get(INTERRUPTED):
    return "interrupted"
  if trial.user_attrs.get(LOST):
    return f"lost: {trial.user_attrs[LOST]}"
  if trial.user_attrs.get(STORAGE_FAULT):
    return f"storage: {trial.user_attrs[STORAGE_FAULT]}"
  return ""


def write_trials_csv(trials: Sequence[FrozenTrial], path: pathlib.Path) -> pathlib.Path:
  """One row per trial; ``epochs`` and ``seconds`` are the trial's ``epochs_run`` and
  ``seconds`` attributes (else its last reported epoch and its duration)."""
  names = sorted({name for t in trials for name in t.params})
  columns = ["number", "state", "value", "best_epoch", "epochs", "seconds", "datetime_start",
             "datetime_complete", *(f"params_{n}" for n in names), "retry_of", "error",
             "checkpoint_error"]
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(columns)
  for t in sorted(trials, key=lambda t: t.number):
    retry, seconds = retry_source(t), _seconds(t)
    writer.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                     t.user_attrs.get(BEST_EPOCH, ""), _epochs(t),
                     "" if seconds is None else seconds, t.datetime_start or "",
                     t.datetime_complete or "", *(t.params.get(n, "") for n in names),
                     "" if retry is None else retry, trial_error(t),
                     t.user_attrs.get(CHECKPOINT_ERROR, "")])
  atomic_write_text(path, buffer.getvalue())
  return path
