"""The one way a process runs a study's trials: ``run``, each ``run --workers`` worker, ``worker``.

Every process runs the same loop against the shared storage. Holding the
study lock (:func:`~orchard_jax.study.storage.study_lock`) it

1. fails the trials whose process died -- on a file storage, by the lock
   each live process holds (:mod:`orchard_jax.study.liveness`); on a
   database server, by Optuna's heartbeat -- and enqueues their parameters
   again;
2. enqueues, once, the parameters of trials stopped by SIGTERM, a second
   Ctrl-C, a storage fault or an out-of-memory error (in any process);
3. counts the budget: finished trials that used it (complete, pruned, failed
   and not retried), plus running and waiting ones;
4. if the budget allows, asks for the next trial (a waiting retry first,
   with a sampler seeded by the trial's number, so that no two processes
   draw alike), tags it with this process's unique worker id, and releases
   the lock.

So any mix of processes together runs exactly ``optuna.n_trials`` trials;
a retry takes the place of the trial it repeats. A process whose budget is
spent waits while other live processes' trials still run (one may die and
need a retry), then stops. It also stops on study early stopping, after
three failed trials in a row, and after ``optuna.timeout`` seconds.

A trial's value is stored with retries: a storage that is locked or full
(:func:`~orchard_jax.study.storage.is_transient`) is tried again for
:data:`STORE_PATIENCE_S` seconds before the process gives up with the root
cause in one line. The trial then stays RUNNING under a process that is
gone, so the next process retries it: a storage fault never uses budget.

An out-of-memory error (:func:`~orchard_jax.errors.memory_fault`) is a
resource fault: the trial is stored FAIL with ``resource_fault`` (``memory:
<the error>``), uses no budget and does not count in a failure streak; the
process frees what it can (:func:`free_memory`) and the trial's parameters
are retried once. A second out-of-memory error with the same parameters
fails them for good: FAIL, counted, with an ``error`` that names memory.

Signals: Ctrl-C as in :func:`~orchard_jax.study.runner.run_study`; SIGTERM
stops at once, storing the running trial as FAIL with ``interrupted`` (a
live process retries it). Exit status (:func:`exit_status`): 0 when the
study is done with a best trial, 1 without one, 3 when the study ends short
of ``n_trials`` (a failure streak, the timeout, dead workers), 130 after
Ctrl-C, 143 after SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.errors import StorageFault, memory_fault
from orchard_jax.hostmem import release_malloc, trim_between_trials
from orchard_jax.study.callbacks import (FailureStreak, GracefulInterrupt, KeepBestCheckpoint,
                                         Progress, StudyEarlyStopping, threshold_for)
from orchard_jax.study.liveness import WORKER_ID, Liveness, new_worker_id, reap_dead
from orchard_jax.study.outputs import (ERROR, INTERRUPTED, LOST, RESOURCE_FAULT, RETRY_OF,
                                       STORAGE_FAULT, best_trial, retry_source,
                                       write_study_outputs)
from orchard_jax.study.storage import (Heartbeat, JOURNAL, StudyLock, ask_trial, is_transient,
                                       journal_path, open_storage, root_cause, study_lock)

logger = logging.getLogger(__name__)

__all__ = ["EXIT_SHORT", "WORKER", "Joined", "budget_used", "default_name", "drive",
           "exit_status", "finished_count", "free_memory", "join_study", "locked", "new_worker",
           "requeue_unfinished", "retried_numbers", "run_worker"]

WORKER = "worker"  # trial user attribute: the name of the process that ran it
POLL_S = 1.0
# How long a locked or full storage is retried before the process gives up (its trial is then
# retried by the next run); ORCHARD_JAX_STORE_PATIENCE_S sets it for the command.
STORE_PATIENCE_S = 120.0
EXIT_SHORT = 3


def default_name() -> str:
  return f"{socket.gethostname()}:{os.getpid()}"


# ------------------------------------------------------------------ budget --


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


def free_memory(reason: str) -> None:
  """Gives back what this process can after an out-of-memory error, before a retry: unreachable
  objects (the failed trial's arrays), JAX's compiled programs and traces (compiled again, or
  loaded from the persistent cache, when needed), and the allocator's free memory (the tuned
  allocator's settings released with one warning, every heap trimmed)."""
  import gc
  import jax
  gc.collect()
  jax.clear_caches()
  gc.collect()
  release_malloc(reason)
  trim_between_trials()


# ------------------------------------------------------- storing, patiently --


def store(action: Callable[[], Any], what: str, patience: float | None = None) -> Any:
  """``action()``, retried while the storage is locked or full, for ``patience`` seconds.

  Raises:
    StorageFault: the storage still failed after ``patience`` seconds; the
      message is one line with the root cause.
  """
  if patience is None:
    patience = float(os.environ.get("ORCHARD_JAX_STORE_PATIENCE_S", STORE_PATIENCE_S))
  deadline, warned = time.monotonic() + patience, False
  while True:
    try:
      return action()
    except Exception as e:  # pylint: disable=broad-except
      if not is_transient(e):
        raise
      if time.monotonic() >= deadline:
        raise StorageFault(f"the study's storage failed while storing {what}: {root_cause(e)} "
                           f"(retried for {patience:.0f} s)") from e
      if not warned:
        logger.warning("The study's storage failed while storing %s: %s; retrying for up to "
                       "%.0f s", what, root_cause(e), patience)
        warned = True
      time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))


