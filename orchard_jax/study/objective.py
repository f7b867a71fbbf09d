"""A study's objective in two ends: :meth:`Objective.configure` and :meth:`Objective.record`.

``configure`` samples a trial's parameters, stores the resolved
configuration (``config``) and builds its TrialConfig; the engine's driver
then trains it, alone or in a cohort. ``record`` stores how it ended:
``seconds``, ``epochs_run``, ``best_epoch`` and one ``epoch_NN`` attribute
per epoch (:class:`History`), for a failed, pruned or interrupted trial too;
``interrupted`` or ``error`` for a failure. :func:`note_fault` stores why a
failed trial is retried (a storage fault, a first out-of-memory error).
"""

from __future__ import annotations

import gc
import logging
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from orchard_jax.errors import memory_fault, root_cause
from orchard_jax.hostmem import release_malloc, trim_between_trials
from orchard_jax.records import (BEST_EPOCH, CONFIG, EPOCHS_RUN, ERROR, INTERRUPTED,
                                 RESOURCE_FAULT, SECONDS, STORAGE_FAULT)
from orchard_jax.study.best_files import resolved_config
from orchard_jax.study.budget import memory_faulted_before
from orchard_jax.study.build import trial_config
from orchard_jax.study.storage import is_transient
from orchard_jax.study.storing import store
from orchard_jax.study.tables import epoch_attrs

logger = logging.getLogger(__name__)

__all__ = ["History", "Objective", "free_memory", "note_fault"]


class History:
  """Per-epoch records of one run, from its :class:`~orchard_jax.engine.EpochLog` s.

  ``epochs`` is a list of ``{"epoch", "train_loss", "val_<metric>"...}``
  dicts (JSON-ready floats); an epoch whose validation failed has no
  ``val_`` entries. :meth:`user_attrs` is what a study's trial stores of them.
  """

  def __init__(self):
    self.epochs: list[dict[str, float]] = []

  @classmethod
  def from_logs(cls, logs: Sequence[Any]) -> "History":
    """The records of a run's :class:`~orchard_jax.engine.EpochLog` s."""
    history = cls()
    for log in logs:
      entry = {"epoch": log.epoch, "train_loss": float(log.train_loss)}
      if not log.validation_failed:
        entry.update({f"val_{k}": float(v) for k, v in log.metrics.items()})
      history.epochs.append(entry)
    return history

  def best_epoch(self, metric: str, direction: str) -> int | None:
    """The first epoch with the best finite ``val_<metric>``; None if none has one."""
    sign = -1.0 if direction == "maximize" else 1.0
    scored = [(sign * e[f"val_{metric}"], e["epoch"]) for e in self.epochs
              if math.isfinite(e.get(f"val_{metric}", math.nan))]
    return min(scored)[1] if scored else None

  def user_attrs(self, metric: str, direction: str, epochs: int | None = None) -> dict[str, Any]:
    """A trial's attributes of this run: ``epochs_run``, ``best_epoch`` (when an epoch had a
    finite ``val_<metric>``) and one ``epoch_NN`` per epoch (zero-padded to the width of
    ``epochs``, the trial's planned epochs), each far below optuna-dashboard's 1,024
    characters."""
    best = self.best_epoch(metric, direction)
    return {EPOCHS_RUN: len(self.epochs), **({} if best is None else {BEST_EPOCH: best}),
            **epoch_attrs(self.epochs, epochs)}


class Objective:
  """The study's objective: samples, stores the trial's resolved configuration, records.

  Each trial, however it ends, stores ``seconds``, ``epochs_run``,
  ``best_epoch`` and one ``epoch_NN`` attribute per epoch
  (:meth:`History.user_attrs`).
  """

  def __init__(self, recipe: Any, source: Any, space: Any, trials_dir: pathlib.Path):
    self.recipe, self.source, self.space, self.trials_dir = recipe, source, space, trials_dir

  def configure(self, trial: optuna.Trial) -> Any:
    """The trial's TrialConfig, its parameters sampled and its ``config`` stored."""
    recipe = self.recipe
    params = self.space.sample(trial, recipe.training)
    trial.set_user_attr(CONFIG, resolved_config(recipe, params))
    return trial_config(recipe, self.source, params, output_dir=self.trials_dir)

  def record(self, trial: optuna.Trial, outcome: Any) -> None:
    """Stores how the trial ended (``outcome``: the engine's
    :class:`~orchard_jax.engine.outcome.Outcome`): why it failed, its epochs and seconds."""
    if outcome.error is not None and outcome.trial_state == TrialState.FAIL:
      _failed(trial, outcome.error)
    training = self.recipe.training
    attrs = History.from_logs(outcome.history).user_attrs(
        training.monitor_metric, training.monitor_direction, self.recipe.study.config.epochs)
    attrs[SECONDS] = round(outcome.seconds, 3)
    for key, value in attrs.items():
      trial.set_user_attr(key, value)


def _failed(trial: optuna.Trial, e: BaseException) -> None:
  """Stores why ``trial`` failed: ``interrupted``, or its ``error`` unless the engine stored it
  already or the storage failed (a storage fault is noted by :func:`note_fault`)."""
  if isinstance(e, KeyboardInterrupt):
    trial.set_user_attr(INTERRUPTED, True)
  elif ERROR not in trial.user_attrs and not is_transient(e):
    trial.set_user_attr(ERROR, f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")


def note_fault(study: optuna.Study, trial: optuna.Trial, e: BaseException) -> bool:
  """Stores why a failed trial is retried: a storage fault (``storage_fault``), or a first
  out-of-memory error with its parameters (``resource_fault``); a second one is its
  ``error``, for good. Returns whether it ran out of memory."""
  if is_transient(e):  # a StorageFault is
    cause = root_cause(e)
    logger.warning("Trial %d was stopped by a storage fault (%s): it is retried; the budget "
                   "is unchanged", trial.number, cause)
    store(lambda: trial.set_user_attr(STORAGE_FAULT, cause), f"trial {trial.number}'s fault")
    return False
  memory = memory_fault(e)
  if memory is None:
    return False
  what = f"trial {trial.number}'s fault"
  frozen = store(lambda: study._storage.get_trial(trial._trial_id),  # pylint: disable=protected-access
                 what)
  before = memory_faulted_before(store(lambda: study.get_trials(deepcopy=False), what), frozen)
  if before is None:
    logger.warning("Trial %d ran out of memory (%s): it is retried once with its parameters "
                   "after the process frees what it can; the budget is unchanged",
                   trial.number, memory)
    store(lambda: trial.set_user_attr(RESOURCE_FAULT, f"memory: {memory}"), what)
    return True
  error = (f"out of memory twice with these parameters (trial {before}, then trial "
           f"{trial.number}): {memory.rstrip('.')}; give the process more memory or shrink the "
           "model or the batch")
  store(lambda: trial.set_user_attr(ERROR, error), what)  # the Progress line shows it
  return True


def free_memory(reason: str) -> None:
  """Gives back what this process can after an out-of-memory error, before a retry: unreachable
  objects (the failed trial's arrays), JAX's compiled programs and traces (compiled again, or
  loaded from the persistent cache, when needed), and the allocator's free memory (the tuned
  allocator's settings released with one warning, every heap trimmed)."""
  import jax  # pylint: disable=import-outside-toplevel  # JAX: only once a trial ran
  gc.collect()
  jax.clear_caches()
  gc.collect()
  release_malloc(reason)
  trim_between_trials()
