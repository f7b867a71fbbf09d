"""How a process that ran a study's trials ends: what it says, and its exit status.

``orchard-jax run``, ``worker`` and the ``run --workers`` launcher end
alike: a study with nothing left to run says so in one line
(:func:`nothing_to_run`); a study that early stopping stopped says so once
more; the outputs are written (or a worker's one summary line printed); and
the exit status (:func:`exit_status`) is 0 when the study is done with a best
trial, 1 without one, 3 (:data:`EXIT_SHORT`) when it ends short of
``optuna.n_trials`` (a failure streak, the timeout, dead workers), and 128 +
the signal after Ctrl-C (130) or SIGTERM (143), each short end explained in
one line on stdout.
"""

from __future__ import annotations

import logging
import pathlib
import signal
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from orchard_jax.study.budget import Budget, early_stop_line, finished_count
from orchard_jax.study.outputs import write_study_outputs
from orchard_jax.study.signals import GracefulInterrupt
from orchard_jax.study.tables import best_trial

logger = logging.getLogger(__name__)

__all__ = ["EXIT_SHORT", "conclude", "exit_status", "nothing_to_run", "ran_and_stopped_by"]

EXIT_SHORT = 3


def ran_and_stopped_by(budgets: Sequence[Budget]) -> tuple[int, str | None]:
  """The trials a process's budgets (one per thread) ran, and what stopped the first that
  says."""
  return (sum(budget.ran for budget in budgets),
          next((budget.stopped_by for budget in budgets if budget.stopped_by), None))


def nothing_to_run(trials: Sequence[FrozenTrial], n_trials: int,
                   stopped_by: str | None = None) -> None:
  """Logs the line of a study that had no trial left to run."""
  logger.info("Nothing to run: the study has %d finished trials (optuna.n_trials=%d)%s",
              finished_count(trials), n_trials, f"; {stopped_by}" if stopped_by else "")


def exit_status(trials: Sequence[FrozenTrial], recipe: Any, best: FrozenTrial | None, out: Any, *,
                signum: int | None = None, why: str, resume_hint: bool = True) -> int:
  """The exit status of a process that ran trials of a study, saying why when short.

  0: done with a best trial (a study stopped by early stopping says so); 1: no
  trial completed; 3: short of ``n_trials`` (:data:`EXIT_SHORT`; ``why`` says
  what stopped it, e.g. ``stopped by optuna.timeout (60 s)``); 128 + ``signum``
  after Ctrl-C or SIGTERM.
  """
  n_trials, finished = recipe.study.config.n_trials, finished_count(trials)
  then = "run the same command to continue" if resume_hint else "the study cannot be resumed"
  if signum is not None:
    cause = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    print(f"\nStopped by {cause} after {finished}/{n_trials} trials; {then}.", file=out)
    return 128 + signum
  early = early_stop_line(recipe, trials)
  if early is not None:  # done: stopped early on purpose
    print(f"\n{early}.", file=out)
  elif finished < n_trials:
    print(f"\nThe study is short of optuna.n_trials: {finished}/{n_trials} trials "
          f"finished ({why}); {then}.", file=out)
    return EXIT_SHORT
  return 0 if best is not None else 1


def _summary(study: optuna.Study, recipe: Any, name: str, ran: int, out: Any) -> FrozenTrial | None:
  """Prints a worker's one line (what it ran, the study's count and best); returns the best."""
  trials = study.get_trials(deepcopy=False)
  best = best_trial(trials, recipe.training.monitor_direction)
  shown = "none" if best is None else f"{best.value:.4f} (trial {best.number})"
  print(f"Worker {name}: ran {ran} trial(s); study {recipe.study.config.study_name!r} has "
        f"{finished_count(trials)}/{recipe.study.config.n_trials} finished; best "
        f"{recipe.training.monitor_metric} {shown}", file=out)
  return best


def conclude(study: optuna.Study, recipe: Any, run_dir: pathlib.Path, budgets: Sequence[Budget],
             interrupt: GracefulInterrupt, out: Any, *, resume_hint: bool = True,
             summary_of: str | None = None) -> int:
  """Ends a process that ran trials of ``study`` with ``budgets`` (one per thread): logs the
  line of a study that early stopping stopped, writes the study's outputs to ``run_dir`` (or,
  given a worker's name in ``summary_of``, prints its summary line instead) and returns the
  exit status."""
  ran, stopped_by = ran_and_stopped_by(budgets)
  if stopped_by == "early stopping":  # once per process, after its loop
    line = early_stop_line(recipe, study.get_trials(deepcopy=False))
    if line is not None:
      logger.info("%s", line)
  best = (write_study_outputs(study, recipe, run_dir, out=out, recipe_ran=ran > 0)
          if summary_of is None else _summary(study, recipe, summary_of, ran, out))
  signum = (interrupt.signum or signal.SIGINT) if interrupt.requested else None
  return exit_status(study.get_trials(deepcopy=False), recipe, best, out, signum=signum,
                     why=f"stopped by {stopped_by or 'trials were lost'}", resume_hint=resume_hint)
