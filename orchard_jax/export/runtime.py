"""The ONNX file in onnxruntime: int8 dynamic quantisation, accuracy on given arrays, latency.

As the reference (orchard-ml ``export/onnx_exporter.py``): :func:`quantize` is onnxruntime's
``quantize_dynamic`` with int8 or uint8 weights (per channel only when asked: the reference
does it for its fbgemm backend only) after clearing the graph's intermediate shape
annotations; :func:`latency` runs 10 warm-up and 100 timed batches of seeded ``N(0, 1)``
inputs on the CPU provider. :func:`accuracy` scores a file on arrays the caller passes (the
test split), so a quantised model's accuracy can stand next to the float model's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import tempfile
import time
from typing import Any

import numpy as np

from orchard_jax.export.common import check_input_shape, require
from orchard_jax.export.onnx_export import run_onnx, session

WEIGHT_TYPES = ("int8", "uint8")
WARMUP_RUNS = 10
TIMED_RUNS = 100


def quantize(onnx_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
             weight_type: str = "int8", per_channel: bool = False) -> pathlib.Path:
  """Writes the dynamically quantised model (``model_quantized.onnx`` beside ``onnx_path``
  unless ``output_path`` is given) and returns its path."""
  if weight_type not in WEIGHT_TYPES:
    raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got weight_type={weight_type!r}")
  onnx = require("onnx", "ONNX quantisation")
  quantization = require("onnxruntime.quantization", "ONNX quantisation")
  onnx_path = pathlib.Path(onnx_path)
  output_path = pathlib.Path(output_path or onnx_path.parent / "model_quantized.onnx")
  proto = onnx.load(str(onnx_path))
  del proto.graph.value_info[:]  # the reference's pre-processing: no stale shape annotations
  quant_type = (quantization.QuantType.QInt8 if weight_type == "int8"
                else quantization.QuantType.QUInt8)
  root = logging.getLogger()
  level = root.level
  with tempfile.TemporaryDirectory(dir=output_path.parent) as tmp:
    source, target = pathlib.Path(tmp) / "source.onnx", pathlib.Path(tmp) / "quantized.onnx"
    onnx.save(proto, str(source))
    root.setLevel(logging.ERROR)  # quantize_dynamic advises pre-processing through the root logger
    try:
      quantization.quantize_dynamic(model_input=str(source), model_output=str(target),
                                    weight_type=quant_type, per_channel=per_channel)
    finally:
      root.setLevel(level)
    os.replace(target, output_path)
  return output_path


def accuracy(onnx_path: str | os.PathLike, images: Any, labels: Any, *,
             batch_size: int = 256) -> float:
  """The fraction of ``images`` (float32 ``[N, H, W, C]``) whose arg-max output in onnxruntime
  (CPU) is the integer label in ``labels`` (``[N]``)."""
  images, labels = np.asarray(images, np.float32), np.asarray(labels)
  if images.ndim != 4 or labels.shape != images.shape[:1] or not len(labels):
    raise ValueError(f"images must be [N, H, W, C] and labels [N] with N >= 1, got images"
                     f" {images.shape} and labels {labels.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
  sess = session(onnx_path)
  hits = sum(int(np.sum(np.argmax(run_onnx(sess, images[i:i + batch_size]), axis=-1)
                        == labels[i:i + batch_size]))
             for i in range(0, len(images), batch_size))
  return hits / len(images)


@dataclasses.dataclass(frozen=True)
class Latency:
  """Milliseconds per batch of ``batch_size`` over ``runs`` timed runs after ``warmup``."""

  batch_size: int
  warmup: int
  runs: int
  mean_ms: float
  median_ms: float

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def latency(onnx_path: str | os.PathLike, input_shape: Any, *, batch_size: int = 1,
            warmup: int = WARMUP_RUNS, runs: int = TIMED_RUNS, seed: int = 0) -> Latency:
  """The reference's benchmark: one seeded ``N(0, 1)`` batch run ``warmup`` times, then
  ``runs`` times timed one by one."""
  if batch_size < 1 or warmup < 0 or runs < 1:
    raise ValueError(f"need batch_size >= 1, warmup >= 0 and runs >= 1, got batch_size="
                     f"{batch_size}, warmup={warmup}, runs={runs}")
  shape = check_input_shape(input_shape)
  sess = session(onnx_path)
  x = np.random.default_rng(seed).standard_normal((batch_size, *shape)).astype(np.float32)
  for _ in range(warmup):
    run_onnx(sess, x)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    run_onnx(sess, x)
    times.append(time.perf_counter() - start)
  return Latency(batch_size=batch_size, warmup=warmup, runs=runs,
                 mean_ms=1000 * float(np.mean(times)), median_ms=1000 * float(np.median(times)))
