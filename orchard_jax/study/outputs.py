"""What a study leaves in its run folder, and the final table of best trials.

=======================  ===================================================
``study.db``             the Optuna storage (with the default ``storage: sqlite``)
``trials.csv``           one row per trial: number, state, value, epochs,
                         seconds, start/end, every parameter, error
``best_config.yaml``     a recipe without ``optuna:``: retrains the best
                         trial for ``training.epochs`` (``orchard-jax run``)
``best_model/``          the best trial's best-epoch checkpoint (orbax,
                         ``checkpoint/``) with ``best.json`` and ``trial.json``
``plots/*.png``          optimization history, intermediate values, parameter
                         importances (>= 2 complete trials), best trial's curves
``recipe.yaml``          the validated recipe the study ran with
=======================  ===================================================
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.fileio import atomic_directory, atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

# Trial user attributes written by the runner.
HISTORY, ERROR, INTERRUPTED, RETRY_OF = "history", "error", "interrupted", "retry_of"
CONFIG = "config"                      # the resolved recipe the trial trained with
STORAGE_FAULT = "storage_fault"        # the storage's error that stopped the trial (retried)
LOST = "lost"                          # the process running the trial died (retried)
CHECKPOINT_ERROR = "checkpoint_error"  # why the trial's best state could not be written
TOP_K = 5


def best_trial(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
  """The complete trial with the best finite value (lowest number on ties); None if none."""
  done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
          and math.isfinite(t.value)]
  if not done:
    return None
  sign = -1.0 if direction == "maximize" else 1.0
  return min(done, key=lambda t: (sign * t.value, t.number))


def ranked(trials: Sequence[FrozenTrial], direction: str) -> list[FrozenTrial]:
  done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
          and math.isfinite(t.value)]
  sign = -1.0 if direction == "maximize" else 1.0
  return sorted(done, key=lambda t: (sign * t.value, t.number))


def _seconds(trial: FrozenTrial) -> float | None:
  return trial.duration.total_seconds() if trial.duration is not None else None


def _value(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(trials: Sequence[FrozenTrial], metric: str, direction: str, k: int = TOP_K) -> str:
  """The best ``k`` complete trials as a fixed-width text table."""
  rows = ranked(trials, direction)[:k]
  header = f"{'rank':>4}  {'trial':>5}  {metric:>10}  {'epochs':>6}  {'seconds':>7}  params"
  lines = [header]
  for rank, t in enumerate(rows, 1):
    seconds = _seconds(t)
    params = "  ".join(f"{name}={_value(v)}" for name, v in t.params.items())
    lines.append(f"{rank:>4}  {t.number:>5}  {t.value:>10.4f}  {t.last_step or 0:>6}  "
                 f"{'-' if seconds is None else f'{seconds:.1f}':>7}  {params}")
  return "\n".join(lines)


def retry_source(trial: FrozenTrial) -> int | None:
  """The trial ``trial`` retries: ``retry_of`` (interrupted, lost or storage-faulted trials)
  or Optuna's heartbeat retry (system attribute ``failed_trial``); None for a new one."""
  number = trial.user_attrs.get(RETRY_OF)
  return trial.system_attrs.get("failed_trial") if number is None else number


def trial_error(trial: FrozenTrial) -> str:
  """Why a trial did not finish: its error, ``interrupted``, ``lost: ...``, ``storage: ...``."""
  if trial.user_attrs.get(ERROR):
    return trial.user_attrs[ERROR]
  if trial.user_attrs.get(INTERRUPTED):
    return "interrupted"
  if trial.user_attrs.get(LOST):
    return f"lost: {trial.user_attrs[LOST]}"
  if trial.user_attrs.get(STORAGE_FAULT):
    return f"storage: {trial.user_attrs[STORAGE_FAULT]}"
  return ""


def write_trials_csv(trials: Sequence[FrozenTrial], path: pathlib.Path) -> pathlib.Path:
  names = sorted({name for t in trials for name in t.params})
  columns = ["number", "state", "value", "epochs", "seconds", "datetime_start",
             "datetime_complete", *(f"params_{n}" for n in names), "retry_of", "error",
             "checkpoint_error"]
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(columns)
  for t in sorted(trials, key=lambda t: t.number):
    retry = retry_source(t)
    writer.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                     t.last_step or 0, _seconds(t) or "", t.datetime_start or "",
                     t.datetime_complete or "", *(t.params.get(n, "") for n in names),
                     "" if retry is None else retry, trial_error(t),
                     t.user_attrs.get(CHECKPOINT_ERROR, "")])
  atomic_write_text(path, buffer.getvalue())
  return path


