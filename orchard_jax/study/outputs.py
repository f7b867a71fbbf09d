"""What a study leaves in its run folder, and the final table of best trials.

=======================  ===================================================
``study.db``             the Optuna storage (with the default ``storage: sqlite``)
``trials.csv``           one row per trial: number, state, value, best epoch,
                         epochs, seconds, start/end, every parameter, error
``best_config.yaml``     a recipe without ``optuna:``: retrains the best
                         trial for ``training.epochs`` (``orchard-jax run``)
``best_model/``          the best trial's best-epoch checkpoint (orbax,
                         ``checkpoint/``) with ``best.json`` and ``trial.json``
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

Each trial of a recipe's study carries scalar user attributes to sort on in
optuna-dashboard (``best_epoch``, ``epochs_run``, ``seconds``) and one
attribute per epoch, ``epoch_01``, ``epoch_02``, ...: that epoch's training
loss and validation metrics, a few hundred characters (the dashboard cuts
each attribute at 1,024). Studies stored before keep one ``history`` list;
:func:`trial_history` reads both.
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
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.engine.trial import TRIAL_CONFIG  # what run_trial's TrialConfig held
from orchard_jax.fileio import atomic_directory, atomic_write_bytes, atomic_write_text
from orchard_jax.study.functions import module_file

logger = logging.getLogger(__name__)

# Trial user attributes written by the runner.
HISTORY, ERROR, INTERRUPTED, RETRY_OF = "history", "error", "interrupted", "retry_of"
CONFIG = "config"                      # the resolved recipe the trial trained with
STORAGE_FAULT = "storage_fault"        # the storage's error that stopped the trial (retried)
LOST = "lost"                          # the process running the trial died (retried)
RESOURCE_FAULT = "resource_fault"      # "memory: <the error>": it ran out of memory (retried once)
CHECKPOINT_ERROR = "checkpoint_error"  # why the trial's best state could not be written
# Scalar trial attributes (sortable in optuna-dashboard), set by the study's objective.
BEST_EPOCH, EPOCHS_RUN, SECONDS = "best_epoch", "epochs_run", "seconds"
EPOCH_PREFIX = "epoch_"                # epoch_01, epoch_02, ...: one epoch's values each
TOP_K = 5
RETRAIN_FILE = "best_config.yaml"   # a recipe's study: the best trial as a recipe to retrain
BEST_TRIAL_FILE = "best_trial.yaml"  # a study of one's own objective: the best trial described


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


def epoch_key(epoch: int, epochs: int | None = None) -> str:
  """The user attribute of one epoch: ``epoch_01`` (zero-padded to the width of ``epochs``, at
  least 2 digits, so the dashboard lists them in order)."""
  return f"{EPOCH_PREFIX}{epoch:0{max(2, len(str(epochs or 0)))}d}"


def epoch_attrs(epochs: Sequence[dict[str, float]],
                total: int | None = None) -> dict[str, dict[str, float]]:
  """``{"epoch_01": {"train_loss": ..., "val_accuracy": ...}, ...}``: one compact attribute per
  epoch of a :class:`~orchard_jax.study.build.History` (the epoch is in the name)."""
  return {epoch_key(int(e["epoch"]), total): {k: v for k, v in e.items() if k != "epoch"}
          for e in epochs}


def trial_history(trial: FrozenTrial) -> list[dict[str, float]]:
  """The trial's per-epoch records (``{"epoch", "train_loss", "val_<metric>"...}``), from its
  ``epoch_NN`` attributes or, for a trial stored before those, its ``history`` list."""
  epochs = []
  for key, value in trial.user_attrs.items():
    number = key[len(EPOCH_PREFIX):]
    if key.startswith(EPOCH_PREFIX) and number.isdigit() and isinstance(value, dict):
      epochs.append({"epoch": int(number), **value})
  if epochs:
    return sorted(epochs, key=lambda e: e["epoch"])
  return list(trial.user_attrs.get(HISTORY) or [])


def _seconds(trial: FrozenTrial) -> float | None:
  seconds = trial.user_attrs.get(SECONDS)
  if isinstance(seconds, (int, float)):
    return float(seconds)
  return trial.duration.total_seconds() if trial.duration is not None else None


def _epochs(trial: FrozenTrial) -> int:
  epochs = trial.user_attrs.get(EPOCHS_RUN)
  return epochs if isinstance(epochs, int) else (trial.last_step or 0)


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
    lines.append(f"{rank:>4}  {t.number:>5}  {t.value:>10.4f}  {_epochs(t):>6}  "
                 f"{'-' if seconds is None else f'{seconds:.1f}':>7}  {params}")
  return "\n".join(lines)


def retry_source(trial: FrozenTrial) -> int | None:
  """The trial ``trial`` retries: ``retry_of`` (interrupted, lost, storage or memory faults)
  or Optuna's heartbeat retry (system attribute ``failed_trial``); None for a new one."""
  number = trial.user_attrs.get(RETRY_OF)
  return trial.system_attrs.get("failed_trial") if number is None else number


