"""Runs a recipe's study: sampler, pruner, storage, resume, Ctrl-C, study callbacks.

* **Sampler**: ``tpe``/``cmaes``/``random``, seeded with ``training.seed``
  plus the number of trials stored when each trial is asked, so a resumed
  study does not replay the parameters it started with, and two processes
  never draw alike.
* **Pruner**: ``median`` and ``percentile`` (25th) with
  ``optuna.pruner_startup_trials`` unpruned trials (Optuna's default 5),
  ``hyperband`` with Optuna's defaults; ``NopPruner`` without pruning. The
  engine asks the pruner from ``pruning_warmup_epochs`` on.
* **Storage**: ``'sqlite'`` is ``<run folder>/study.db`` (or the folder's
  ``study.journal``); ``'memory'`` keeps nothing; any other value is a
  storage URL (see :mod:`orchard_jax.study.storage`). A database that cannot
  be opened stops the run before anything is written.
* **One mechanism**: ``run`` takes its trials exactly as every worker does
  (:mod:`orchard_jax.study.workers`): under the study lock, counting the
  budget, failing the trials of dead processes and retrying their
  parameters. ``n_trials`` is the study's total, so the same command
  continues an interrupted or crashed study. A second ``run`` on a run folder
  that another ``run`` owns refuses in one line that names it
  (:class:`~orchard_jax.study.liveness.RunFolderLock`); ``orchard-jax
  worker`` joins a running study instead.
* **Ctrl-C and SIGTERM**: the first SIGINT lets the running trial finish,
  then stops the study; a second one, or a SIGTERM, stops at once. Either way
  the outputs of what finished are written and the exit status is 130 (143
  after SIGTERM). A trial stopped at once is stored as FAIL with the user
  attribute ``interrupted``, and the next run retries its parameters first
  (``retry_of`` names the original).
* **Study callbacks**: the study stops once ``early_stopping_patience``
  consecutive trials reach the threshold (default per metric, as the
  reference: auc 0.9999, accuracy 0.995, f1 0.98, loss 0.01), announced in
  one line that the log and the end summary both give (``Early stopping: auc
  1.000000 >= threshold 0.9999 in 2 consecutive trials; the study stopped
  after 2 of 50 trials (48 not run)``; exit status 0), and after three failed
  trials in a row. Only the current best trial's checkpoint is
  kept (see :mod:`orchard_jax.study.callbacks`).
* **Exit status**: 0 done with a best trial; 1 no trial completed; 3 the
  study ended short of ``n_trials`` (said on stdout); 130/143 after a signal.
"""

from __future__ import annotations

import logging
import pathlib
import sys
import time
from typing import Any

import optuna
import yaml

from orchard_jax.study.ahead import CompileAhead
from orchard_jax.study.build import History, trial_config
from orchard_jax.study.callbacks import (GracefulInterrupt, KeepBestCheckpoint, Progress,
                                         engine_outcomes_muted)
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.liveness import RunFolderLock
from orchard_jax.study.outputs import (CONFIG, ERROR, INTERRUPTED, SECONDS, import_ahead,
                                      name_metric, resolved_config, write_study_outputs)
from orchard_jax.study.space import build_space
from orchard_jax.study.storage import (Heartbeat, StudyLock, disk_fault, is_disk_fault, masked,
                                      open_storage, storage_url)
from orchard_jax.study.validate import validate
from orchard_jax.study.workers import (drive, exit_status, finished_count, join_study,
                                       log_early_stop, new_worker, requeue_unfinished,
                                       retried_numbers)

logger = logging.getLogger(__name__)

__all__ = ["build_pruner", "build_sampler", "finished_count", "open_study", "requeue_unfinished",
           "retried_numbers", "run_study", "storage_url"]

EXIT_INTERRUPTED = 130


def build_sampler(kind: str, seed: int, parallel: bool = False) -> optuna.samplers.BaseSampler:
  """The sampler; ``parallel`` (several workers) makes TPE count running trials (constant liar).

  ``seed`` is taken modulo 2**32 (a recipe's seed plus a trial count may pass it).
  """
  seed %= 2**32
  if kind == "tpe":
    return optuna.samplers.TPESampler(seed=seed, constant_liar=parallel)
  samplers = {"random": optuna.samplers.RandomSampler, "cmaes": optuna.samplers.CmaEsSampler}
  return samplers[kind](seed=seed)


