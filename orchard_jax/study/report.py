"""The test report of a trained model: the final evaluation, in one place.

:func:`evaluate_run` evaluates a state on the test split through the engine's
one validation pass (:func:`orchard_jax.engine.predictions.predictions`),
without and, given a TTA spec, with the test-time-augmentation ensemble, and
writes in the run folder:

========================  ===============================================================
``test_report.json``      per evaluation (``without_tta``, ``with_tta``): loss, accuracy,
                          macro F1 and AUC (the trials' metrics,
                          :func:`orchard_jax.core.metrics.classification_metrics`), each
                          class's precision, recall and support, the confusion matrix
``test_report.txt``       the same, short, for people
``confusion_matrix.png``  the confusion matrix (rows: true class, normalised per row);
                          ``confusion_matrix_tta.png`` with TTA
========================  ===============================================================

Per-class precision and recall are scikit-learn's ``precision_recall_fscore_support``
with ``zero_division=0`` (a class never predicted has precision 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from orchard_jax.core.metrics import METRIC_KEYS
from orchard_jax.fileio import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["REPORT_JSON", "REPORT_TEXT", "class_figures", "evaluate_run", "format_report",
           "plot_confusion_matrix", "report_entry", "write_report"]

REPORT_JSON, REPORT_TEXT = "test_report.json", "test_report.txt"
_NAMES = {"loss": "loss", "accuracy": "accuracy", "f1": "macro F1", "auc": "AUC"}


def class_figures(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
  """Each class's precision, recall and support, and the confusion matrix (``[true][predicted]``
  counts), of the predictions ``argmax(probs)``."""
  preds = np.asarray(probs).argmax(axis=1)
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels, np.int64), preds), 1)
  hits = np.diag(matrix).astype(np.float64)
  predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
  precision = np.divide(hits, predicted, out=np.zeros(num_classes), where=predicted > 0)
  recall = np.divide(hits, support, out=np.zeros(num_classes), where=support > 0)
  return {"precision": precision.tolist(), "recall": recall.tolist(),
          "support": support.tolist(), "confusion_matrix": matrix.tolist()}


def report_entry(validation: Any, num_classes: int) -> dict[str, Any]:
  """One evaluation of the report: the metrics of a
  :class:`~orchard_jax.engine.passes.Validation` and its :func:`class_figures`."""
  return {**{key: validation.metrics[key] for key in METRIC_KEYS},
          **class_figures(validation.probs, validation.labels, num_classes)}


def _plain(value: Any) -> Any:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _number(value: float) -> str:
  return "nan" if value is None or math.isnan(value) else f"{value:.4f}"


def format_report(report: dict[str, Any]) -> str:
  """``test_report.txt``: the metrics per evaluation, then each class's precision and recall."""
  runs = [(name, report[key]) for key, name in (("without_tta", "without TTA"),
                                                 ("with_tta", "with TTA")) if report.get(key)]
  lines = [f"Test split of {report['dataset']}: {report['rows']} rows, "
           f"{len(report['classes'])} classes; model {report['model']}", "",
           f"{'':<14}" + "".join(f"{_NAMES[k]:>10}" for k in METRIC_KEYS)]
  lines += [f"{name:<14}" + "".join(f"{_number(e[k]):>10}" for k in METRIC_KEYS)
            for name, e in runs]
  if report.get("tta") is None:
    lines.append("(TTA off: training.use_tta is false)")
  lines += ["", f"{'class':<14}" + "".join(f"{h:>11}" for name, _ in runs
                                           for h in (f"prec{'+' if 'with ' in name else ''}",
                                                     f"recall{'+' if 'with ' in name else ''}"))
            + f"{'support':>9}"]
  first = runs[0][1]
  for c, cls in enumerate(report["classes"]):
    lines.append(f"{cls[:14]:<14}" + "".join(
        f"{_number(e['precision'][c]):>11}{_number(e['recall'][c]):>11}" for _, e in runs)
                 + f"{first['support'][c]:>9}")
  if len(runs) > 1:
    lines.append("(+: with TTA)")
  return "\n".join(lines) + "\n"


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str],
                          path: pathlib.Path, title: str) -> pathlib.Path:
  """The confusion matrix as a PNG: each row (true class) normalised to its share, the
  counts written in the cells, as the reference's ``plot_confusion_matrix`` normalises it."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  from orchard_jax.study.plots import _save_figure  # pylint: disable=import-outside-toplevel

  counts = np.asarray(matrix, np.float64)
  shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  n = len(classes)
  side = min(max(4.0, 0.5 * n + 2.0), 14.0)
  fig, ax = plt.subplots(figsize=(side + 1.0, side))
  try:
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=classes, rotation=45 if n > 6 else 0)
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    ax.grid(False)
    if n <= 30:
      for i in range(n):
        for j in range(n):
          ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                  color="white" if shares[i, j] > 0.5 else "black")
    fig.tight_layout()
    _save_figure(fig, path)
  finally:
    plt.close(fig)
  return path


def write_report(folder: pathlib.Path, report: dict[str, Any], title: str, *,
                 plots: bool = True) -> list[pathlib.Path]:
  """Writes ``report`` as ``test_report.json`` and ``.txt`` and (with ``plots``) its confusion
  matrices into ``folder`` (each file whole or not at all); returns the paths written. A plot
  that fails is logged and skipped."""
  folder.mkdir(parents=True, exist_ok=True)
  atomic_write_text(folder / REPORT_JSON, json.dumps(report, indent=2) + "\n")
  atomic_write_text(folder / REPORT_TEXT, format_report(report))
  written = [folder / REPORT_JSON, folder / REPORT_TEXT]
  for key, name, suffix in (("without_tta", "confusion_matrix.png", ""),
                            ("with_tta", "confusion_matrix_tta.png", " (TTA)")):
    if plots and report.get(key):
      try:
        written.append(plot_confusion_matrix(report[key]["confusion_matrix"], report["classes"],
                                             folder / name, f"{title}{suffix}"))
      except Exception as e:  # pylint: disable=broad-except  # a plot is not worth the report
        logger.warning("Could not draw %s: %s: %s", name, type(e).__name__, e)
  return written


def evaluate_run(state: Any, loader: Iterable, folder: pathlib.Path, *, layout: str = "NCHW",
                 tta: Any = None, classes: Sequence[str] | None = None, dataset: str = "data",
                 model: str = "", title: str = "", plots: bool = True) -> dict[str, Any]:
  """Evaluates ``state`` on ``loader`` (the test split), without and, with ``tta`` (a
  :class:`orchard_jax.core.tta.TTASpec`), with the TTA ensemble; writes the report (see the
  module docstring) into ``folder`` and returns it.

  ``classes``: the class names (default ``"0"``, ``"1"``, ...); ``dataset``, ``model`` and
  ``title`` name the data, the model's checkpoint and the plots in the report; ``plots``:
  whether the confusion matrices are drawn.
  """
  from orchard_jax.engine.predictions import predictions  # pylint: disable=import-outside-toplevel

  num_classes = state.spec.num_classes
  classes = [str(c) for c in (classes or range(num_classes))]
  plain = predictions(state, loader, layout=layout)
  report = {"dataset": dataset, "model": model, "rows": int(len(plain.labels)),
            "classes": classes, "without_tta": report_entry(plain, num_classes),
            "with_tta": None, "tta": None if tta is None else _plain(tta)}
  if tta is not None:
    report["with_tta"] = report_entry(predictions(state, loader, layout=layout, tta=tta),
                                      num_classes)
  write_report(folder, report, title or f"{model} on {dataset}", plots=plots)
  return report
