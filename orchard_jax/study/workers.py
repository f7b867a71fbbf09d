"""A worker: one of several processes, on one or many machines, that share a study.

Every worker runs the same loop against the shared storage. Holding the
study lock (:func:`~orchard_jax.study.storage.study_lock`) it

1. fails the trials whose heartbeat went stale (their workers died) and lets
   Optuna's retry callback enqueue their parameters again;
2. enqueues, once, the parameters of interrupted trials (stopped by SIGTERM
   or a second Ctrl-C, in any worker);
3. counts the budget: finished trials that used it (complete, pruned, failed
   and not retried), plus running and waiting ones;
4. starts the next trial (a waiting one first) if the budget allows, and
   releases the lock as soon as that trial exists.

So the workers together run exactly ``optuna.n_trials`` trials (retries of
lost or interrupted trials take the place of the trial they repeat), none
twice. A worker whose budget is spent waits while trials of other workers
still run on a storage with a heartbeat (one of them may die and need a
retry), then stops. It also stops on study early stopping, after three
failed trials of its own in a row, and after ``optuna.timeout`` seconds.

Signals: Ctrl-C as in :func:`~orchard_jax.study.runner.run_study`; SIGTERM
stops at once, storing the running trial as FAIL with ``interrupted`` (a
live worker retries it). Exit status: 0 when the study is done with a best
trial, 1 without one (or after a failure streak), 130 after Ctrl-C, 143
after SIGTERM.
"""

from __future__ import annotations

import logging
import os
import pathlib
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.study.callbacks import (FailureStreak, GracefulInterrupt, KeepBestCheckpoint,
                                         Progress, StudyEarlyStopping, threshold_for)
from orchard_jax.study.outputs import best_trial, write_study_outputs
from orchard_jax.study.runner import (_objective, build_sampler, finished_count, open_study,
                                      requeue_interrupted)
from orchard_jax.study.space import build_space
from orchard_jax.study.storage import Heartbeat, StudyLock, open_storage, study_lock

logger = logging.getLogger(__name__)

__all__ = ["WORKER", "Joined", "budget_used", "default_name", "join_study", "run_worker"]

WORKER = "worker"  # trial user attribute: the name of the worker that ran it
POLL_S = 1.0


def default_name() -> str:
  return f"{socket.gethostname()}:{os.getpid()}"


def budget_used(trials: Sequence[FrozenTrial]) -> int:
  """Trials that hold a place in ``n_trials``: finished ones that used it, running, waiting."""
  pending = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
  return finished_count(trials) + pending


class _Worker:
  """The state of one worker's loop (see the module docstring)."""

  def __init__(self, recipe: Any, study: optuna.Study, lock: StudyLock, heartbeat: bool):
    self.recipe, self.study, self.lock, self.heartbeat = recipe, study, lock, heartbeat
    config, training = recipe.study.config, recipe.training
    self.config, self.training = config, training
    threshold = threshold_for(training.monitor_metric, training.monitor_direction,
                              config.early_stopping_threshold)
    self.threshold = threshold if config.enable_early_stopping else None
    self.failures = FailureStreak()
    self.started, self.ran = time.monotonic(), 0

  def _early_stopped(self, trials: Sequence[FrozenTrial]) -> bool:
    if self.threshold is None:
      return False
    return StudyEarlyStopping(self.threshold, self.training.monitor_direction,
                              self.config.early_stopping_patience).count_from(trials).reached

  def next_step(self) -> str:
    """Under the lock: ``'run'`` a trial, ``'wait'`` for other workers, or ``'done'``."""
    if self.heartbeat:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(self.study)
    requeue_interrupted(self.study)
    trials = self.study.get_trials(deepcopy=False)
    timeout = self.config.timeout
    if (self._early_stopped(trials) or self.failures.count >= self.failures.limit
        or (timeout is not None and time.monotonic() - self.started >= timeout)):
      return "done"
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if waiting or budget_used(trials) < self.config.n_trials:
      # A seed per trial number, so that workers do not replay one another's draws.
      self.study.sampler = build_sampler(self.config.sampler_type,
                                         self.training.seed + len(trials), parallel=True)
      return "run"
    # Trials of live workers may still die and need a retry; only workers' trials beat.
    beating = any(t.state == TrialState.RUNNING and WORKER in t.user_attrs for t in trials)
    return "wait" if self.heartbeat and beating else "done"

  def loop(self, objective: Any, callbacks: list[Any], interrupt: GracefulInterrupt) -> None:
    while not interrupt.requested:
      self.lock.acquire()
      try:
        step = self.next_step()
        if step == "run":
          self.ran += 1
          self.study.optimize(objective, n_trials=1, catch=(Exception,),
                              callbacks=[*callbacks, self.failures], gc_after_trial=False)
      finally:
        self.lock.release()
      if step == "done":
        return
      if step == "wait":
        time.sleep(POLL_S)


