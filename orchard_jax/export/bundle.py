"""All exports of a model into one folder, each checked, as the reference's export phase.

:func:`export_all` writes ``model.stablehlo`` and ``model.onnx`` (and ``model_quantized.onnx``
with ``quantize=True``), checks each against the JAX model, and with ``benchmark=True`` times
the ONNX files. A format that fails (a missing package of the export extra, an operation the
ONNX converter cannot convert) is one line in the result's ``errors``; the other formats are
written all the same, the StableHLO file first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

from orchard_jax.export.common import ONNX_TOLERANCE, Check, ExportError
from orchard_jax.export.onnx_export import check_onnx, export_onnx
from orchard_jax.export.runtime import Latency, accuracy, latency, quantize as quantize_onnx
from orchard_jax.export.stablehlo import check_stablehlo, export_stablehlo
from orchard_jax.models.base import Model

FORMATS = ("stablehlo", "onnx")
FILES = {"stablehlo": "model.stablehlo", "onnx": "model.onnx",
         "onnx_quantized": "model_quantized.onnx"}
QUANTIZED_TOLERANCE_FACTOR = 10  # the reference checks its quantised file at 10x the tolerance

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ExportResult:
  """What :func:`export_all` wrote and measured, keyed by format (``stablehlo``, ``onnx``,
  ``onnx_quantized``): ``files`` written, ``checks`` against the JAX model, ``errors`` (one
  line each, for the formats not written), ``latency`` and ``accuracy`` (with ``test_data``)
  of the ONNX files."""

  folder: pathlib.Path
  files: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)
  checks: dict[str, Check] = dataclasses.field(default_factory=dict)
  errors: dict[str, str] = dataclasses.field(default_factory=dict)
  latency: dict[str, Latency] = dataclasses.field(default_factory=dict)
  accuracy: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def written(self) -> list[pathlib.Path]:
    return list(self.files.values())

  @property
  def ok(self) -> bool:
    """Every requested format written and within its tolerance. The quantised file's check is
    reported but not counted: int8 weights move logits by more than the 1e-3 the reference
    allows them (it logs that as an error); its accuracy next to the float file's is the
    measure."""
    return not self.errors and all(c.passed for f, c in self.checks.items()
                                   if f != "onnx_quantized")

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready: paths relative to ``folder``, checks and latencies as dicts."""
    return {"files": {k: p.name for k, p in self.files.items()},
            "checks": {k: c.as_dict() for k, c in self.checks.items()},
            "errors": dict(self.errors),
            "latency": {k: v.as_dict() for k, v in self.latency.items()},
            "accuracy": dict(self.accuracy)}


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def _attempt(result: ExportResult, fmt: str, step: Any, *args: Any, **kwargs: Any) -> Any:
  """``step(*args)``; a failure of the format (not a bug of the caller) is one line in
  ``result.errors[fmt]`` and gives None."""
  try:
    return step(*args, **kwargs)
  except (ImportError, ExportError) as e:
    result.errors[fmt] = _one_line(e)
    logger.warning("%s export failed: %s", fmt, result.errors[fmt])
    return None


def export_all(model: Model, params: Any, model_state: Any, input_shape: Any,
               folder: str | os.PathLike, *, formats: tuple[str, ...] = FORMATS,
               quantize: bool = False, benchmark: bool = True,
               test_data: tuple[Any, Any] | None = None) -> ExportResult:
  """Exports the model to each of ``formats`` in ``folder`` and checks each export.

  Args:
    model, params, model_state: the trained model behind the :class:`Model` contract.
    input_shape: one sample's ``(H, W, C)``.
    folder: where the files go (created if missing).
    formats: a non-empty subset of :data:`FORMATS`.
    quantize: also write the int8 dynamically quantised ONNX file (needs ``"onnx"``).
    benchmark: time the ONNX files (the reference's 10 warm-up and 100 timed batches of 1).
    test_data: ``(images, labels)`` (e.g. the test split) to score the ONNX files on.

  Returns:
    An :class:`ExportResult`; it does not raise for a format that fails (see ``errors``).
  """
  if not formats or not set(formats) <= set(FORMATS):
    raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got formats={formats!r}")
  if quantize and "onnx" not in formats:
    raise ValueError(f"quantize=True quantises the ONNX file: formats must hold 'onnx', got"
                     f" formats={formats!r}")
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  result = ExportResult(folder=folder)
  weights = (model, params, model_state, input_shape)
  if "stablehlo" in formats:
    path = _attempt(result, "stablehlo", export_stablehlo, *weights, folder / FILES["stablehlo"])
    if path is not None:
      result.files["stablehlo"] = path
      result.checks["stablehlo"] = check_stablehlo(path, *weights)
  if "onnx" in formats:
    path = _attempt(result, "onnx", export_onnx, *weights, folder / FILES["onnx"])
    if path is not None:
      result.files["onnx"] = path
      result.checks["onnx"] = check_onnx(path, *weights)
      if quantize:
        _quantized(result, path, weights)
      _measure(result, input_shape, benchmark, test_data)
  for fmt, check in result.checks.items():
    if not check.passed:
      logger.warning("%s export differs from the JAX model by %.3g (tolerance %.3g)", fmt,
                     check.max_abs_diff, check.tolerance)
  return result


def _quantized(result: ExportResult, path: pathlib.Path, weights: tuple[Any, ...]) -> None:
  qpath = _attempt(result, "onnx_quantized", quantize_onnx, path,
                   result.folder / FILES["onnx_quantized"])
  if qpath is not None:
    result.files["onnx_quantized"] = qpath
    result.checks["onnx_quantized"] = check_onnx(
        qpath, *weights, tolerance=ONNX_TOLERANCE * QUANTIZED_TOLERANCE_FACTOR,
        fmt="onnx_quantized")


def _measure(result: ExportResult, input_shape: Any, benchmark: bool,
             test_data: tuple[Any, Any] | None) -> None:
  for fmt in ("onnx", "onnx_quantized"):
    if fmt in result.files:
      if benchmark:
        result.latency[fmt] = latency(result.files[fmt], input_shape)
      if test_data is not None:
        result.accuracy[fmt] = accuracy(result.files[fmt], *test_data)
