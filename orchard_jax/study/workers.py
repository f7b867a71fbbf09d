"""``orchard-jax worker``: one more process running a study's trials, on any machine.

A worker joins the study in the recipe's storage (:func:`join_study`; a
database URL, or the journal file of ``run --workers``) and runs its trials
exactly as ``orchard-jax run`` and every other worker do
(:mod:`orchard_jax.study.ask_tell`): under the study lock it decides, counts the
budget and asks for the next trial (:mod:`orchard_jax.study.budget`), so any
mix of processes together runs exactly ``optuna.n_trials`` trials.

Signals: Ctrl-C as in :func:`~orchard_jax.study.runner.run_study`; SIGTERM
stops at once, storing the running trial as FAIL with ``interrupted`` (a
live process retries it). Exit status (:func:`~orchard_jax.study.ending.exit_status`):
0 when the study is done with a best trial, 1 without one, 3 when the study
ends short of ``n_trials`` (a failure streak, the timeout, dead workers), 130
after Ctrl-C, 143 after SIGTERM.
"""

from __future__ import annotations

import logging
import os
import pathlib
import socket
import sys
from typing import Any

from orchard_jax.study.budget import finished_count
from orchard_jax.study.study_callbacks import KeepBestCheckpoint, Progress
from orchard_jax.study.ask_tell import drive, new_budgets
from orchard_jax.study.ending import conclude
from orchard_jax.study.objective import Objective
from orchard_jax.study.opening import Joined, join_study
from orchard_jax.study.signals import GracefulInterrupt
from orchard_jax.study.space import build_space

logger = logging.getLogger(__name__)

__all__ = ["default_name", "join_study", "run_worker"]


def default_name() -> str:
  """A worker's name when none is given: ``host:pid``."""
  return f"{socket.gethostname()}:{os.getpid()}"


def run_worker(recipe: Any, source: Any, run_dir: pathlib.Path, joined: Joined, *,
               name: str | None = None, write_outputs: bool = True, out: Any = None) -> int:
  """Runs trials of the joined study until it is done (see the module docstring).

  Trial checkpoints go to ``run_dir/trials``. With ``write_outputs`` the
  study's outputs (as of this worker's end) are written to ``run_dir`` as
  :func:`~orchard_jax.study.runner.run_study` does; without, one summary
  line is printed. Returns the exit status.
  """
  import jax  # pylint: disable=import-outside-toplevel  # JAX: only once a recipe is read
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  out = out or sys.stdout
  name = name or default_name()
  space = build_space(recipe.study, source.input_shape, recipe.architecture.name)
  study = joined.study
  run_dir.mkdir(parents=True, exist_ok=True)
  trials_dir = run_dir / "trials"
  devices = jax.local_devices()
  logger.info("Worker %s joined study %r (%d %s device%s): %d/%d trials finished", name,
              recipe.study.config.study_name, len(devices), devices[0].platform,
              "s" if len(devices) > 1 else "", finished_count(study.get_trials(deepcopy=False)),
              recipe.study.config.n_trials)
  direction = recipe.training.monitor_direction
  callbacks = [Progress(tqdm(disable=True), recipe.training.monitor_metric, direction),
               KeepBestCheckpoint(trials_dir, direction)]
  interrupt = GracefulInterrupt(study)
  [budget] = new_budgets(joined, recipe)
  try:
    with interrupt:
      drive(joined, budget, Objective(recipe, source, space, trials_dir), callbacks, interrupt,
            name)
  except KeyboardInterrupt:
    interrupt.requested = True
  return conclude(study, recipe, run_dir, [budget], interrupt, out,
                  summary_of=None if write_outputs else name)
