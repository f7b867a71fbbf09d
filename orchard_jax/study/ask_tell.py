"""The study's side of the engine's one ask/tell loop, for every process that runs trials.

``orchard-jax run`` (each of its ``optuna.n_jobs`` threads), each ``run
--workers`` worker and ``orchard-jax worker`` run a study's trials with
:func:`orchard_jax.engine.driver.run_trials`, alone or in cohorts of
``optuna.cohort_size``. :class:`StudyDriver` gives that loop

* its **ask**: under the study lock, decide (:meth:`Budget.next_step
  <orchard_jax.study.budget.Budget.next_step>`), ask for the trial and tag it
  with this process's name and unique worker id, then let the lock go: a
  RUNNING trial is always one whose process can be checked;
* its **configure**: :meth:`Objective.configure
  <orchard_jax.study.objective.Objective.configure>`;
* its **tell**: the trial's records and, for a failure, why it is retried
  (a storage fault, a first out-of-memory error); then the result, the
  failure streak and the study callbacks, each write retried while the
  storage is locked or full (:func:`~orchard_jax.study.storing.store`).

Every trial beats (database storages with Optuna's heartbeat) from its ask
to its tell. A storage that still fails after the patience stops the
process with the root cause in one line; the trial then stays RUNNING under
a process that is gone, so the next process retries it: a storage fault
never uses budget. A cohort that runs out of memory has its members told
FAIL with the error; they are retried as a trial that runs out of memory
alone is, and the loop goes on (the process frees what it can first).

Signals: Ctrl-C as in :func:`~orchard_jax.study.runner.run_study`; SIGTERM
stops at once, storing the running trials as FAIL with ``interrupted`` (a
live process retries them).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.engine.driver import run_trials
from orchard_jax.errors import memory_fault, root_cause
from orchard_jax.hostmem import trim_between_trials
from orchard_jax.records import ERROR, RESOURCE_FAULT, WORKER, WORKER_ID
from orchard_jax.study.budget import Budget
from orchard_jax.study.liveness import Liveness, new_worker_id
from orchard_jax.study.locks import StudyLock, study_lock
from orchard_jax.study.objective import Objective, free_memory, note_fault
from orchard_jax.study.opening import Joined
from orchard_jax.study.signals import GracefulInterrupt
from orchard_jax.study.storage import ask_trial
from orchard_jax.study.storing import ThreadedLock, beating, store

logger = logging.getLogger(__name__)

__all__ = ["POLL_S", "StudyDriver", "drive", "drive_threads", "new_budgets"]

POLL_S = 1.0
StudyCallback = Callable[[optuna.Study, FrozenTrial], None]


class StudyDriver:
  """The ask, configure and tell that one process (or ``n_jobs`` thread) gives the engine's
  loop for ``joined``'s study; ``budget`` decides and counts, ``name`` and ``worker_id`` tag
  each trial, ``callbacks(study, frozen_trial)`` run after each tell."""

  def __init__(self, joined: Joined, budget: Budget, objective: Objective,
               callbacks: Sequence[StudyCallback], interrupt: GracefulInterrupt, name: str,
               worker_id: str):
    self.study, self.budget, self.objective, self.callbacks = (joined.study, budget, objective,
                                                               callbacks)
    self.interrupt, self.name, self.worker_id = interrupt, name, worker_id
    self.beats: dict[int, contextlib.ExitStack] = {}  # the trials asked and not yet told
    self.step = "run"  # the budget's last decision

  def ask(self) -> optuna.Trial | None:
    """A new trial of this worker, or None: interrupted, or the budget says wait or done
    (:attr:`step` tells which)."""
    if self.interrupt.requested:
      return None
    with self.budget.turn() as step:
      self.step = step
      if step != "run":
        return None
      self.budget.ran += 1
      study = self.study
      trial = store(lambda: ask_trial(study), "a new trial")
      # Tagged before the lock is let go: a RUNNING trial is then always one whose process
      # can be checked (a storage that fails between the two is retried meanwhile).
      store(lambda: trial.set_user_attr(WORKER, self.name), f"trial {trial.number}'s worker")
      store(lambda: trial.set_user_attr(WORKER_ID, self.worker_id),
            f"trial {trial.number}'s worker")
    beat = contextlib.ExitStack()
    beat.enter_context(beating(study._storage, trial._trial_id))  # pylint: disable=protected-access
    self.beats[trial.number] = beat
    self.interrupt.in_trial = True  # SIGTERM stops the trial now; it is retried
    return trial

  def configure(self, trial: optuna.Trial) -> Any:
    """The trial's TrialConfig (:meth:`Objective.configure`)."""
    if self.interrupt.immediate:  # a SIGTERM came while the trial was being created
      raise KeyboardInterrupt
    return self.objective.configure(trial)

  def tell(self, trial: optuna.Trial, outcome: Any) -> None:
    """Stores the trial's records and faults, tells its result, counts a failure streak, runs
    the study callbacks and gives memory back."""
    self.beats.pop(trial.number).close()
    self.interrupt.in_trial = bool(self.beats)
    try:
      store(lambda: self.objective.record(trial, outcome), f"trial {trial.number}'s records")
    except Exception as e:  # pylint: disable=broad-except
      logger.warning("Trial %d's records could not be stored: %s", trial.number, root_cause(e))
    state, study, what = outcome.trial_state, self.study, f"trial {trial.number}'s result"
    out_of_memory = (state == TrialState.FAIL and outcome.error is not None
                     and note_fault(study, trial, outcome.error))
    if state == TrialState.COMPLETE:
      store(lambda: study.tell(trial, outcome.value), what)
    else:
      store(lambda: study.tell(trial, state=state), what)
    frozen = store(lambda: study._storage.get_trial(trial._trial_id),  # pylint: disable=protected-access
                   what)
    failures = self.budget.failures
    # A trial out of memory the first time is retried: its retry counts, not it.
    if not frozen.user_attrs.get(RESOURCE_FAULT) and failures.observe(frozen):
      logger.error("%d consecutive trials failed (last: %s); stopping", failures.count,
                   frozen.user_attrs.get(ERROR, "see the log"))
    for callback in self.callbacks:
      store(lambda: callback(study, frozen), f"trial {trial.number}'s outputs")
    if out_of_memory:  # before its retry, or the next trial
      free_memory(f"trial {trial.number} ran out of memory")
    trim_between_trials()  # memory was found short: the trial's freed memory goes back

  def run(self, cohort_size: int) -> None:
    """Runs trials, ``cohort_size`` at a time, until the budget is done or an interrupt; while
    the budget waits for other processes' trials, looks again every :data:`POLL_S` seconds."""
    try:
      while not self.interrupt.requested:
        try:
          told = run_trials(self.ask, self.configure, self.tell, cohort_size, log_outcome=False)
        except Exception as e:  # pylint: disable=broad-except
          if memory_fault(e) is None:
            raise
          continue  # a cohort out of memory: its members were told so, and are retried once
        if self.step != "wait":
          return
        if not told:  # others' trials may still need a retry; after our own, look again at once
          time.sleep(POLL_S)
    finally:
      self.interrupt.in_trial = False
      for beat in self.beats.values():
        beat.close()


