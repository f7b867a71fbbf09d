"""``orchard-jax run``: runs (or resumes) a recipe's study and writes its outputs.

* **Opening**: the sampler, pruner and storage of
  :mod:`orchard_jax.study.opening`, opened after validate's checks while the
  first trial's programs compile (:mod:`orchard_jax.study.ahead`).
* **Storage**: ``'sqlite'`` is ``<run folder>/study.db`` (or the folder's
  ``study.journal``); ``'memory'`` keeps nothing; any other value is a
  storage URL (see :mod:`orchard_jax.study.storage`). A database that cannot
  be opened stops the run before anything is written.
* **One mechanism**: ``run`` takes its trials exactly as every worker does
  (:mod:`orchard_jax.study.ask_tell`, in ``optuna.n_jobs`` threads): under the
  study lock, counting the budget (:mod:`orchard_jax.study.budget`), failing
  the trials of dead processes and retrying their parameters. ``n_trials``
  is the study's total, so the same command continues an interrupted or
  crashed study. A second ``run`` on a run folder
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
  kept (see :mod:`orchard_jax.study.study_callbacks`), unless ``--keep-checkpoints``.
* **Exit status** (:mod:`orchard_jax.study.ending`): 0 done with a best
  trial; 1 no trial completed; 3 the study ended short of ``n_trials`` (said
  on stdout); 130/143 after a signal.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from typing import Any

from orchard_jax.study.ahead import CompileAhead
from orchard_jax.study.budget import finished_count
from orchard_jax.study.study_callbacks import KeepBestCheckpoint, Progress
from orchard_jax.study.ask_tell import drive_threads, new_budgets
from orchard_jax.study.ending import conclude, nothing_to_run, ran_and_stopped_by
from orchard_jax.study.liveness import RunFolderLock
from orchard_jax.study.objective import Objective
from orchard_jax.study.opening import join_study, warn_if_changed
from orchard_jax.study.outputs import import_ahead
from orchard_jax.study.signals import GracefulInterrupt
from orchard_jax.study.space import build_space
from orchard_jax.study.storage import Heartbeat, storage_url
from orchard_jax.study.validate import validate

logger = logging.getLogger(__name__)

__all__ = ["run_study", "storage_url"]


def run_study(recipe: Any, source: Any, run_dir: pathlib.Path, out: Any = None, *,
              keep_checkpoints: bool = False) -> int:
  """Runs (or resumes) the recipe's study and writes its outputs; returns the exit status.

  0: done with a best trial; 1: no trial completed; 3: short of ``n_trials``;
  130: stopped by Ctrl-C; 143: by SIGTERM. ``keep_checkpoints``: keep every finished trial's
  checkpoint in ``run_dir/trials`` (default: the best trial's and the running trials' only).

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
        warn_if_changed(recipe, run_dir / "recipe.yaml")
        logger.info("Resuming study %r: %d/%d finished trials stored", config.study_name,
                    finished_count(stored), config.n_trials)
      trials_dir = run_dir / "trials"
      done = finished_count(stored)
      bar = tqdm(total=config.n_trials, initial=min(done, config.n_trials), desc=config.study_name,
                 unit="trial", disable=None if recipe.study.show_progress_bar else True,
                 dynamic_ncols=True)
      callbacks = [Progress(bar, training.monitor_metric, training.monitor_direction)]
      if not keep_checkpoints:
        callbacks.append(KeepBestCheckpoint(trials_dir, training.monitor_direction))
      if ahead.started:
        import_ahead(recipe)  # overlaps the compile too
      ahead.wait()
      budgets = new_budgets(joined, recipe, config.n_jobs)
      handler = GracefulInterrupt(study)
      try:
        with handler, bar, logging_redirect_tqdm(loggers=[logging.getLogger("orchard_jax")]):
          if not handler.requested:
            objective = Objective(recipe, source, space, trials_dir)
            drive_threads(joined, budgets, objective, callbacks, handler)
      except KeyboardInterrupt:
        handler.requested = True
      ran, stopped_by = ran_and_stopped_by(budgets)
      if ran == 0 and not handler.requested:
        nothing_to_run(study.get_trials(deepcopy=False), config.n_trials, stopped_by)
      return conclude(study, recipe, run_dir, budgets, handler, out, resume_hint=url is not None)