def locked(lock: StudyLock, action: Callable[[], Any], what: str) -> Any:
  """``action()`` holding the study ``lock``, returned with the lock still held.

  Taking the lock, ``action`` and the lock's :meth:`~StudyLock.confirm` are
  one attempt, retried as :func:`store` retries a write: an attempt that fails
  lets the lock go (a database lock whose connection broke is gone already)
  and the next takes it afresh. So a restart or failover of a database server
  within the patience is waited out, and what ``action`` decided was decided
  under a lock held throughout.
  """
  def attempt() -> Any:
    lock.acquire()
    try:
      result = action()
      lock.confirm()
    except BaseException:
      lock.release()
      raise
    return result
  return store(attempt, what)


@contextlib.contextmanager
def _beating(storage: Any, trial_id: int) -> Iterator[None]:
  """Records Optuna heartbeats of a running trial (database storages with a heartbeat)."""
  interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
  if not interval:
    yield
    return
  stop = threading.Event()

  def beat() -> None:
    while True:
      with contextlib.suppress(Exception):  # one missed beat is within the grace period
        storage.record_heartbeat(trial_id)
      if stop.wait(interval):
        return

  thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()


# ----------------------------------------------------------------- sharing --


class Joined(NamedTuple):
  """A study a process runs trials of: where, its storage, the study, how the dead are seen.

  ``heartbeat``: Optuna's heartbeat fails trials of dead processes (database
  servers). ``liveness``: the folder of the processes' liveness locks (file
  storages), None for a database server or an in-memory study.
  """
  url: str | None
  storage: Any
  study: optuna.Study
  heartbeat: bool
  liveness: pathlib.Path | None = None


def liveness_folder(url: str | None) -> pathlib.Path | None:
  """Where the processes of a file storage keep their liveness locks (None: not a file)."""
  if url is None:
    return None
  if url.startswith(JOURNAL):
    path = journal_path(url)
  elif url.startswith("sqlite:///") and url != "sqlite:///:memory:":
    path = pathlib.Path(url[len("sqlite:///"):])
  else:
    return None
  return path.with_name(path.name + ".workers")


def join_study(recipe: Any, url: str | None, heartbeat: Heartbeat | None = None,
               where: str = "--storage", *, join: bool = True) -> Joined:
  """Opens ``url`` and joins (or creates) the recipe's study.

  A database server gets Optuna's ``heartbeat``; a file storage gets
  liveness locks instead (no writes, no grace period). ``join=False``
  (``orchard-jax run``) honours ``optuna.load_if_exists``.

  Raises:
    RecipeError: the storage cannot be opened (unreachable, credentials
      refused, no driver), or its study has the other direction; nothing is
      written then.
  """
  from orchard_jax.study.runner import open_study
  folder = liveness_folder(url)
  storage = open_storage(url, heartbeat if folder is None else None, where=where)
  study = open_study(recipe, url, storage, join=join, where=where)
  return Joined(url, storage, study, heartbeat is not None and folder is None and url is not None,
                folder)