def new_budgets(joined: Joined, recipe: Any, n_jobs: int = 1) -> list[Budget]:
  """One budget per thread of this process over ``joined``'s study, each with the study's lock;
  several threads (``optuna.n_jobs``) take a lock of the process first."""
  local = threading.Lock() if n_jobs > 1 else None

  def lock() -> StudyLock:
    inner = (study_lock(joined.storage, joined.url, recipe.study.config.study_name)
             if joined.url is not None else StudyLock())
    return inner if local is None else ThreadedLock(local, inner)

  return [Budget(recipe, joined.study, lock(), joined.heartbeat, joined.liveness)
          for _ in range(n_jobs)]


def drive(joined: Joined, budget: Budget, objective: Objective,
          callbacks: Sequence[StudyCallback], interrupt: GracefulInterrupt, name: str) -> None:
  """Runs trials of ``joined``'s study until ``budget`` is done, holding this process's
  liveness lock meanwhile (file storages)."""
  worker_id = new_worker_id()
  with contextlib.ExitStack() as stack:
    if joined.liveness is not None:
      stack.enter_context(Liveness(joined.liveness, worker_id))
    driver = StudyDriver(joined, budget, objective, callbacks, interrupt, name, worker_id)
    driver.run(budget.config.cohort_size)


def drive_threads(joined: Joined, budgets: Sequence[Budget], objective: Objective,
                  callbacks: Sequence[StudyCallback], interrupt: GracefulInterrupt) -> None:
  """Runs the study's loop in one thread per budget (``optuna.n_jobs``, :func:`new_budgets`),
  each taking trials under the study lock as any other process does."""
  if len(budgets) == 1:
    drive(joined, budgets[0], objective, callbacks, interrupt, "run")
    return
  first, *others = budgets
  with concurrent.futures.ThreadPoolExecutor(len(others)) as pool:
    futures = [pool.submit(drive, joined, budget, objective, callbacks, interrupt, f"run.{i + 1}")
               for i, budget in enumerate(others)]
    try:
      drive(joined, first, objective, callbacks, interrupt, "run.0")
    finally:
      for future in futures:
        future.result()
