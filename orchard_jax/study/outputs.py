"""What a study leaves in its run folder, written together, and its closing summary.

=======================  ===================================================
``study.db``             the Optuna storage (with the default ``storage: sqlite``)
``trials.csv``           one row per trial: number, state, value, best epoch,
                         epochs, seconds, start/end, every parameter, error
``best_config.yaml``     a recipe without ``optuna:``: retrains the best
                         trial for ``training.epochs`` (``orchard-jax run``)
``best_model/``          the best trial's best-epoch checkpoint (orbax,
                         ``checkpoint/``) with ``best.json``, ``trial.json`` and
                         ``model.json`` (what ``orchard_jax.load_model`` rebuilds
                         the model from)
``plots/*.png``          optimization history, intermediate values, parameter
                         importances (>= 2 complete trials), best trial's curves
``recipe.yaml``          the validated recipe the study ran with
=======================  ===================================================

The same outputs, but ``recipe.yaml``, come from any Optuna study whose
objective calls :func:`~orchard_jax.engine.run_trial`: :func:`write_outputs`
once, or :class:`StudyOutputs` as a study callback. Instead of
``best_config.yaml`` it writes ``best_trial.yaml``, which describes the best
trial (value, parameters and, when :func:`~orchard_jax.engine.run_trial`
recorded it, what its ``TrialConfig`` held): not a recipe, since the model and
the objective are the user's own (``orchard-jax run`` on it says so; such a
file written before was called ``best_config.yaml``).

This module writes them: :func:`write_study_outputs` for a recipe's study,
:func:`write_outputs` for any study. What they are made of comes from
:mod:`~orchard_jax.study.tables` (the trials read back, ``trials.csv``, the
table), :mod:`~orchard_jax.study.best_files` (the best trial's files) and
:mod:`~orchard_jax.study.plots`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.fileio import atomic_write_text
from orchard_jax.records import TRIAL_CONFIG
from orchard_jax.study.best_files import (best_config_text, described_text, export_best_model,
                                         remove_other_checkpoints)
from orchard_jax.study.plots import save_study_plots
from orchard_jax.study.tables import best_trial, format_table, write_trials_csv

logger = logging.getLogger(__name__)

__all__ = ["BEST_TRIAL_FILE", "RETRAIN_FILE", "import_ahead", "metric_name", "name_metric",
           "write_outputs", "write_study_outputs"]

RETRAIN_FILE = "best_config.yaml"   # a recipe's study: the best trial as a recipe to retrain
BEST_TRIAL_FILE = "best_trial.yaml"  # a study of one's own objective: the best trial described


def import_ahead(recipe: Any) -> None:
  """Imports the modules a study's trials and outputs will use, ahead of time.

  A study calls this while its first trial's programs compile on a thread
  (:mod:`orchard_jax.study.ahead`). These imports (orbax for the best
  states; matplotlib, optuna's plots and scikit-learn's forests for
  fANOVA's parameter importances) take about 2 s on 2 CPU cores; here they
  overlap the compile instead of adding to the study's wall time. With a
  warm cache the programs are loaded before this is called, and the imports
  take the same time here as they would when the plots are drawn; a thread
  importing them while the trials run made a warm study of MLP cohorts
  slower on 2 cores (it holds the GIL the trials' host work needs;
  docs/performance.md, "Imports and outputs"). Without ``save_plots`` none
  of the plotting modules is imported, here or later.
  """
  import orbax.checkpoint  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  if recipe.study.save_plots:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    # pylint: disable=import-outside-toplevel,unused-import
    import optuna.importance  # noqa: F401
    import sklearn.ensemble  # noqa: F401
    from matplotlib import pyplot  # noqa: F401
    from optuna.visualization import matplotlib as _vis  # noqa: F401


def _written(what: str, write: Any, failed: list[str]) -> Any:
  """``write()``; an OSError is logged and listed in ``failed`` (the study in storage is
  the truth, and the same command writes the outputs again)."""
  try:
    return write()
  except OSError as e:
    logger.warning("Could not write %s: %s", what, " ".join(str(e).split())[:300])
    failed.append(what)
    return None


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a study's outputs are made of: a recipe's study, or one's own objective's."""
  metric: str
  direction: str
  checkpoints: Callable[[FrozenTrial], pathlib.Path | None]  # the folder of trial_<n>/
  best_config: Callable[[FrozenTrial, pathlib.Path], str] | None  # the best trial's file's text
  plots: bool = True
  best_name: str = RETRAIN_FILE    # that file: a recipe, or a Python study's BEST_TRIAL_FILE
  recipe_text: str | None = None   # recipe.yaml's text; None: not written
  retrain: bool = False            # best_config.yaml is a recipe: say how to retrain
  prune: bool = False              # delete the checkpoints of finished trials but the best's


def _write(study: Any, run_dir: pathlib.Path, plan: _Plan, out: Any) -> FrozenTrial | None:
  """Writes the outputs ``plan`` lists, then (``out`` not None) prints the summary and table;
  returns the best trial. A write that fails (a full disk) is logged and named in the
  summary; it never touches the stored trials."""
  trials = study.get_trials(deepcopy=False)
  best = best_trial(trials, plan.direction)
  failed: list[str] = []
  written = [_written("trials.csv", lambda: write_trials_csv(trials, run_dir / "trials.csv"),
                      failed)]
  if plan.recipe_text is not None:
    written.append(_written("recipe.yaml", lambda: atomic_write_text(
        run_dir / "recipe.yaml", plan.recipe_text), failed))
  if best is not None:
    if plan.best_config is not None:
      path = run_dir / plan.best_name
      written.append(_written(plan.best_name, lambda: atomic_write_text(
          path, plan.best_config(best, path)), failed))
    checkpoints = plan.checkpoints(best)
    if checkpoints is not None:
      written.append(_written("best_model/", lambda: export_best_model(run_dir, best, checkpoints),
                              failed))
  if plan.prune and "best_model/" not in failed:
    remove_other_checkpoints(trials, best, plan.checkpoints)
  if plan.plots:
    written += _written("plots/", lambda: save_study_plots(study, run_dir / "plots", plan.metric,
                                                           best), failed) or []
  if out is not None:
    _print_summary(study, trials, best, plan, run_dir, [p for p in written if p], failed, out)
  return best


def _print_summary(study: Any, trials: Sequence[FrozenTrial], best: FrozenTrial | None,
                   plan: _Plan, run_dir: pathlib.Path, written: Sequence[pathlib.Path],
                   failed: Sequence[str], out: Any) -> None:
  counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                           TrialState.FAIL)}
  print(f"\nStudy {study.study_name!r}: {len(trials)} trials, "
        f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed", file=out)
  if best is None:
    print("No trial completed: no best configuration.", file=out)
  else:
    print(f"Best trials ({plan.metric}, {plan.direction}):", file=out)
    print(format_table(trials, plan.metric, plan.direction), file=out)
    print(f"\nBest validation {plan.metric}: {best.value:.4f} (trial {best.number})", file=out)
  print(f"Outputs in {run_dir}: " + ", ".join(
      os.path.relpath(p, run_dir) for p in written), file=out)
  if failed:
    print(f"Not written (see the log): {', '.join(failed)}; the trials are stored, and the same "
          f"command writes them again.", file=out)
  if best is not None and plan.retrain and "best_config.yaml" not in failed:
    print(f"Retrain the best trial: orchard-jax run {run_dir / 'best_config.yaml'}", file=out)


def write_study_outputs(study: Any, recipe: Any, run_dir: pathlib.Path, out: Any, *,
                        recipe_ran: bool = True) -> FrozenTrial | None:
  """Writes every output of a recipe's study, prints the summary and table; returns the best
  trial.

  Each file appears whole or not at all. ``recipe.yaml`` is rewritten only when
  ``recipe_ran`` (trials ran with this recipe); ``best_config.yaml`` comes from
  the best trial's own stored configuration. A write that fails (a full disk)
  is logged and named in the summary; it never touches the stored trials.
  """
  training, spec = recipe.training, recipe.study
  rewrite = recipe_ran or not (run_dir / "recipe.yaml").exists()
  plan = _Plan(
      metric=training.monitor_metric, direction=training.monitor_direction,
      checkpoints=lambda _: run_dir / "trials",
      best_config=(lambda t, path: best_config_text(recipe, t, path)) if spec.save_best_config
      else None,
      plots=spec.save_plots, retrain=spec.save_best_config,
      recipe_text=yaml.safe_dump(recipe.to_dict(), sort_keys=False) if rewrite else None)
  return _write(study, run_dir, plan, sys.stdout if out is None else out)


def metric_name(study: Any) -> str | None:
  """The study's metric name (``study.set_metric_names``), or None."""
  names = getattr(study, "metric_names", None)
  return names[0] if names else None


def name_metric(study: Any, metric: str) -> None:
  """Names the study's objective ``metric`` (optuna-dashboard shows it instead of "Objective
  0"), unless it has a name; a storage that refuses is logged, never raised."""
  if metric_name(study) is not None:
    return
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # set_metric_names is experimental
      study.set_metric_names([metric])
  except Exception as e:  # pylint: disable=broad-except  # a name is not worth a study
    logger.warning("Could not name the study's metric %r: %s: %s", metric, type(e).__name__,
                   " ".join(str(e).split())[:300])


def _recorded(trial: FrozenTrial | None, *keys: str) -> Any:
  """``trial.user_attrs["trial_config"][keys...]``, or None."""
  value = None if trial is None else trial.user_attrs.get(TRIAL_CONFIG)
  for key in keys:
    value = value.get(key) if isinstance(value, dict) else None
  return value


def write_outputs(study: Any, run_dir: str | os.PathLike, *, metric: str | None = None,
                  direction: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
                  plots: bool = True, keep_checkpoints: bool = False,
                  out: Any = None) -> FrozenTrial | None:
  """Writes a study's outputs to ``run_dir``, for any Optuna study whose objective calls
  :func:`~orchard_jax.engine.run_trial`; returns the best trial (None: none completed).

  ``run_dir`` gets ``trials.csv``, ``plots/`` (with ``plots``), and for the
  best trial ``best_trial.yaml`` (its value, parameters and recorded
  ``trial_config``, which :func:`~orchard_jax.engine.run_trial` records) and ``best_model/``: a
  copy of ``checkpoint_dir/trial_<n>``, the folder ``run_trial`` writes the
  best epoch's state to under ``TrialConfig.output_dir``. ``checkpoint_dir``
  defaults to the ``output_dir`` the best trial recorded; without either,
  ``best_model/`` is not written. Each file appears whole or not at all.
  ``best_model/`` also gets ``model.json``, from which
  :func:`orchard_jax.load_model` rebuilds the model (or takes it, for a model
  of one's own code).

  The command line's checkpoint policy holds here too: the checkpoints of
  the finished trials other than the best (``trial_<n>/`` where each trial
  wrote it) are deleted, unless ``keep_checkpoints``; a running trial's is
  kept.

  Args:
    study: A single-objective study.
    metric: The objective's name in the plots and table; default the study's
      metric name, else the recorded ``training.monitor_metric``, else
      ``"value"``. A study without a metric name gets this one.
    direction: Must agree with the study's (default: the study's).
    out: Where to print the summary and table of best trials (e.g.
      ``sys.stdout``); None prints nothing.

  Raises:
    ValueError: a multi-objective study, or ``direction`` is not the study's.
  """
  if len(study.directions) != 1:
    raise ValueError(f"write_outputs needs a single-objective study; {study.study_name!r} has "
                     f"{len(study.directions)} objectives")
  own = study.direction.name.lower()
  if direction is not None and direction != own:
    raise ValueError(f"direction {direction!r} is not the study's ({own!r})")
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  trials = study.get_trials(deepcopy=False)
  recorded = best_trial(trials, own) or next(
      (t for t in reversed(trials) if TRIAL_CONFIG in t.user_attrs), None)
  metric = metric or metric_name(study) or _recorded(recorded, "training", "monitor_metric")
  if metric:
    name_metric(study, metric)
  metric = metric or "value"

  def checkpoints(trial: FrozenTrial) -> pathlib.Path | None:
    folder = checkpoint_dir if checkpoint_dir is not None else _recorded(trial, "output_dir")
    return None if folder is None else pathlib.Path(folder)

  plan = _Plan(metric=metric, direction=own, checkpoints=checkpoints,
               best_config=lambda t, _: described_text(study, t, metric), plots=plots,
               best_name=BEST_TRIAL_FILE, prune=not keep_checkpoints)
  return _write(study, run_dir, plan, out)
