"""A study's plots: Optuna's (history, intermediate values, importances) and a trial's curves.

Each is a PNG drawn with matplotlib's Agg backend that appears whole or not
at all; a plot that fails is logged and skipped, never costing the study's
other outputs.
"""

from __future__ import annotations

import io
import logging
import math
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from orchard_jax.fileio import atomic_write_bytes
from orchard_jax.study.tables import trial_history

logger = logging.getLogger(__name__)

__all__ = ["plot_history", "save_study_plots", "study_plots"]


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
