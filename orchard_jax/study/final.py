"""The phases after training: the test split's evaluation and the export, each named when it
fails.

A run goes through phases -- ``search`` (a study), ``train``, ``evaluate``, ``export`` -- in
that order (:mod:`orchard_jax.study.phases`). :func:`run_phase` runs one: an error in it
becomes :class:`PhaseFailed`, one line that names the phase and says that what the earlier
phases wrote is kept (each phase writes its files whole, and none removes an earlier
phase's).

* :func:`evaluate_phase`: the test report (:mod:`orchard_jax.study.report`), without and,
  when ``training.use_tta``, with the TTA ensemble (:func:`tta_spec`), and the test metrics
  in ``metrics.json``.
* :func:`export_phase`: the model in StableHLO and ONNX, checked against the JAX model, in
  ``export/`` (:func:`orchard_jax.export.export_all`, with the ``export`` extra installed;
  without it, one line saying how to get it).
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Callable
from typing import Any

from orchard_jax.fileio import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_DIR", "EXPORT_HINT", "PhaseFailed", "evaluate_phase", "export_phase",
           "run_phase", "tta_spec"]

EXPORT_DIR = "export"
EXPORT_HINT = 'pip install -e ".[export]"'


class PhaseFailed(RuntimeError):
  """A phase of a run failed; its message is one line naming the phase."""

  def __init__(self, phase: str, run_dir: pathlib.Path, error: BaseException):
    self.phase, self.error = phase, error
    text = " ".join(str(error).split())
    super().__init__(f"the {phase} phase failed: {type(error).__name__}: {text}; what the "
                     f"earlier phases wrote is kept in {run_dir}")


def run_phase(phase: str, run_dir: pathlib.Path, fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
  """``fn(*args, **kwargs)``, its errors raised as :class:`PhaseFailed` (a recipe's errors,
  ``ConfigError``, and Ctrl-C pass as they are)."""
  from orchard_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  logger.info("Phase %s -> %s", phase, run_dir)
  try:
    return fn(*args, **kwargs)
  except (ConfigError, KeyboardInterrupt, PhaseFailed):
    raise
  except Exception as e:  # pylint: disable=broad-except  # named, with its cause chained
    raise PhaseFailed(phase, run_dir, e) from e


def tta_spec(training: Any, input_shape: tuple[int, ...]) -> Any:
  """The TTA ensemble of ``training`` (:class:`orchard_jax.core.tta.TTASpec`: its
  ``augmentation``'s ``tta_*`` settings and dataset flags, or their defaults), for images of
  ``input_shape``; None when ``training.use_tta`` is false.

  Raises:
    ConfigError: ``use_tta`` for inputs that are not images ``(H, W, C)``.
  """
  if not training.use_tta:
    return None
  from orchard_jax.config import AugmentationConfig, ConfigError  # pylint: disable=import-outside-toplevel
  from orchard_jax.core.tta import TTASpec  # pylint: disable=import-outside-toplevel
  if len(input_shape) != 3:
    raise ConfigError(f"training.use_tta is true, but the inputs have shape "
                      f"{tuple(input_shape)}: test-time augmentation needs images (H, W, C); "
                      f"set training.use_tta: false")
  aug = training.augmentation or AugmentationConfig()
  return TTASpec(anatomical=aug.is_anatomical, texture_based=aug.is_texture_based,
                 mode=aug.tta_mode, translate=aug.tta_translate, scale=aug.tta_scale,
                 blur_sigma=aug.tta_blur_sigma, blur_kernel_size=aug.tta_blur_kernel_size,
                 resolution=int(input_shape[0]))


def evaluate_phase(state: Any, recipe: Any, source: Any, run_dir: pathlib.Path, *,
                   model: str, plots: bool = True) -> dict[str, Any] | None:
  """The test report of ``state`` in ``run_dir`` (None, and a log line, without a test
  split); its metrics go into ``run_dir/metrics.json`` too (``test``, and ``test_tta``)."""
  from orchard_jax.study.report import evaluate_run  # pylint: disable=import-outside-toplevel

  training = recipe.training
  loaders = source.loaders(training.batch_size, training.seed)
  if loaders.test is None:
    logger.info("No test split in %s: no test report", source.name)
    return None
  report = evaluate_run(state, loaders.test, run_dir, layout=source.layout,
                        tta=tta_spec(training, source.input_shape),
                        classes=getattr(source, "classes", None), dataset=source.name,
                        model=model, title=f"{recipe.architecture.name} on {source.name}",
                        plots=plots)
  path = run_dir / "metrics.json"
  summary = json.loads(path.read_text()) if path.is_file() else {}
  keys = ("loss", "accuracy", "auc", "f1")
  summary["test"] = {k: report["without_tta"][k] for k in keys}
  if report["with_tta"] is not None:
    summary["test_tta"] = {k: report["with_tta"][k] for k in keys}
  atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
  return report


def export_phase(folder: str | pathlib.Path, run_dir: pathlib.Path, out: Any) -> list[pathlib.Path]:
  """Exports the model of ``folder`` (a run folder or checkpoint, as
  :func:`orchard_jax.load_model` reads it) into ``run_dir/export/``; returns the files
  written. None are, with one line on ``out`` saying why, when the ``export`` extra is not
  installed or the model does not take images ``(H, W, C)`` (the exported signature)."""
  from orchard_jax.study.loading import load_model  # pylint: disable=import-outside-toplevel
  loaded = load_model(folder)
  shape = loaded.input_shape
  if shape is None or len(shape) != 3:
    print(f"Export skipped: the exported files take images (H, W, C), and this model's inputs "
          f"have shape {None if shape is None else tuple(shape)}", file=out)
    return []
  try:
    from orchard_jax.export import export_all  # pylint: disable=import-outside-toplevel
    written = export_all(loaded.model, loaded.params, loaded.model_state, shape,
                         run_dir / EXPORT_DIR)
  except ImportError as e:  # the extra's packages (onnx, onnxruntime, jax2onnx) are missing
    print(f"Export skipped: {' '.join(str(e).split())} (then: orchard-jax export {run_dir})",
          file=out)
    return []
  return [pathlib.Path(p) for p in (written or ())]
