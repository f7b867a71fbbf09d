"""Opening a recipe's study: its sampler, pruner and storage, created, loaded or joined.

* **Sampler**: ``tpe``/``cmaes``/``random``, seeded with ``training.seed``
  plus the number of trials stored when each trial is asked, so a resumed
  study does not replay the parameters it started with, and two processes
  never draw alike.
* **Pruner**: ``median`` and ``percentile`` (25th) with
  ``optuna.pruner_startup_trials`` unpruned trials (Optuna's default 5),
  ``hyperband`` and ``successive_halving`` with Optuna's defaults,
  ``same_epoch`` (:class:`~orchard_jax.engine.pruning.SameEpochPruner`, judging
  once ``pruner_startup_trials`` other trials reached the epoch); ``NopPruner``
  without pruning. Unset, it is ``median`` one by one and ``successive_halving``
  for cohorts (``OptunaConfig.pruner``). The engine asks the pruner from
  ``pruning_warmup_epochs`` on.
* **Storage**: opened by :func:`~orchard_jax.study.storage.open_storage`; a
  database that cannot be opened stops the run before anything is written.
  A database server gets Optuna's heartbeat, a file storage the liveness
  locks of :mod:`orchard_jax.study.liveness` (:class:`Joined`).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, NamedTuple

import optuna
import yaml

from orchard_jax.engine.pruning import SameEpochPruner
from orchard_jax.errors import StorageFault
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.outputs import name_metric
from orchard_jax.study.storage import (Heartbeat, JOURNAL, disk_fault, is_disk_fault,
                                       is_transient, journal_path, masked, open_storage)
from orchard_jax.study.storing import store

logger = logging.getLogger(__name__)

__all__ = ["Joined", "build_pruner", "build_sampler", "join_study", "liveness_folder",
           "open_study", "warn_if_changed"]


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
  """The study's pruner, ``config.pruner`` (see the module docstring)."""
  kind = config.pruner
  if kind == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
  if kind == "percentile":
    return optuna.pruners.PercentilePruner(25.0, n_startup_trials=startup_trials)
  if kind == "hyperband":
    return optuna.pruners.HyperbandPruner()
  if kind == "successive_halving":
    return optuna.pruners.SuccessiveHalvingPruner()
  if kind == "same_epoch":
    return SameEpochPruner(max(startup_trials, 1))
  return optuna.pruners.NopPruner()


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


def warn_if_changed(recipe: Any, previous: pathlib.Path) -> None:
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
               where: str = "--storage", *, join: bool = True, patient: bool = False) -> Joined:
  """Opens ``url`` and joins (or creates) the recipe's study.

  A database server gets Optuna's ``heartbeat``; a file storage gets
  liveness locks instead (no writes, no grace period). ``join=False``
  (``orchard-jax run``) honours ``optuna.load_if_exists``. ``patient``
  (a worker that ``run --workers`` started, on a study it has just opened):
  a storage that fails as a restarting server does (:func:`is_transient`)
  is tried again for the storage patience, as every later call is
  (:func:`~orchard_jax.study.storing.store`).

  Raises:
    RecipeError: the storage cannot be opened (unreachable, credentials
      refused, no driver), or its study has the other direction; nothing is
      written then.
    StorageFault: ``patient``, and the storage still failed after the patience.
  """
  folder = liveness_folder(url)

  def attempt() -> Joined:
    try:
      storage = open_storage(url, heartbeat if folder is None else None, where=where)
      study = open_study(recipe, url, storage, join=join, where=where)
    except RecipeError as e:  # its one line hides the driver's error, still its context
      if patient and e.__context__ is not None and is_transient(e.__context__):
        raise StorageFault(str(e)) from e.__context__
      raise
    return Joined(url, storage, study,
                  heartbeat is not None and folder is None and url is not None, folder)

  return store(attempt, "the worker's join of the study") if patient else attempt()