def resolved_config(recipe: Any, params: dict[str, Any]) -> dict[str, Any]:
  """The recipe a trial with ``params`` trains: data paths absolute, the trial's architecture
  and training values; no ``optuna`` or ``telemetry`` section. Stored with each trial
  (user attribute ``config``) as it starts."""
  from orchard_jax.study.build import architecture_for
  from orchard_jax.study.space import apply_params

  dataset = recipe.dataset
  if dataset.path is not None:
    dataset = dataclasses.replace(dataset, path=os.path.abspath(os.path.expanduser(dataset.path)))
  if dataset.function is not None:
    target, _, attr = dataset.function.rpartition(":")
    if target.endswith(".py") or "/" in target:
      dataset = dataclasses.replace(dataset, function=f"{os.path.abspath(target)}:{attr}")
  trial = dataclasses.replace(recipe, dataset=dataset, study=None,
                              architecture=architecture_for(recipe, params),
                              training=apply_params(recipe.training, params))
  data = trial.to_dict()
  data.pop("telemetry", None)
  return yaml.safe_load(yaml.safe_dump(data))  # plain, JSON-ready values


def best_config_dict(recipe: Any, trial: FrozenTrial, run_dir: pathlib.Path) -> dict[str, Any]:
  """The recipe that retrains ``trial``: the configuration stored with it (parameters,
  data, architecture, ``training.epochs``), no optuna; the run's telemetry, writing to
  ``run_dir/retrain``."""
  config = trial.user_attrs.get(CONFIG)
  if config is None:  # a trial stored before configurations were
    logger.warning("Trial %d has no stored configuration; best_config.yaml is rebuilt from the "
                   "current recipe and the trial's parameters", trial.number)
    config = resolved_config(recipe, trial.params)
  telemetry = dataclasses.replace(recipe.telemetry, output_dir=str((run_dir / "retrain").absolute()))
  return {**config, "telemetry": dataclasses.asdict(telemetry)}


def write_best_config(recipe: Any, trial: FrozenTrial, run_dir: pathlib.Path) -> pathlib.Path:
  path = run_dir / "best_config.yaml"
  metric = recipe.training.monitor_metric
  header = (f"# Best trial {trial.number} of study {recipe.study.config.study_name!r}: "
            f"{metric} = {trial.value:.6f} after {recipe.study.config.epochs} trial epochs.\n"
            f"# A recipe without an optuna section: one training run of training.epochs epochs\n"
            f"# with the best trial's hyperparameters, reporting validation and test metrics:\n"
            f"#   orchard-jax run {path}\n")
  body = yaml.safe_dump(best_config_dict(recipe, trial, run_dir), sort_keys=False)
  atomic_write_text(path, header + body)
  return path


def export_best_model(run_dir: pathlib.Path, trial: FrozenTrial) -> pathlib.Path | None:
  """Copies ``trials/trial_<n>`` to ``best_model/`` (whole or not at all); None if the trial's
  checkpoint was not written."""
  source, dest = run_dir / "trials" / f"trial_{trial.number}", run_dir / "best_model"
  if not (source / "checkpoint").is_dir():
    if not (dest / "trial.json").is_file() or json.loads(
        (dest / "trial.json").read_text()).get("number") != trial.number:
      logger.warning("No checkpoint of trial %d in %s; best_model/ not written", trial.number, source)
      return None
    return dest
  with atomic_directory(dest) as folder:
    shutil.copytree(source, folder, dirs_exist_ok=True)
    (folder / "trial.json").write_text(json.dumps(
        {"number": trial.number, "value": trial.value, "params": trial.params}, indent=2) + "\n")
  return dest


def _save_figure(fig: Any, path: pathlib.Path, **kwargs: Any) -> None:
  """``fig.savefig`` as a PNG that appears whole or not at all."""
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=110, **kwargs)
  atomic_write_bytes(path, image.getvalue())


def plot_history(epochs: Sequence[dict[str, float]], path: pathlib.Path, metric: str,
                 title: str) -> pathlib.Path | None:
  """Training loss, validation loss and the monitored metric per epoch (PNG)."""
  if not epochs:
    return None
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  x = [e["epoch"] for e in epochs]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  left.plot(x, [e["train_loss"] for e in epochs], marker="o", label="train loss")
  left.plot(x, [e.get("val_loss", math.nan) for e in epochs], marker="o", label="val loss")
  for name in dict.fromkeys((metric, "accuracy")):
    right.plot(x, [e.get(f"val_{name}", math.nan) for e in epochs], marker="o", label=f"val {name}")
  for ax, label in ((left, "loss"), (right, "metric")):
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)
  return path


