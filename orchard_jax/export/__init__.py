"""Exporting a trained model: StableHLO through ``jax.export``, ONNX through jax2onnx.

Each export is checked against the JAX model as the reference checks its ONNX file. The ONNX
side (and StableHLO serialization) needs the export extra: ``pip install -e ".[export]"``;
nothing here imports onnx, onnxruntime or jax2onnx until a function that needs them runs.
"""

from orchard_jax.export.common import (CHECK_SAMPLES, ONNX_TOLERANCE, STABLEHLO_TOLERANCE, Check,
                                       ExportError, inference_function)
from orchard_jax.export.bundle import FILES, FORMATS, ExportResult, export_all
from orchard_jax.export.onnx_export import (OPSET, UnsupportedOperationError, check_onnx,
                                            export_onnx)
from orchard_jax.export.runtime import Latency, accuracy, latency, quantize
from orchard_jax.export.stablehlo import (check_stablehlo, export_stablehlo, exported_function,
                                          load_stablehlo)

__all__ = [
    "CHECK_SAMPLES",
    "FILES",
    "FORMATS",
    "OPSET",
    "ExportResult",
    "Latency",
    "UnsupportedOperationError",
    "accuracy",
    "check_onnx",
    "export_all",
    "export_onnx",
    "latency",
    "quantize",
    "ONNX_TOLERANCE",
    "STABLEHLO_TOLERANCE",
    "Check",
    "ExportError",
    "check_stablehlo",
    "export_stablehlo",
    "exported_function",
    "inference_function",
    "load_stablehlo",
]
