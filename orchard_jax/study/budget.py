"""A study's budget: which trials use ``optuna.n_trials``, and whether a process runs another.

Every process that runs trials (``orchard-jax run``, each ``run --workers``
worker, ``orchard-jax worker``) decides under the study lock, with
:meth:`Budget.next_step`, whether it runs another trial. Holding the lock it

1. fails the trials whose process died -- on a file storage, by the lock
   each live process holds (:mod:`orchard_jax.study.liveness`); on a
   database server, by Optuna's heartbeat -- and enqueues their parameters
   again (:func:`reclaim_lost`);
2. enqueues, once, the parameters of trials stopped by SIGTERM, a second
   Ctrl-C, a storage fault or an out-of-memory error (in any process);
3. counts the budget: finished trials that used it (complete, pruned, failed
   and not retried), plus running and waiting ones (:func:`budget_used`);
4. runs a trial if the budget allows (a waiting retry first, with a sampler
   seeded by the study's trial count, so that no two processes draw alike).

So any mix of processes together runs exactly ``optuna.n_trials`` trials;
a retry takes the place of the trial it repeats. A process whose budget is
spent waits while other live processes' trials still run (one may die and
need a retry), then stops. It also stops on study early stopping, after
three failed trials in a row, and after ``optuna.timeout`` seconds
(:attr:`Budget.stopped_by` says which).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.records import (INTERRUPTED, LOST, RESOURCE_FAULT, RETRY_OF, STORAGE_FAULT,
                                 WORKER, WORKER_ID)
from orchard_jax.study.study_callbacks import FailureStreak, StudyEarlyStopping, threshold_for
from orchard_jax.study.liveness import reap_dead
from orchard_jax.study.locks import StudyLock
from orchard_jax.study.opening import build_sampler
from orchard_jax.study.storing import under_lock
from orchard_jax.study.tables import retry_source

logger = logging.getLogger(__name__)

__all__ = ["Budget", "budget_used", "early_stop_line", "finished_count", "memory_faulted_before",
           "reclaim_lost", "requeue_unfinished", "retried_numbers"]


# ---------------------------------------------------------------- counting --


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
  """Numbers of the trials another trial retries: ``retry_of`` (interrupted, lost with their
  process, stopped by a storage fault or out of memory) or Optuna's heartbeat
  ``retry_history``."""
  numbers = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
  return numbers.union(*(t.system_attrs.get("retry_history", ()) for t in trials))


def _unfinished(trial: FrozenTrial) -> bool:
  """A failure that says nothing of its parameters: interrupted, lost with its process,
  stopped by a storage fault, or out of memory the first time."""
  return trial.state == TrialState.FAIL and any(
      trial.user_attrs.get(key) for key in (INTERRUPTED, LOST, STORAGE_FAULT, RESOURCE_FAULT))


def finished_count(trials: Sequence[FrozenTrial]) -> int:
  """Trials that used the budget: complete, pruned, and failed for their own reasons (not
  interrupted, lost, stopped by a storage fault or out of memory) and not retried."""
  retried = retried_numbers(trials)
  return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
      t.state == TrialState.FAIL and not _unfinished(t) and t.number not in retried)
      for t in trials)


def budget_used(trials: Sequence[FrozenTrial]) -> int:
  """Trials that hold a place in ``n_trials``: finished ones that used it, running, waiting."""
  pending = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
  return finished_count(trials) + pending


def memory_faulted_before(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> int | None:
  """The number of an earlier attempt at ``trial``'s parameters (along its ``retry_of`` or
  heartbeat retries) that ran out of memory, or None."""
  by_number = {t.number: t for t in trials}
  seen, number = {trial.number}, retry_source(trial)
  while number is not None and number not in seen and number in by_number:
    earlier = by_number[number]
    if earlier.user_attrs.get(RESOURCE_FAULT):
      return number
    seen.add(number)
    number = retry_source(earlier)
  return None


# -------------------------------------------------------------- reclaiming --


def requeue_unfinished(study: optuna.Study) -> list[int]:
  """Enqueues the parameters of interrupted, lost, storage- or memory-faulted trials not yet
  retried."""
  trials = study.get_trials(deepcopy=False)
  retried = retried_numbers(trials)
  numbers = [t.number for t in trials if _unfinished(t) and t.number not in retried]
  for t in trials:
    if t.number in numbers:
      study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number}, skip_if_exists=False)
      if not t.user_attrs.get(LOST):  # reap_dead said so already
        logger.info("Trial %d %s: its parameters are retried", t.number,
                    "was interrupted" if t.user_attrs.get(INTERRUPTED)
                    else f"was stopped by a storage fault ({t.user_attrs[STORAGE_FAULT]})"
                    if t.user_attrs.get(STORAGE_FAULT)
                    else f"was stopped by a resource fault ({t.user_attrs[RESOURCE_FAULT]})")
  return numbers


def _fail_stale(study: optuna.Study) -> None:
  """Optuna's heartbeat check: fails trials whose heartbeat went stale, and says so."""
  running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    optuna.storages.fail_stale_trials(study)
  for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
    if t.number in running:
      logger.warning("Trial %d of %s stopped beating: marked FAIL; Optuna's retry callback "
                     "enqueues its parameters", t.number,
                     running[t.number].user_attrs.get(WORKER, "a worker"))


