"""Exporting a trained model: StableHLO through ``jax.export``, ONNX through jax2onnx.

Each export is checked against the JAX model as the reference checks its ONNX file. The ONNX
side (and StableHLO serialization) needs the export extra: ``pip install -e ".[export]"``;
nothing here imports onnx, onnxruntime or jax2onnx until a function that needs them runs.
"""

from orchard_jax.export.common import (CHECK_SAMPLES, ONNX_TOLERANCE, STABLEHLO_TOLERANCE, Check,
                                       ExportError, inference_function)
from orchard_jax.export.stablehlo import (check_stablehlo, export_stablehlo, exported_function,
                                          load_stablehlo)

__all__ = [
    "CHECK_SAMPLES",
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
