"""StableHLO export through ``jax.export``: one file that runs without the model's Python code.

:func:`export_stablehlo` serializes the model's inference function (see
:func:`~orchard_jax.export.common.inference_function`) with the batch dimension symbolic, so
one file takes any batch size, and the parameters baked in as constants. Reading it back needs
only JAX::

  exported = jax.export.deserialize(pathlib.Path("model.stablehlo").read_bytes())
  logits_BxK = exported.call(images_BxHxWxC)   # float32 NHWC

It is lowered for every platform in :data:`PLATFORMS` by default, so the same file runs on a
CPU, an NVIDIA or AMD GPU or a TPU. Serialization needs ``flatbuffers`` (the export extra).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from orchard_jax.export.common import (STABLEHLO_TOLERANCE, Check, ExportError, check_input_shape,
                                       check_inputs, compare, inference_function, jax_outputs,
                                       require)
from orchard_jax.fileio import atomic_write_bytes
from orchard_jax.models.base import Model

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
BATCH_DIM = "batch"  # the symbolic batch dimension's name in the exported signature


def exported_function(model: Model, params: Any, model_state: Any, input_shape: Any, *,
                      probabilities: bool = False,
                      platforms: tuple[str, ...] = PLATFORMS) -> jax.export.Exported:
  """The ``jax.export.Exported`` inference function, ``float32 [batch, H, W, C]`` in."""
  shape = check_input_shape(input_shape)
  if not platforms or not set(platforms) <= set(PLATFORMS):
    raise ValueError(f"platforms must be a non-empty subset of {PLATFORMS}, got {platforms!r}")
  batch, = jax.export.symbolic_shape(BATCH_DIM)
  spec = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  fn = jax.jit(inference_function(model, params, model_state, probabilities=probabilities))
  return jax.export.export(fn, platforms=tuple(platforms))(spec)


def export_stablehlo(model: Model, params: Any, model_state: Any, input_shape: Any,
                     path: str | os.PathLike, *, probabilities: bool = False,
                     platforms: tuple[str, ...] = PLATFORMS) -> pathlib.Path:
  """Writes the serialized inference function to ``path`` (atomically) and returns the path.

  Args:
    model, params, model_state: the trained model behind the :class:`Model` contract.
    input_shape: one sample's ``(H, W, C)``.
    path: the file to write (conventionally ``model.stablehlo``).
    probabilities: export softmax probabilities instead of logits.
    platforms: the platforms the file runs on (a subset of :data:`PLATFORMS`).
  """
  require("flatbuffers", "jax.export serialization")
  exported = exported_function(model, params, model_state, input_shape,
                               probabilities=probabilities, platforms=platforms)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return atomic_write_bytes(path, bytes(exported.serialize()))


def load_stablehlo(path: str | os.PathLike) -> jax.export.Exported:
  """The exported function stored at ``path``; call it with ``.call(images_BxHxWxC)``."""
  require("flatbuffers", "jax.export deserialization")
  try:
    return jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
  except (OSError, ValueError) as e:
    raise ExportError(f"cannot read the StableHLO file {path}: {e}") from e


def check_stablehlo(path: str | os.PathLike, model: Model, params: Any, model_state: Any,
                    input_shape: Any, *, probabilities: bool = False,
                    tolerance: float = STABLEHLO_TOLERANCE) -> Check:
  """The file at ``path`` against ``model.apply`` on the seeded check inputs."""
  exported = load_stablehlo(path)
  inputs = check_inputs(check_input_shape(input_shape))
  expected = jax_outputs(model, params, model_state, inputs, probabilities=probabilities)
  actual = [jax.device_get(exported.call(x)) for x in inputs]
  return compare("stablehlo", expected, actual, tolerance)