def _summary(study: optuna.Study, recipe: Any, name: str, ran: int, out: Any) -> FrozenTrial | None:
  trials = study.get_trials(deepcopy=False)
  best = best_trial(trials, recipe.training.monitor_direction)
  shown = "none" if best is None else f"{best.value:.4f} (trial {best.number})"
  print(f"Worker {name}: ran {ran} trial(s); study {recipe.study.config.study_name!r} has "
        f"{finished_count(trials)}/{recipe.study.config.n_trials} finished; best "
        f"{recipe.training.monitor_metric} {shown}", file=out)
  return best


class Joined(NamedTuple):
  """A study a worker joined: where, its storage, the study, whether trials beat."""
  url: str
  storage: Any
  study: optuna.Study
  heartbeat: bool


def join_study(recipe: Any, url: str, heartbeat: Heartbeat | None = None,
               where: str = "--storage") -> Joined:
  """Opens ``url`` (with the heartbeat, on a database) and joins or creates the recipe's study.

  Raises:
    RecipeError: the storage cannot be opened (unreachable, credentials
      refused, no driver), or its study has the other direction; nothing is
      written then.
  """
  storage = open_storage(url, heartbeat, where=where)
  study = open_study(recipe, url, storage, join=True, where=where)
  return Joined(url, storage, study, heartbeat is not None and not url.startswith("journal:"))


def run_worker(recipe: Any, source: Any, run_dir: pathlib.Path, joined: Joined, *,
               name: str | None = None, write_outputs: bool = True, out: Any = None) -> int:
  """Runs trials of the joined study until it is done (see the module docstring).

  Trial checkpoints go to ``run_dir/trials``. With ``write_outputs`` the
  study's outputs (as of this worker's end) are written to ``run_dir`` as
  :func:`~orchard_jax.study.runner.run_study` does; without, one summary
  line is printed. Returns the exit status.
  """
  out = out or sys.stdout
  name = name or default_name()
  space = build_space(recipe.study, source.input_shape, recipe.architecture.name)
  study = joined.study
  run_dir.mkdir(parents=True, exist_ok=True)
  lock = study_lock(joined.storage, joined.url, recipe.study.config.study_name)
  worker = _Worker(recipe, study, lock, joined.heartbeat)
  trials_dir = run_dir / "trials"
  import jax
  devices = jax.local_devices()
  logger.info("Worker %s joined study %r (%d %s device%s): %d/%d trials finished", name,
              recipe.study.config.study_name, len(devices), devices[0].platform,
              "s" if len(devices) > 1 else "", finished_count(study.get_trials(deepcopy=False)),
              recipe.study.config.n_trials)

  def on_start(trial: optuna.Trial) -> None:
    trial.set_user_attr(WORKER, name)
    lock.release()  # the trial exists: other workers may count it and ask for theirs

  from tqdm.auto import tqdm
  direction = recipe.training.monitor_direction
  callbacks = [Progress(tqdm(disable=True), recipe.training.monitor_metric, direction),
               KeepBestCheckpoint(trials_dir, direction)]
  interrupt = GracefulInterrupt(study)
  try:
    with interrupt:
      worker.loop(_objective(recipe, source, space, trials_dir, interrupt, on_start), callbacks,
                  interrupt)
  except KeyboardInterrupt:
    interrupt.requested = True
  best = (write_study_outputs(study, recipe, run_dir, out=out) if write_outputs
          else _summary(study, recipe, name, worker.ran, out))
  if interrupt.requested:
    return interrupt.exit_status
  return 0 if best is not None and worker.failures.count < worker.failures.limit else 1