def trial_error(trial: FrozenTrial) -> str:
  """Why a trial did not finish: ``memory: ...`` (retried), its error, ``interrupted``,
  ``lost: ...``, ``storage: ...``."""
  if trial.user_attrs.get(RESOURCE_FAULT):
    return trial.user_attrs[RESOURCE_FAULT]
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
  """One row per trial; ``epochs`` and ``seconds`` are the trial's ``epochs_run`` and
  ``seconds`` attributes (else its last reported epoch and its duration)."""
  names = sorted({name for t in trials for name in t.params})
  columns = ["number", "state", "value", "best_epoch", "epochs", "seconds", "datetime_start",
             "datetime_complete", *(f"params_{n}" for n in names), "retry_of", "error",
             "checkpoint_error"]
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(columns)
  for t in sorted(trials, key=lambda t: t.number):
    retry, seconds = retry_source(t), _seconds(t)
    writer.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                     t.user_attrs.get(BEST_EPOCH, ""), _epochs(t),
                     "" if seconds is None else seconds, t.datetime_start or "",
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


# A path is written relative to best_config.yaml when it climbs at most this many folders
# (outputs/<study>/ -> the project's files: they move together); one further away stays absolute.
RELATIVE_UP_MAX = 2


def _relative(path: str | None, base: pathlib.Path) -> str | None:
  """An absolute ``path`` as seen from the folder ``base`` (POSIX separators), unless it
  climbs more than :data:`RELATIVE_UP_MAX` folders; others as they are."""
  if path is None or not os.path.isabs(os.path.expanduser(path)):
    return path
  relative = pathlib.Path(os.path.relpath(os.path.expanduser(path), base))
  ups = next((i for i, part in enumerate(relative.parts) if part != ".."), len(relative.parts))
  return relative.as_posix() if ups <= RELATIVE_UP_MAX else path


def _working_directory_module(module: str) -> str | None:
  """The absolute file of ``module`` when it was imported from the working directory (not
  installed): a recipe elsewhere finds it only by its file."""
  loaded = sys.modules.get(module)
  file = module_file(pathlib.Path.cwd(), module) if loaded is not None else None
  same = file is not None and os.path.realpath(getattr(loaded, "__file__", None) or "") == \
      os.path.realpath(file)
  return os.path.abspath(file) if same else None


def _relative_entry(entry: str | None, base: pathlib.Path) -> str | None:
  """A ``'path/file.py:function'`` entry with an absolute file relative to ``base``; a module
  of the working directory's as its file, so (see :func:`_working_directory_module`)."""
  if not entry:
    return entry
  target, _, attr = entry.rpartition(":")
  if not os.path.isabs(target) and not target.endswith(".py") and "/" not in target:
    target = _working_directory_module(target) or target
  return f"{_relative(target, base)}:{attr}" if os.path.isabs(target) else entry