class _Worker:
  """The state of one process's loop (see the module docstring)."""

  def __init__(self, recipe: Any, study: optuna.Study, lock: StudyLock | None, heartbeat: bool,
               liveness: pathlib.Path | None = None):
    self.recipe, self.study, self.heartbeat, self.liveness = recipe, study, heartbeat, liveness
    self.lock = lock or StudyLock()
    config, training = recipe.study.config, recipe.training
    self.config, self.training = config, training
    threshold = threshold_for(training.monitor_metric, training.monitor_direction,
                              config.early_stopping_threshold)
    self.threshold = threshold if config.enable_early_stopping else None
    self.failures = FailureStreak()
    self.started, self.ran = time.monotonic(), 0
    self.stopped_by: str | None = None

  def _fail_stale(self) -> None:
    """Optuna's heartbeat check: fails trials whose heartbeat went stale, and says so."""
    running = {t.number: t for t in self.study.get_trials(deepcopy=False,
                                                          states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      optuna.storages.fail_stale_trials(self.study)
    for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
      if t.number in running:
        logger.warning("Trial %d of %s stopped beating: marked FAIL; Optuna's retry callback "
                       "enqueues its parameters", t.number,
                       running[t.number].user_attrs.get(WORKER, "a worker"))

  def _early_stopping(self, trials: Sequence[FrozenTrial]) -> StudyEarlyStopping | None:
    if self.threshold is None:
      return None
    return StudyEarlyStopping(self.threshold, self.training.monitor_direction,
                              self.config.early_stopping_patience,
                              metric=self.training.monitor_metric).count_from(trials)

  def early_stopped(self, trials: Sequence[FrozenTrial]) -> bool:
    early = self._early_stopping(trials)
    return early is not None and early.reached

  def early_stop_line(self, trials: Sequence[FrozenTrial]) -> str | None:
    """The one line of a study that early stopping stopped short of ``optuna.n_trials``
    (metric, value, threshold, trials run), or None."""
    early, finished = self._early_stopping(trials), finished_count(trials)
    if early is None or not early.reached or finished >= self.config.n_trials:
      return None
    return early.announcement(finished, self.config.n_trials)

  def next_step(self) -> str:
    """Under the lock: ``'run'`` a trial, ``'wait'`` for other processes, or ``'done'``."""
    if self.heartbeat:
      self._fail_stale()
    reap_dead(self.study, self.liveness)
    requeue_unfinished(self.study)
    trials = self.study.get_trials(deepcopy=False)
    timeout = self.config.timeout
    if self.early_stopped(trials):
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
      from orchard_jax.study.runner import build_sampler
      self.study.sampler = build_sampler(self.config.sampler_type,
                                         self.training.seed + len(trials), parallel=True)
      return "run"
    # Trials of live processes may still die and need a retry.
    running = any(t.state == TrialState.RUNNING and (WORKER_ID in t.user_attrs or WORKER in
                                                     t.user_attrs) for t in trials)
    return "wait" if running and (self.heartbeat or self.liveness is not None) else "done"

  def decide(self) -> str:
    """:meth:`next_step` under the study lock, which it returns held (:func:`locked`)."""
    return locked(self.lock, self.next_step, "the study's next trial")

  def loop(self, run_one: Callable[[], None], interrupt: GracefulInterrupt) -> None:
    """Until done: under the lock, decide; ``run_one()`` releases the lock once its trial
    exists."""
    while not interrupt.requested:
      step = self.decide()
      try:
        if step == "run":
          self.ran += 1
          run_one()
      finally:
        self.lock.release()
      if step == "done":
        return
      if step == "wait":
        time.sleep(POLL_S)


def run_in_cohorts(worker: "_Worker", runner: "TrialRunner", objective: Any,
                   interrupt: GracefulInterrupt, cohort_size: int) -> None:
  """The worker's loop with trials trained in cohorts (``optuna.cohort_size``).

  Each free slot asks, under the study lock, as :meth:`_Worker.loop` does for
  one trial; ``objective.configure`` and ``objective.record`` are a trial's
  two ends (:class:`orchard_jax.study.runner._Objective`). Every trial beats
  (database storages) from its ask to its tell. A cohort that runs out of
  memory has its members told FAIL with the error; they are retried as a
  trial that runs out of memory alone is, and the loop goes on.
  """
  from orchard_jax.engine.driver import run_cohorts
  from orchard_jax.study.callbacks import engine_outcomes_muted
  study, beats, last = runner.joined.study, {}, ["run"]

  def ask() -> optuna.Trial | None:
    if interrupt.requested:
      return None
    step = last[0] = worker.decide()
    try:
      if step != "run":
        return None
      worker.ran += 1
      trial = runner.begin()
    finally:
      worker.lock.release()
    beat = contextlib.ExitStack()
    beat.enter_context(_beating(study._storage, trial._trial_id))  # pylint: disable=protected-access
    beats[trial.number] = beat
    return trial

  def tell(trial: optuna.Trial, outcome: Any) -> None:
    beats.pop(trial.number).close()
    try:
      store(lambda: objective.record(trial, outcome), f"trial {trial.number}'s records")
    except Exception as e:  # pylint: disable=broad-except
      logger.warning("Trial %d's records could not be stored: %s", trial.number, root_cause(e))
    if outcome.error is not None and outcome.state == TrialState.FAIL:
      runner._note_fault(trial, outcome.error)  # pylint: disable=protected-access
    runner.end(trial, outcome.state, outcome.value)

  interrupt.in_trial = True  # SIGTERM stops the cohort now; its trials are retried
  try:
    with engine_outcomes_muted():
      while not interrupt.requested:
        if interrupt.immediate:
          raise KeyboardInterrupt
        try:
          told = run_cohorts(ask, objective.configure, tell, cohort_size)
        except Exception as e:  # pylint: disable=broad-except
          if memory_fault(e) is None:
            raise
          continue  # a cohort out of memory: its members were told so, and are retried once
        if last[0] != "wait":
          return
        if not told:  # others' trials may still need a retry; after our own, look again at once
          time.sleep(POLL_S)
  finally:
    interrupt.in_trial = False
    for beat in beats.values():
      beat.close()


class TrialRunner:
  """Asks, runs and tells one trial at a time for a :class:`_Worker` (ask/tell, not optimize).

  ``objective(trial) -> value`` raises ``optuna.TrialPruned``, a storage fault
  or any failure; ``callbacks(study, frozen_trial)`` run after each tell.
  """

  def __init__(self, joined: Joined, worker: _Worker, objective: Callable[[optuna.Trial], float],
               callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]], name: str,
               worker_id: str):
    self.joined, self.worker, self.objective, self.callbacks = joined, worker, objective, callbacks
    self.name, self.worker_id = name, worker_id
    self.out_of_memory: set[int] = set()  # trials that ran out of memory, until they are told

  def __call__(self) -> None:
    trial = self.begin()
    self.worker.lock.release()  # the trial exists and is ours: others may count it
    state, value, interrupted = None, None, None
    with _beating(self.joined.study._storage, trial._trial_id):  # pylint: disable=protected-access
      try:
        value = self.objective(trial)
        state = TrialState.COMPLETE
      except optuna.TrialPruned:
        state = TrialState.PRUNED
      except KeyboardInterrupt as e:
        state, interrupted = TrialState.FAIL, e
      except Exception as e:  # pylint: disable=broad-except
        state = TrialState.FAIL
        self._note_fault(trial, e)
    self.end(trial, state, value)
    if interrupted is not None:
      raise interrupted

  def begin(self) -> optuna.Trial:
    """Asks for a new trial and tags it with this worker (under the study lock)."""
    study = self.joined.study
    trial = store(lambda: ask_trial(study), "a new trial")
    # Tagged before the lock is released: a RUNNING trial is then always one whose process
    # can be checked (a storage that fails between the two is retried meanwhile).
    store(lambda: trial.set_user_attr(WORKER, self.name), f"trial {trial.number}'s worker")
    store(lambda: trial.set_user_attr(WORKER_ID, self.worker_id), f"trial {trial.number}'s worker")
    return trial

  def end(self, trial: optuna.Trial, state: TrialState, value: float | None) -> None:
    """Tells the trial's result, counts a failure streak and runs the study callbacks."""
    study = self.joined.study
    what = f"trial {trial.number}'s result"
    if state == TrialState.COMPLETE:
      store(lambda: study.tell(trial, value), what)
    else:
      store(lambda: study.tell(trial, state=state), what)
    frozen = store(lambda: study._storage.get_trial(trial._trial_id),  # pylint: disable=protected-access
                   what)
    # A trial out of memory the first time is retried: its retry counts, not it.
    if not frozen.user_attrs.get(RESOURCE_FAULT) and self.worker.failures.observe(frozen):
      logger.error("%d consecutive trials failed (last: %s); stopping", self.worker.failures.count,
                   frozen.user_attrs.get(ERROR, "see the log"))
    for callback in self.callbacks:
      store(lambda: callback(study, frozen), f"trial {trial.number}'s outputs")
    if trial.number in self.out_of_memory:  # before its retry, or the next trial
      self.out_of_memory.discard(trial.number)
      free_memory(f"trial {trial.number} ran out of memory")
    trim_between_trials()  # memory was found short: the trial's freed memory goes back

  def _note_fault(self, trial: optuna.Trial, e: BaseException) -> None:
    """Stores why a failed trial is retried: a storage fault (``storage_fault``), or a first
    out-of-memory error with its parameters (``resource_fault``); a second one is its
    ``error``, for good."""
    if is_transient(e):  # a StorageFault is
      cause = root_cause(e)
      logger.warning("Trial %d was stopped by a storage fault (%s): it is retried; the budget "
                     "is unchanged", trial.number, cause)
      store(lambda: trial.set_user_attr(STORAGE_FAULT, cause), f"trial {trial.number}'s fault")
      return
    memory = memory_fault(e)
    if memory is None:
      return
    self.out_of_memory.add(trial.number)
    study, what = self.joined.study, f"trial {trial.number}'s fault"
    frozen = store(lambda: study._storage.get_trial(trial._trial_id),  # pylint: disable=protected-access
                   what)
    before = memory_faulted_before(store(lambda: study.get_trials(deepcopy=False), what), frozen)
    if before is None:
      logger.warning("Trial %d ran out of memory (%s): it is retried once with its parameters "
                     "after the process frees what it can; the budget is unchanged",
                     trial.number, memory)
      store(lambda: trial.set_user_attr(RESOURCE_FAULT, f"memory: {memory}"), what)
      return
    error = (f"out of memory twice with these parameters (trial {before}, then trial "
             f"{trial.number}): {memory.rstrip('.')}; give the process more memory or shrink the "
             "model or the batch")
    store(lambda: trial.set_user_attr(ERROR, error), what)  # the Progress line shows it