def reclaim_lost(study: optuna.Study, liveness: pathlib.Path | None,
                 heartbeat: bool = False) -> list[int]:
  """Under the study lock: fails the running trials of dead processes (Optuna's heartbeat
  when ``heartbeat``, the liveness locks in ``liveness``) and enqueues their parameters again,
  with those of every other unfinished trial (:func:`requeue_unfinished`). Returns the numbers
  of the trials that :func:`~orchard_jax.study.liveness.reap_dead` failed."""
  if heartbeat:
    _fail_stale(study)
  lost = reap_dead(study, liveness)
  requeue_unfinished(study)
  return lost


# ---------------------------------------------------------------- deciding --


def _early_stopping(recipe: Any, trials: Sequence[FrozenTrial]) -> StudyEarlyStopping | None:
  """The study's early stopping counted over ``trials``; None when it is off or has no
  threshold."""
  config, training = recipe.study.config, recipe.training
  threshold = threshold_for(training.monitor_metric, training.monitor_direction,
                            config.early_stopping_threshold)
  if not config.enable_early_stopping or threshold is None:
    return None
  return StudyEarlyStopping(threshold, training.monitor_direction,
                            config.early_stopping_patience,
                            metric=training.monitor_metric).count_from(trials)


def early_stop_line(recipe: Any, trials: Sequence[FrozenTrial]) -> str | None:
  """The one line of a study that early stopping stopped short of ``optuna.n_trials``
  (metric, value, threshold, trials run), or None."""
  early, finished = _early_stopping(recipe, trials), finished_count(trials)
  n_trials = recipe.study.config.n_trials
  if early is None or not early.reached or finished >= n_trials:
    return None
  return early.announcement(finished, n_trials)


class Budget:
  """What one process (or one ``optuna.n_jobs`` thread) may still run of a study.

  ``lock`` is the study lock it decides under (None: a lock of its own, for
  an in-memory study); ``heartbeat``: Optuna's heartbeat fails the trials of
  dead processes; ``liveness``: the folder of the processes' liveness locks.
  ``ran`` counts the trials it was given, ``failures`` its failure streak;
  ``stopped_by`` says what ended it short of the budget, if anything did.
  """

  def __init__(self, recipe: Any, study: optuna.Study, lock: StudyLock | None, heartbeat: bool,
               liveness: pathlib.Path | None = None):
    self.recipe, self.study, self.heartbeat, self.liveness = recipe, study, heartbeat, liveness
    self.lock = lock or StudyLock()
    self.config, self.training = recipe.study.config, recipe.training
    self.failures = FailureStreak()
    self.started, self.ran = time.monotonic(), 0
    self.stopped_by: str | None = None

  def next_step(self) -> str:
    """Under the lock: ``'run'`` a trial, ``'wait'`` for other processes, or ``'done'``."""
    reclaim_lost(self.study, self.liveness, self.heartbeat)
    trials = self.study.get_trials(deepcopy=False)
    timeout = self.config.timeout
    early = _early_stopping(self.recipe, trials)
    if early is not None and early.reached:
      self.stopped_by = "early stopping"
      return "done"
    if self.failures.count >= self.failures.limit:
      self.stopped_by = f"{self.failures.count} failed trials in a row"
      return "done"
    if timeout is not None and time.monotonic() - self.started >= timeout:
      self.stopped_by = f"optuna.timeout ({timeout:g} s)"
      return "done"
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if waiting or budget_used(trials) < self.config.n_trials:
      # A seed per trial number, so that processes do not replay one another's draws.
      self.study.sampler = build_sampler(self.config.sampler_type,
                                         self.training.seed + len(trials), parallel=True)
      return "run"
    # Trials of live processes may still die and need a retry.
    running = any(t.state == TrialState.RUNNING and (WORKER_ID in t.user_attrs or WORKER in
                                                     t.user_attrs) for t in trials)
    return "wait" if running and (self.heartbeat or self.liveness is not None) else "done"

  @contextlib.contextmanager
  def turn(self) -> Iterator[str]:
    """Holds the study lock while the next step is decided (:meth:`next_step`) and, for
    ``'run'``, while the caller asks for its trial; lets it go when the block ends."""
    with under_lock(self.lock, self.next_step, "the study's next trial") as step:
      yield step