def relative_paths(config: dict[str, Any], base: pathlib.Path) -> dict[str, Any]:
  """``config`` (a recipe's data) with ``dataset.path``, the files of ``dataset.function`` and
  ``architecture.function``, and ``telemetry.output_dir`` relative to the folder ``base``
  (where the recipe file lives)."""
  base = base.absolute()
  fixes = {("dataset", "path"): _relative, ("dataset", "function"): _relative_entry,
           ("architecture", "function"): _relative_entry,
           ("telemetry", "output_dir"): _relative}
  out = dict(config)
  for (section, key), fix in fixes.items():
    if isinstance(out.get(section), dict) and out[section].get(key):
      out[section] = {**out[section], key: fix(out[section][key], base)}
  return out


def best_config_dict(recipe: Any, trial: FrozenTrial, run_dir: pathlib.Path) -> dict[str, Any]:
  """The recipe that retrains ``trial``: the configuration stored with it (parameters,
  data, architecture, ``training.epochs``), no optuna; the run's telemetry, writing to
  ``run_dir/retrain``. Its paths are relative to ``run_dir``, where ``best_config.yaml``
  lives (``load_recipe`` reads a recipe file's relative paths from its folder)."""
  config = trial.user_attrs.get(CONFIG)
  if config is None:  # a trial stored before configurations were
    logger.warning("Trial %d has no stored configuration; best_config.yaml is rebuilt from the "
                   "current recipe and the trial's parameters", trial.number)
    config = resolved_config(recipe, trial.params)
  telemetry = dataclasses.replace(recipe.telemetry, output_dir=str((run_dir / "retrain").absolute()))
  config = {**config, "telemetry": dataclasses.asdict(telemetry)}
  return relative_paths(config, run_dir)


def _best_config_text(recipe: Any, trial: FrozenTrial, path: pathlib.Path) -> str:
  metric = recipe.training.monitor_metric
  header = (f"# Best trial {trial.number} of study {recipe.study.config.study_name!r}: "
            f"{metric} = {trial.value:.6f} after {recipe.study.config.epochs} trial epochs.\n"
            f"# A recipe without an optuna section: one training run of training.epochs epochs\n"
            f"# with the best trial's hyperparameters, reporting validation and test metrics"
            f" (paths are relative to this file):\n"
            f"#   orchard-jax run {path}\n")
  return header + yaml.safe_dump(best_config_dict(recipe, trial, path.parent), sort_keys=False)


def write_best_config(recipe: Any, trial: FrozenTrial, run_dir: pathlib.Path) -> pathlib.Path:
  path = run_dir / "best_config.yaml"
  atomic_write_text(path, _best_config_text(recipe, trial, path))
  return path


def _plain(value: Any) -> Any:
  """``value`` as YAML/JSON-ready data (tuples as lists; anything else as its ``repr``)."""
  try:
    return yaml.safe_load(yaml.safe_dump(value))
  except yaml.YAMLError:
    return repr(value)


def describe_trial(trial: FrozenTrial, metric: str) -> dict[str, Any]:
  """The best trial of a study of one's own objective: number, value, parameters, its scalar
  attributes and, when recorded, its ``trial_config``."""
  scalars = {k: v for k, v in trial.user_attrs.items()
             if k in (BEST_EPOCH, EPOCHS_RUN, SECONDS, CHECKPOINT_ERROR)}
  config = trial.user_attrs.get(TRIAL_CONFIG)
  return {"trial": trial.number, "metric": metric, "value": trial.value,
          "params": _plain(dict(trial.params)), **scalars,
          **({"trial_config": config} if config is not None else {})}


def _described_text(study: Any, trial: FrozenTrial, metric: str) -> str:
  header = (f"# Best trial {trial.number} of study {study.study_name!r}: {metric} = "
            f"{trial.value:.6f}.\n"
            f"# Its parameters and, when run_trial recorded it, what\n"
            f"# its TrialConfig held; best_model/ holds its best epoch's state.\n")
  return header + yaml.safe_dump(describe_trial(trial, metric), sort_keys=False)