def new_worker(joined: Joined, recipe: Any) -> _Worker:
  """The loop state of this process over ``joined``'s study, with the study's lock."""
  lock = study_lock(joined.storage, joined.url, recipe.study.config.study_name) if (
      joined.url is not None) else StudyLock()
  return _Worker(recipe, joined.study, lock, joined.heartbeat, joined.liveness)


def drive(joined: Joined, worker: _Worker, objective: Callable[[optuna.Trial], float],
          callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]],
          interrupt: GracefulInterrupt, name: str) -> None:
  """Runs trials of ``joined``'s study until done (see the module docstring), holding this
  process's liveness lock meanwhile; ``worker`` counts them and tells what stopped it."""
  worker_id = new_worker_id()
  with contextlib.ExitStack() as stack:
    if joined.liveness is not None:
      stack.enter_context(Liveness(joined.liveness, worker_id))
    runner = TrialRunner(joined, worker, objective, callbacks, name, worker_id)
    cohort_size = worker.config.cohort_size
    if cohort_size > 1 and hasattr(objective, "configure"):
      run_in_cohorts(worker, runner, objective, interrupt, cohort_size)
    else:
      worker.loop(runner, interrupt)


def log_early_stop(worker: _Worker) -> None:
  """Logs, once per process after its loop, the line of a study that early stopping stopped."""
  if worker.stopped_by == "early stopping":
    line = worker.early_stop_line(worker.study.get_trials(deepcopy=False))
    if line is not None:
      logger.info("%s", line)