def import_ahead(recipe: Any) -> None:
  """Imports the modules a study's trials and outputs will use, ahead of time.

  A study calls this while its first trial's programs compile on a thread
  (:mod:`orchard_jax.study.ahead`). These imports (orbax for the best
  states; matplotlib, optuna's plots and scikit-learn's forests for
  fANOVA's parameter importances) take about 2 s on 2 CPU cores; here they
  overlap the compile instead of adding to the study's wall time.
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


def save_study_plots(study: Any, plots_dir: pathlib.Path, metric: str,
                     best: FrozenTrial | None) -> list[pathlib.Path]:
  """The optuna.visualization.matplotlib plots (Agg backend) and the best trial's curves."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  from optuna.visualization import matplotlib as vis

  plots_dir.mkdir(parents=True, exist_ok=True)
  trials = study.get_trials(deepcopy=False)
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  plots = {"optimization_history": (lambda: vis.plot_optimization_history(study, target_name=metric),
                                    bool(complete)),
           "intermediate_values": (lambda: vis.plot_intermediate_values(study),
                                   any(t.intermediate_values for t in trials)),
           "param_importances": (lambda: vis.plot_param_importances(study, target_name=metric),
                                 len(complete) >= 2)}
  written = []
  for name, (plot, possible) in plots.items():
    if not possible:
      logger.info("Plot %s skipped (not enough trials)", name)
      continue
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = plot()
      fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
      _save_figure(fig, plots_dir / f"{name}.png", bbox_inches="tight")
      plt.close(fig)
      written.append(plots_dir / f"{name}.png")
    except Exception as e:  # a plot must never cost the study's other outputs
      logger.warning("Plot %s skipped: %s: %s", name, type(e).__name__, e)
      plt.close("all")
  if best is not None:
    path = plot_history(best.user_attrs.get(HISTORY) or [], plots_dir / "best_trial_curves.png",
                        metric, f"trial {best.number} (best)")
    written += [path] if path else []
  return written


def _written(what: str, write: Any, failed: list[str]) -> Any:
  """``write()``; an OSError is logged and listed in ``failed`` (the study in storage is
  the truth, and the same command writes the outputs again)."""
  try:
    return write()
  except OSError as e:
    logger.warning("Could not write %s: %s", what, " ".join(str(e).split())[:300])
    failed.append(what)
    return None


def write_study_outputs(study: Any, recipe: Any, run_dir: pathlib.Path, out: Any, *,
                        recipe_ran: bool = True) -> FrozenTrial | None:
  """Writes every output of the study, prints the summary and table; returns the best trial.

  Each file appears whole or not at all. ``recipe.yaml`` is rewritten only when
  ``recipe_ran`` (trials ran with this recipe); ``best_config.yaml`` comes from
  the best trial's own stored configuration. A write that fails (a full disk)
  is logged and named in the summary; it never touches the stored trials.
  """
  training, spec = recipe.training, recipe.study
  trials = study.get_trials(deepcopy=False)
  best = best_trial(trials, training.monitor_direction)
  failed: list[str] = []
  written = [_written("trials.csv", lambda: write_trials_csv(trials, run_dir / "trials.csv"),
                      failed)]
  if recipe_ran or not (run_dir / "recipe.yaml").exists():
    written.append(_written("recipe.yaml", lambda: atomic_write_text(
        run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False)), failed))
  if best is not None:
    if spec.save_best_config:
      written.append(_written("best_config.yaml", lambda: write_best_config(recipe, best, run_dir),
                              failed))
    written.append(_written("best_model/", lambda: export_best_model(run_dir, best), failed))
  if spec.save_plots:
    written += _written("plots/", lambda: save_study_plots(
        study, run_dir / "plots", training.monitor_metric, best), failed) or []
  written = [p for p in written if p]
  counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                           TrialState.FAIL)}
  print(f"\nStudy {spec.config.study_name!r}: {len(trials)} trials, "
        f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed", file=out)
  if best is None:
    print("No trial completed: no best configuration.", file=out)
  else:
    print(f"Best trials ({training.monitor_metric}, {training.monitor_direction}):", file=out)
    print(format_table(trials, training.monitor_metric, training.monitor_direction), file=out)
    print(f"\nBest validation {training.monitor_metric}: {best.value:.4f} (trial {best.number})",
          file=out)
  print(f"Outputs in {run_dir}: " + ", ".join(
      os.path.relpath(p, run_dir) for p in written), file=out)
  if failed:
    print(f"Not written (see the log): {', '.join(failed)}; the trials are stored, and the same "
          f"command writes them again.", file=out)
  if best is not None and spec.save_best_config and "best_config.yaml" not in failed:
    print(f"Retrain the best trial: orchard-jax run {run_dir / 'best_config.yaml'}", file=out)
  return best