def build_pruner(config: Any, startup_trials: int) -> optuna.pruners.BasePruner:
  if not config.enable_pruning:
    return optuna.pruners.NopPruner()
  if config.pruner_type == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
  if config.pruner_type == "percentile":
    return optuna.pruners.PercentilePruner(25.0, n_startup_trials=startup_trials)
  return optuna.pruners.HyperbandPruner()


def open_study(recipe: Any, url: str | None, storage: Any = None, *, join: bool = False,
               where: str = "optuna.storage") -> optuna.Study:
  """Creates or loads the study; checks that its direction is the recipe's, and names its
  metric ``training.monitor_metric`` unless it has a name.

  ``storage`` is ``open_storage(url)`` unless given. ``join`` (a worker)
  loads an existing study whatever ``load_if_exists`` says, and samples with
  TPE's constant liar. A study of the other direction is refused before
  anything is written.
  """
  config, training = recipe.study.config, recipe.training
  storage = open_storage(url, where=where) if storage is None else storage
  try:
    study = optuna.create_study(
        study_name=config.study_name, storage=storage, direction=training.monitor_direction,
        sampler=build_sampler(config.sampler_type, training.seed, parallel=join),
        pruner=build_pruner(config, recipe.study.pruner_startup_trials),
        load_if_exists=config.load_if_exists or join)
  except optuna.exceptions.DuplicatedStudyError:
    raise RecipeError(f"study {config.study_name!r} already exists in {masked(url)}; set "
                      f"optuna.load_if_exists: true to resume it, or use another study_name "
                      f"or output folder") from None
  except Exception as e:  # a schema of another Optuna version, a lost connection, ...
    if is_disk_fault(e):  # exit 1, not a bad recipe
      raise disk_fault(where, url, e) from e
    raise RecipeError(f"{where}: cannot open {masked(url)}: {type(e).__name__}: "
                      f"{' '.join(str(getattr(e, 'orig', None) or e).split())[:300]}") from None
  stored = len(study.get_trials(deepcopy=False))
  if stored:
    study.sampler = build_sampler(config.sampler_type, training.seed + stored, parallel=join)
  if study.direction.name.lower() != training.monitor_direction:
    raise RecipeError(f"the stored study {config.study_name!r} was created to "
                      f"{study.direction.name.lower()}, but training.monitor_direction is "
                      f"{training.monitor_direction!r}")
  name_metric(study, training.monitor_metric)  # optuna-dashboard: not "Objective 0"
  return study


# Keys that may change between runs of one study without changing what it searches.
_RUN_KEYS = ("n_trials", "timeout", "n_jobs", "cohort_size", "load_if_exists",
             "show_progress_bar", "save_plots", "save_best_config")