def exit_status(study: optuna.Study, recipe: Any, best: FrozenTrial | None, worker: _Worker | None,
                interrupt: GracefulInterrupt | None, out: Any, *, resume_hint: bool = True) -> int:
  """The exit status of a process that ran trials of ``study``, saying why when short.

  0: done with a best trial (a study stopped by early stopping says so); 1: no
  trial completed; 3: short of ``n_trials`` (:data:`EXIT_SHORT`); 128 + signal
  after Ctrl-C or SIGTERM.
  """
  config = recipe.study.config
  finished = finished_count(study.get_trials(deepcopy=False))
  then = "run the same command to continue" if resume_hint else "the study cannot be resumed"
  if interrupt is not None and interrupt.requested:
    cause = "SIGTERM" if interrupt.exit_status == 128 + signal.SIGTERM else "Ctrl-C"
    print(f"\nStopped by {cause} after {finished}/{config.n_trials} trials; {then}.", file=out)
    return interrupt.exit_status
  early = None if worker is None else worker.early_stop_line(study.get_trials(deepcopy=False))
  if early is not None:  # done: stopped early on purpose
    print(f"\n{early}.", file=out)
  elif finished < config.n_trials:
    why = worker.stopped_by if worker is not None and worker.stopped_by else "trials were lost"
    print(f"\nThe study is short of optuna.n_trials: {finished}/{config.n_trials} trials "
          f"finished (stopped by {why}); {then}.", file=out)
    return EXIT_SHORT
  return 0 if best is not None else 1


