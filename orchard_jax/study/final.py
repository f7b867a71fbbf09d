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
  without it, one line saying how to get it), and ``export/export.json``.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Callable
from typing import Any

from orchard_jax.fileio import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_DIR", "PhaseFailed", "evaluate_phase", "export_phase",
           "run_phase", "test_arrays", "tta_spec"]

EXPORT_DIR = "export"


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
  split); its metrics go into a training run's ``run_dir/metrics.json`` too (``test``, and
  ``test_tta``)."""
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
  if path.is_file():  # a training run's (a study's folder has none)
    summary = json.loads(path.read_text())
    keys = ("loss", "accuracy", "auc", "f1")
    summary["test"] = {k: report["without_tta"][k] for k in keys}
    summary.pop("test_tta", None)
    if report["with_tta"] is not None:
      summary["test_tta"] = {k: report["with_tta"][k] for k in keys}
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
  return report


def export_phase(folder: str | pathlib.Path, run_dir: pathlib.Path, out: Any, *,
                 test_data: tuple[Any, Any] | None = None,
                 quantize: bool = False) -> list[pathlib.Path]:
  """Exports the model of ``folder`` (a run folder or checkpoint, as
  :func:`orchard_jax.load_model` reads it) into ``run_dir/export/`` with
  :func:`orchard_jax.export.export_all` -- ``model.stablehlo``, ``model.onnx`` (and, with
  ``quantize``, ``model_quantized.onnx``), each checked against the JAX model, the ONNX files
  timed and, given ``test_data`` (the test split's images and labels), scored -- and what it
  measured in ``export/export.json``; prints one line per file and per format that failed.
  Returns the files written: none, with one line saying why, when the model does not take
  images ``(H, W, C)`` (the exported signature) or the ``export`` extra is not installed."""
  from orchard_jax.export import export_all  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.loading import load_model  # pylint: disable=import-outside-toplevel
  loaded = load_model(folder)
  shape = loaded.input_shape
  if shape is None or len(shape) != 3:
    print(f"Export skipped: the exported files take images (H, W, C), and this model's inputs "
          f"have shape {None if shape is None else tuple(shape)}", file=out)
    return []
  result = export_all(loaded.model, loaded.params, loaded.model_state, shape,
                      run_dir / EXPORT_DIR, quantize=quantize, test_data=test_data)
  if result.files:
    atomic_write_text(result.folder / "export.json", json.dumps(result.as_dict(), indent=2) + "\n")
  for fmt, path in result.files.items():
    check, speed = result.checks.get(fmt), result.latency.get(fmt)
    line = f"Exported {path}"
    if check is not None:
      line += (f": max |difference| from the JAX model {check.max_abs_diff:.2g} on "
               f"{check.samples} inputs ({'within' if check.passed else 'OVER'} "
               f"{check.tolerance:g})")
    if speed is not None:
      line += f", {speed.median_ms:.3f} ms per image in onnxruntime (median)"
    if fmt in result.accuracy:
      line += f", test accuracy {result.accuracy[fmt]:.4f}"
    print(line, file=out)
  if not result.files:  # the extra missing, most often: one line for all
    print("Export skipped: " + "; ".join(f"{fmt}: {e}" for fmt, e in result.errors.items())
          + f" (then: orchard-jax export {run_dir})", file=out)
  else:
    for fmt, error in result.errors.items():
      print(f"Export to {fmt} failed: {error}", file=out)
  return result.written


def test_arrays(source: Any) -> tuple[Any, Any] | None:
  """The test split's ``(images, labels)`` of an in-memory source (digits, npz), else None."""
  return (getattr(source, "splits", None) or {}).get("test")