def _warn_if_changed(recipe: Any, previous: pathlib.Path) -> None:
  """Warns when a resumed study runs with other settings than it was stored with."""
  if not previous.is_file():
    return
  def searched(data: dict) -> dict:
    data = {k: v for k, v in data.items() if k != "telemetry"}
    data["optuna"] = {k: v for k, v in data.get("optuna", {}).items() if k not in _RUN_KEYS}
    return data
  try:
    before = searched(yaml.safe_load(previous.read_text()) or {})
  except yaml.YAMLError:
    return
  now = searched(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
  changed = sorted(f"{section}.{key}" for section in now for key in now[section]
                   if before.get(section, {}).get(key) != now[section][key])
  if changed:
    logger.warning("The recipe differs from the one this study ran with (%s): %s; the study "
                   "continues with the new settings", previous, ", ".join(changed))


class _Objective:
  """The study's objective: samples, stores the trial's resolved configuration, trains.

  Each trial, however it ends, stores ``seconds``, ``epochs_run``,
  ``best_epoch`` and one ``epoch_NN`` attribute per epoch
  (:meth:`History.user_attrs`). The engine's own "Trial N pruned/failed"
  lines are left to the study's :class:`Progress` line.

  Called with a trial, it trains it alone (``run_trial``). For
  ``optuna.cohort_size`` > 1, :meth:`configure` and :meth:`record` are the
  two ends of a trial that :func:`orchard_jax.engine.driver.run_cohorts`
  trains in a cohort.
  """

  def __init__(self, recipe: Any, source: Any, space: Any, trials_dir: pathlib.Path,
               interrupt: GracefulInterrupt | None = None):
    self.recipe, self.source, self.space = recipe, source, space
    self.trials_dir, self.interrupt = trials_dir, interrupt

  def _sampled(self, trial: optuna.Trial, history: History | None) -> Any:
    recipe = self.recipe
    params = self.space.sample(trial, recipe.training)
    trial.set_user_attr(CONFIG, resolved_config(recipe, params))
    return trial_config(recipe, self.source, params, output_dir=self.trials_dir, history=history)

  def _failed(self, trial: optuna.Trial, e: BaseException) -> None:
    from orchard_jax.study.storage import is_transient
    if isinstance(e, KeyboardInterrupt):
      trial.set_user_attr(INTERRUPTED, True)
    elif ERROR not in trial.user_attrs and not is_transient(e):
      trial.set_user_attr(ERROR, f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")

  def _timed(self, trial: optuna.Trial, history: History, seconds: float) -> None:
    training = self.recipe.training
    attrs = history.user_attrs(training.monitor_metric, training.monitor_direction,
                               self.recipe.study.config.epochs)
    attrs[SECONDS] = round(seconds, 3)
    for key, value in attrs.items():
      trial.set_user_attr(key, value)

  def __call__(self, trial: optuna.Trial) -> float:
    from orchard_jax.engine import run_trial
    history, started, interrupt = History(), time.monotonic(), self.interrupt
    try:
      if interrupt is not None:
        interrupt.in_trial = True
        if interrupt.immediate:  # a SIGTERM came while the trial was being created
          raise KeyboardInterrupt
      cfg = self._sampled(trial, history)
      with engine_outcomes_muted():
        return run_trial(trial, cfg)
    except optuna.TrialPruned:
      raise
    except BaseException as e:
      self._failed(trial, e)
      raise
    finally:
      if interrupt is not None:
        interrupt.in_trial = False
      self._timed(trial, history, time.monotonic() - started)

  def configure(self, trial: optuna.Trial) -> Any:
    """The trial's TrialConfig for a cohort (its epochs are the cohort's; no History hooks)."""
    if self.interrupt is not None and self.interrupt.immediate:
      raise KeyboardInterrupt
    return self._sampled(trial, None)

  def record(self, trial: optuna.Trial, outcome: Any) -> None:
    """What ``__call__`` stores of a trial, for one that ended in a cohort."""
    if outcome.error is not None and outcome.state.name == "FAIL":
      self._failed(trial, outcome.error)
    self._timed(trial, History.from_logs(outcome.history), outcome.seconds)


def _objective(recipe: Any, source: Any, space: Any, trials_dir: pathlib.Path,
               interrupt: GracefulInterrupt | None = None) -> _Objective:
  return _Objective(recipe, source, space, trials_dir, interrupt)


def run_study(recipe: Any, source: Any, run_dir: pathlib.Path, out: Any = None) -> int:
  """Runs (or resumes) the recipe's study and writes its outputs; returns the exit status.

  0: done with a best trial; 1: no trial completed; 3: short of ``n_trials``;
  130: stopped by Ctrl-C; 143: by SIGTERM.

  Raises:
    RecipeError: the storage cannot be opened, the study is of the other
      direction, or another ``run`` owns ``run_dir``.
  """
  from tqdm.auto import tqdm
  from tqdm.contrib.logging import logging_redirect_tqdm

  out = out or sys.stdout
  config, training = recipe.study.config, recipe.training
  space = build_space(recipe.study, source.input_shape, recipe.architecture.name)
  url = storage_url(config.storage, run_dir)
  # The first trial's programs compile while the study opens; every way out waits for them.
  with CompileAhead(recipe, source, space) as ahead:
    # validate's checks, traced only: every candidate model and boundary configuration builds
    # and gives (batch, num_classes) logits, or the run stops in one line before any trial.
    validate(recipe, source)
    # A storage that cannot be opened stops before any write.
    joined = join_study(recipe, url, Heartbeat(), "optuna.storage", join=False)
    study = joined.study
    with RunFolderLock(run_dir):
      stored = study.get_trials(deepcopy=False)
      if stored:
        _warn_if_changed(recipe, run_dir / "recipe.yaml")
        logger.info("Resuming study %r: %d/%d finished trials stored", config.study_name,
                    finished_count(stored), config.n_trials)
      trials_dir = run_dir / "trials"
      done = finished_count(stored)
      bar = tqdm(total=config.n_trials, initial=min(done, config.n_trials), desc=config.study_name,
                 unit="trial", disable=None if recipe.study.show_progress_bar else True,
                 dynamic_ncols=True)
      callbacks = [Progress(bar, training.monitor_metric, training.monitor_direction),
                   KeepBestCheckpoint(trials_dir, training.monitor_direction)]
      if ahead.started:
        import_ahead(recipe)  # overlaps the compile too
      ahead.wait()
      worker = new_worker(joined, recipe)
      handler = GracefulInterrupt(study)
      try:
        with handler, bar, logging_redirect_tqdm(loggers=[logging.getLogger("orchard_jax")]):
          if not handler.requested:
            objective = _objective(recipe, source, space, trials_dir, handler)
            _drive_jobs(joined, worker, objective, callbacks, handler, config.n_jobs)
      except KeyboardInterrupt:
        handler.requested = True
      if worker.ran == 0 and not handler.requested:
        logger.info("Nothing to run: the study has %d finished trials (optuna.n_trials=%d)%s",
                    finished_count(study.get_trials(deepcopy=False)), config.n_trials,
                    f"; {worker.stopped_by}" if worker.stopped_by else "")
      log_early_stop(worker)
      best = write_study_outputs(study, recipe, run_dir, out=out, recipe_ran=worker.ran > 0)
      return exit_status(study, recipe, best, worker, handler, out, resume_hint=url is not None)


class ThreadedLock(StudyLock):
  """A study lock taken after a lock shared by this process's threads (``optuna.n_jobs``); an
  in-memory study has only the latter."""

  def __init__(self, local: Any, inner: StudyLock):
    self.local, self.inner = local, inner

  def _acquire(self) -> None:
    self.local.acquire()
    try:
      self.inner.acquire()
    except BaseException:  # a database lock that failed is retried by this thread
      self.local.release()
      raise

  def confirm(self) -> None:
    self.inner.confirm()

  def _release(self) -> None:
    self.inner.release()
    self.local.release()


def _drive_jobs(joined: Any, worker: Any, objective: Any, callbacks: Any,
                interrupt: GracefulInterrupt, n_jobs: int) -> None:
  """Runs the study's loop in ``n_jobs`` threads (``optuna.n_jobs``), each taking trials
  under the study lock as any other process does."""
  if n_jobs <= 1:
    drive(joined, worker, objective, callbacks, interrupt, "run")
    return
  import concurrent.futures
  import threading
  others = [new_worker(joined, worker.recipe) for _ in range(n_jobs - 1)]
  local = threading.Lock()  # the threads of this process exclude one another first
  for w in (worker, *others):
    w.lock = ThreadedLock(local, w.lock)
  with concurrent.futures.ThreadPoolExecutor(n_jobs - 1) as pool:
    futures = [pool.submit(drive, joined, w, objective, callbacks, interrupt, f"run.{i + 1}")
               for i, w in enumerate(others)]
    try:
      drive(joined, worker, objective, callbacks, interrupt, "run.0")
    finally:
      for future in futures:
        future.result()
  worker.ran += sum(w.ran for w in others)
  worker.stopped_by = worker.stopped_by or next((w.stopped_by for w in others if w.stopped_by),
                                                None)
