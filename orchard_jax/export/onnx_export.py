"""ONNX export through jax2onnx, checked with ``onnx.checker`` and onnxruntime.

:func:`export_onnx` converts the model's inference function (see
:func:`~orchard_jax.export.common.inference_function`: NHWC float32 images in, logits out,
parameters as initializers) at opset :data:`OPSET` with a dynamic batch axis. The reference
exports at 18; here 20, because jax2onnx writes GELU (ConvNeXt, ViT) as the ``Gelu`` operator,
which opset 20 introduced, whatever opset it is asked for (at 18 ``onnx.checker`` refuses it).
The input is ``input`` ``float32 [batch, H, W, C]``, the output ``logits``
(``probabilities`` with ``probabilities=True``) ``float32 [batch, num_classes]``::

  session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
  logits_BxK = session.run(None, {"input": images_BxHxWxC})[0]

The converted graph is then simplified with onnxruntime's basic optimizations (constant
folding, standard-operator fusions; the file keeps to standard ONNX operators and runs
anywhere): jax2onnx writes an inference BatchNorm as ``(x - mean) * k + b`` after the
convolution, which no fusion matches, so each ``Sub`` of a constant becomes an ``Add`` of its
negation and a second pass folds the chain into the convolution's weights and bias, as
torch's exporter folds BatchNorm. Before that second pass, jax2onnx's 2x2/2 reshape-max pool
and spatial mean of NHWC tensors become ``MaxPool`` and ``GlobalAveragePool``
(:mod:`~orchard_jax.export.onnx_rewrite`), which lets onnxruntime cancel the layout transposes
around the convolutions, so BatchNorms next to a pool or the mean fold too. Measured at 28 px
(one thread, interleaved runs), this makes onnxruntime's latency that of the reference's torch
export: ResNet-18 x1.00 at batch 1 and 32 (x1.06-1.07 unfolded), MiniCNN x1.0 at batch 1 and
256 (x1.9-2.3 without the pool rewrite; see docs/performance.md).

A model that uses an operation jax2onnx has no conversion for raises
:class:`UnsupportedOperationError`, one line that names the operation.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import re
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from orchard_jax.export.common import (ONNX_TOLERANCE, Check, ExportError, check_input_shape,
                                       check_inputs, compare, inference_function, jax_outputs,
                                       require)
from orchard_jax.export.onnx_rewrite import rewrite_pools
from orchard_jax.fileio import atomic_write_bytes
from orchard_jax.models.base import Model

OPSET = 20  # Gelu (ConvNeXt, ViT) is an opset-20 operator, and jax2onnx emits it at any opset
MIN_OPSET = 17
INPUT_NAME = "input"
BATCH_DIM = "batch"
# jax2onnx's loggers: its plugin discovery logs a traceback for each optional plugin whose
# library (dm_pix, ...) does not import with this JAX; onnx_ir warns about untyped constants.
# jax2onnx 0.13.0's Linen Conv conversion also prints each layer on stdout, which _quiet drops.
_QUIET_LOGGERS = ("jax2onnx", "onnx_ir")
_PRIMITIVE = re.compile(r"primitive '([^']+)'")


class UnsupportedOperationError(ExportError):
  """The ONNX converter has no conversion for an operation of the model (``.operation``)."""

  def __init__(self, operation: str, detail: str):
    self.operation = operation
    super().__init__(f"ONNX export: jax2onnx cannot convert the operation {operation!r} ({detail});"
                     " the StableHLO export does not depend on it")


def output_name(probabilities: bool) -> str:
  return "probabilities" if probabilities else "logits"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)  # its calls of older flax and JAX APIs
      yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _operation(error: BaseException) -> str | None:
  """The operation a converter error is about: the primitive its message names, else the
  jax2onnx plugin (``plugins/<...>/<operation>.py``) the error was raised in, else None."""
  found = _PRIMITIVE.search(str(error))
  if found:
    return found.group(1)
  plugins = [f.filename for f in traceback.extract_tb(error.__traceback__)
             if f"{os.sep}jax2onnx{os.sep}plugins{os.sep}" in f.filename]
  return pathlib.Path(plugins[-1]).stem if plugins else None


def _conversion_error(error: Exception) -> ExportError:
  detail = " ".join(str(error).split()) or type(error).__name__
  operation = _operation(error)
  if operation is None:
    return ExportError(f"ONNX export: jax2onnx failed: {type(error).__name__}: {detail}")
  return UnsupportedOperationError(operation, detail)


def _dynamic_batch(model_proto: Any) -> bool:
  dims = [v.type.tensor_type.shape.dim[0] for v in (*model_proto.graph.input,
                                                      *model_proto.graph.output)]
  return all(d.dim_param and not d.dim_value for d in dims)


def _basic_optimized(proto: Any, ort: Any, onnx: Any) -> Any:
  """``proto`` after onnxruntime's basic (portable, standard-operator) graph optimizations."""
  with tempfile.TemporaryDirectory() as tmp:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = os.path.join(tmp, "basic.onnx")
    options.log_severity_level = 3  # not its notes on the initializers it drops
    try:
      ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # pylint: disable=broad-except  # onnxruntime's own exception types
      raise ExportError("ONNX export: onnxruntime cannot load the converted graph: "
                        f"{' '.join(str(e).split())}") from e
    optimized = onnx.load(options.optimized_model_filepath)
  # onnxruntime declares every domain it knows (com.microsoft, ...); keep those in use
  used = {"", *(n.domain for n in optimized.graph.node),
          *(n.domain for f in optimized.functions for n in f.node),
          *(f.domain for f in optimized.functions)}
  kept = [o for o in optimized.opset_import if o.domain in used]
  del optimized.opset_import[:]
  optimized.opset_import.extend(kept)
  return optimized