def _summary(study: optuna.Study, recipe: Any, name: str, ran: int, out: Any) -> FrozenTrial | None:
  trials = study.get_trials(deepcopy=False)
  best = best_trial(trials, recipe.training.monitor_direction)
  shown = "none" if best is None else f"{best.value:.4f} (trial {best.number})"
  print(f"Worker {name}: ran {ran} trial(s); study {recipe.study.config.study_name!r} has "
        f"{finished_count(trials)}/{recipe.study.config.n_trials} finished; best "
        f"{recipe.training.monitor_metric} {shown}", file=out)
  return best


def run_worker(recipe: Any, source: Any, run_dir: pathlib.Path, joined: Joined, *,
               name: str | None = None, write_outputs: bool = True, out: Any = None) -> int:
  """Runs trials of the joined study until it is done (see the module docstring).

  Trial checkpoints go to ``run_dir/trials``. With ``write_outputs`` the
  study's outputs (as of this worker's end) are written to ``run_dir`` as
  :func:`~orchard_jax.study.runner.run_study` does; without, one summary
  line is printed. Returns the exit status.
  """
  from orchard_jax.study.runner import _objective
  from orchard_jax.study.space import build_space
  out = out or sys.stdout
  name = name or default_name()
  space = build_space(recipe.study, source.input_shape, recipe.architecture.name)
  study = joined.study
  run_dir.mkdir(parents=True, exist_ok=True)
  trials_dir = run_dir / "trials"
  import jax
  devices = jax.local_devices()
  logger.info("Worker %s joined study %r (%d %s device%s): %d/%d trials finished", name,
              recipe.study.config.study_name, len(devices), devices[0].platform,
              "s" if len(devices) > 1 else "", finished_count(study.get_trials(deepcopy=False)),
              recipe.study.config.n_trials)
  from tqdm.auto import tqdm
  direction = recipe.training.monitor_direction
  callbacks = [Progress(tqdm(disable=True), recipe.training.monitor_metric, direction),
               KeepBestCheckpoint(trials_dir, direction)]
  interrupt = GracefulInterrupt(study)
  worker = new_worker(joined, recipe)
  try:
    with interrupt:
      drive(joined, worker, _objective(recipe, source, space, trials_dir, interrupt), callbacks,
            interrupt, name)
  except KeyboardInterrupt:
    interrupt.requested = True
  log_early_stop(worker)
  best = (write_study_outputs(study, recipe, run_dir, out=out, recipe_ran=worker.ran > 0)
          if write_outputs else _summary(study, recipe, name, worker.ran, out))
  return exit_status(study, recipe, best, worker, interrupt, out)