def export_best_model(run_dir: pathlib.Path, trial: FrozenTrial,
                      checkpoints: pathlib.Path | None = None) -> pathlib.Path | None:
  """Copies ``checkpoints/trial_<n>`` (default ``run_dir/trials``) to ``run_dir/best_model/``
  (whole or not at all); None if the trial's checkpoint was not written."""
  checkpoints = run_dir / "trials" if checkpoints is None else pathlib.Path(checkpoints)
  source, dest = checkpoints / f"trial_{trial.number}", run_dir / "best_model"
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
  """Training loss, validation loss and the monitored metric per epoch (PNG); only the metric
  when the epochs have no losses (a study of one's own objective: its reported values)."""
  if not epochs:
    return None
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  x = [e["epoch"] for e in epochs]
  losses = any("train_loss" in e or "val_loss" in e for e in epochs)
  fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(10, 4) if losses else (5, 4),
                           squeeze=False)
  right = axes[0][-1]
  panels = [(right, "metric" if losses else metric)]
  if losses:
    left = axes[0][0]
    left.plot(x, [e.get("train_loss", math.nan) for e in epochs], marker="o", label="train loss")
    left.plot(x, [e.get("val_loss", math.nan) for e in epochs], marker="o", label="val loss")
    panels.insert(0, (left, "loss"))
  for name in dict.fromkeys((metric, "accuracy") if losses else (metric,)):
    right.plot(x, [e.get(f"val_{name}", math.nan) for e in epochs], marker="o", label=f"val {name}")
  for ax, label in panels:
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


def _curves(trial: FrozenTrial, metric: str) -> list[dict[str, float]]:
  """The trial's per-epoch records, else (a study of one's own objective) its reported values
  as ``val_<metric>``."""
  return trial_history(trial) or [{"epoch": step, f"val_{metric}": value}
                                  for step, value in sorted(trial.intermediate_values.items())]


def study_plots(study: Any, metric: str) -> dict[str, tuple[Callable[[], Any], bool]]:
  """``{name: (draw, possible)}`` of the study's optuna plots: ``draw()`` returns the Axes,
  labelled with "trial" or "epoch" and ``metric``; ``possible`` says whether the study has
  the trials it needs."""
  from optuna.visualization import matplotlib as vis

  def labelled(ax: Any, x: str, y: str) -> Any:
    for a in getattr(ax, "flat", [ax]):
      a.set_xlabel(x)
      a.set_ylabel(y)
    return ax

  trials = study.get_trials(deepcopy=False)
  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  return {"optimization_history": (lambda: labelled(
              vis.plot_optimization_history(study, target_name=metric), "trial", metric),
                                   bool(complete)),
          "intermediate_values": (lambda: labelled(
              vis.plot_intermediate_values(study), "epoch", metric),
                                  any(t.intermediate_values for t in trials)),
          "param_importances": (lambda: vis.plot_param_importances(study, target_name=metric),
                                len(complete) >= 2)}


def save_study_plots(study: Any, plots_dir: pathlib.Path, metric: str,
                     best: FrozenTrial | None) -> list[pathlib.Path]:
  """The optuna.visualization.matplotlib plots (Agg backend) and the best trial's curves."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  plots_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for name, (plot, possible) in study_plots(study, metric).items():
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
    path = plot_history(_curves(best, metric), plots_dir / "best_trial_curves.png", metric,
                        f"trial {best.number} (best)")
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
      best_config=(lambda t, path: _best_config_text(recipe, t, path)) if spec.save_best_config
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
                  plots: bool = True, out: Any = None) -> FrozenTrial | None:
  """Writes a study's outputs to ``run_dir``, for any Optuna study whose objective calls
  :func:`~orchard_jax.engine.run_trial`; returns the best trial (None: none completed).

  ``run_dir`` gets ``trials.csv``, ``plots/`` (with ``plots``), and for the
  best trial ``best_trial.yaml`` (its value, parameters and recorded
  ``trial_config``, which :func:`~orchard_jax.engine.run_trial` records) and ``best_model/``: a
  copy of ``checkpoint_dir/trial_<n>``, the folder ``run_trial`` writes the
  best epoch's state to under ``TrialConfig.output_dir``. ``checkpoint_dir``
  defaults to the ``output_dir`` the best trial recorded; without either,
  ``best_model/`` is not written. Each file appears whole or not at all.

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
               best_config=lambda t, _: _described_text(study, t, metric), plots=plots,
               best_name=BEST_TRIAL_FILE)
  return _write(study, run_dir, plan, out)