def _subtractions_as_additions(proto: Any, onnx: Any) -> int:
  """Rewrites each float ``Sub(x, constant)`` as ``Add(x, -constant)`` (which onnxruntime's
  Conv+Add fusion matches); returns how many."""
  constants = {c.name: c for c in proto.graph.initializer}
  count = 0
  for node in proto.graph.node:
    if node.op_type != "Sub" or node.input[1] not in constants or node.input[0] in constants:
      continue
    value = onnx.numpy_helper.to_array(constants[node.input[1]])
    if not np.issubdtype(value.dtype, np.floating):
      continue
    negated = onnx.numpy_helper.from_array(-value, f"{node.input[1]}_negated_{count}")
    proto.graph.initializer.append(negated)
    node.op_type, node.input[1] = "Add", negated.name
    count += 1
  return count


def _simplified(proto: Any, onnx: Any) -> Any:
  ort = require("onnxruntime", "ONNX export")
  proto = _basic_optimized(proto, ort, onnx)
  pools = rewrite_pools(proto, onnx)
  if _subtractions_as_additions(proto, onnx) or pools:
    proto = _basic_optimized(proto, ort, onnx)
  return proto


def _check(proto: Any, onnx: Any, which: str) -> None:
  try:
    onnx.checker.check_model(proto, full_check=True)
  except onnx.checker.ValidationError as e:
    raise ExportError(f"ONNX export: the {which} graph fails onnx.checker: "
                      f"{str(e).strip().splitlines()[0]}") from e


def export_onnx(model: Model, params: Any, model_state: Any, input_shape: Any,
                path: str | os.PathLike, *, opset: int = OPSET,
                probabilities: bool = False) -> pathlib.Path:
  """Converts the inference function to ONNX, simplifies it (see the module docstring), checks
  it with ``onnx.checker`` and writes it to ``path`` (atomically); returns the path.

  Raises:
    UnsupportedOperationError: jax2onnx cannot convert an operation of the model.
    ExportError: jax2onnx failed otherwise, or the graph fails ``onnx.checker``, does not load
      in onnxruntime or lost its dynamic batch axis.
    ValueError: ``opset`` below :data:`MIN_OPSET` or above what the installed onnx knows.
  """
  onnx = require("onnx", "ONNX export")
  shape = check_input_shape(input_shape)
  newest = onnx.defs.onnx_opset_version()
  if not MIN_OPSET <= opset <= newest:
    raise ValueError(f"opset must be in [{MIN_OPSET}, {newest}], got opset={opset}")
  jax2onnx = require("jax2onnx", "ONNX export")
  fn = inference_function(model, params, model_state, probabilities=probabilities)
  with _quiet():
    try:
      proto = jax2onnx.to_onnx(fn, inputs=[(BATCH_DIM, *shape)], opset=opset,
                               model_name="orchard_jax", input_names=[INPUT_NAME],
                               output_names=[output_name(probabilities)])
    except Exception as e:  # pylint: disable=broad-except  # each plugin raises its own type
      raise _conversion_error(e) from e
  _check(proto, onnx, "converted")
  proto = _simplified(proto, onnx)
  _check(proto, onnx, "simplified")
  if not _dynamic_batch(proto):
    raise ExportError("ONNX export: the converted graph has a fixed batch size")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return atomic_write_bytes(path, proto.SerializeToString())


def session(path: str | os.PathLike) -> Any:
  """An onnxruntime session on the CPU provider (the reference's check and benchmark)."""
  ort = require("onnxruntime", "Running an ONNX file")
  return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(sess: Any, x_BxHxWxC: np.ndarray) -> np.ndarray:
  """The session's first output on ``x`` (float32 NHWC)."""
  return sess.run(None, {INPUT_NAME: np.asarray(x_BxHxWxC, np.float32)})[0]


def check_onnx(path: str | os.PathLike, model: Model, params: Any, model_state: Any,
               input_shape: Any, *, probabilities: bool = False,
               tolerance: float = ONNX_TOLERANCE, fmt: str = "onnx") -> Check:
  """The ONNX file at ``path`` in onnxruntime (CPU) against the JAX model on the seeded
  check inputs (``fmt`` names the result, e.g. ``"onnx_quantized"``)."""
  sess = session(path)
  inputs = check_inputs(check_input_shape(input_shape))
  expected = jax_outputs(model, params, model_state, inputs, probabilities=probabilities)
  return compare(fmt, expected, [run_onnx(sess, x) for x in inputs], tolerance)
