"""What the export formats share: the inference function, the check inputs, a check's result.

The exported function maps ``float32 [B, H, W, C]`` images to ``float32 [B, num_classes]``
logits (or softmax probabilities), with the parameters and model state baked in and the model
in eval mode. Each export is checked as the reference (orchard-ml ``export/validation.py``)
checks its ONNX file: :data:`CHECK_SAMPLES` inputs of batch 1 drawn from ``N(0, 1)`` with a
fixed seed, the largest absolute difference from the JAX model against a tolerance.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax.models.base import Model

# The reference's check: 10 seeded inputs; its ONNX tolerance, and the StableHLO one of orchard_jax.
CHECK_SAMPLES = 10
CHECK_SEED = 0
ONNX_TOLERANCE = 1e-4
STABLEHLO_TOLERANCE = 1e-6
INSTALL_HINT = 'pip install -e ".[export]"'


class ExportError(RuntimeError):
  """An export could not be written or read back (the message names the format and the cause)."""


def require(module: str, purpose: str) -> Any:
  """Imports ``module`` or raises a one-line ImportError that says how to install the extra."""
  if importlib.util.find_spec(module) is None:
    raise ImportError(f"{purpose} needs the Python package {module!r}: {INSTALL_HINT}")
  return importlib.import_module(module)


def check_input_shape(input_shape: Any) -> tuple[int, int, int]:
  """``input_shape`` as a ``(H, W, C)`` tuple of positive ints, or a one-line ValueError."""
  shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
  if not shape or len(shape) != 3 or not all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape):
    raise ValueError(
        "input_shape must be the per-sample image shape (H, W, C) of three positive ints (NHWC"
        f" without the batch), got input_shape={input_shape!r}")
  return tuple(int(d) for d in shape)


def inference_function(model: Model, params: Any, model_state: Any, *,
                       probabilities: bool = False) -> Callable[[jax.Array], jax.Array]:
  """``x_BxHxWxC -> logits_BxK`` (softmax probabilities with ``probabilities=True``) in eval mode,
  with ``params`` and ``model_state`` closed over, so that an export bakes them in."""

  def predict(x_BxHxWxC: jax.Array) -> jax.Array:
    logits_BxK, _ = model.apply(params, model_state, x_BxHxWxC.astype(jnp.float32),
                                train=False, rng=jax.random.key(0))
    logits_BxK = logits_BxK.astype(jnp.float32)
    return jax.nn.softmax(logits_BxK, axis=-1) if probabilities else logits_BxK

  return predict


def check_inputs(input_shape: tuple[int, int, int], *, samples: int = CHECK_SAMPLES,
                 seed: int = CHECK_SEED) -> list[np.ndarray]:
  """``samples`` float32 ``[1, H, W, C]`` inputs from ``N(0, 1)``, the same for a given ``seed``."""
  if samples < 1:
    raise ValueError(f"samples must be >= 1, got samples={samples}")
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((1, *input_shape)).astype(np.float32) for _ in range(samples)]


def jax_outputs(model: Model, params: Any, model_state: Any, inputs: list[np.ndarray], *,
                probabilities: bool = False) -> list[np.ndarray]:
  """The JAX model's outputs on each input: ``model.apply`` in eval mode under ``jax.jit``
  with the weights as constants, the program every export is made from.

  The weights are constants here, not arguments, because XLA folds constants: ``model.apply``
  jitted with the weights as arguments rounds differently in float32, by about 1e-6 of the
  logits' size (3.6e-5 at logits of 27 for a ResNet-18, as much as eager ``model.apply``
  differs from jitted), which would swamp the StableHLO tolerance of 1e-6 while saying
  nothing about the file."""
  run = jax.jit(inference_function(model, params, model_state, probabilities=probabilities))
  return [np.asarray(run(x)) for x in inputs]


@dataclasses.dataclass(frozen=True)
class Check:
  """One export compared with the JAX model: the largest absolute difference over ``samples``
  seeded inputs against ``tolerance``."""

  format: str
  samples: int
  max_abs_diff: float
  tolerance: float
  max_abs_output: float  # the JAX model's largest output: the scale max_abs_diff is read on

  @property
  def passed(self) -> bool:
    return bool(self.max_abs_diff <= self.tolerance)

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "passed": self.passed}


def compare(fmt: str, expected: list[np.ndarray], actual: list[np.ndarray],
            tolerance: float) -> Check:
  """The :class:`Check` of ``actual`` against ``expected``; an ExportError if a shape differs."""
  diff, scale = 0.0, max(float(np.max(np.abs(want))) for want in expected)
  for want, got in zip(expected, actual, strict=True):
    if want.shape != got.shape:
      raise ExportError(f"{fmt} output shape {got.shape} differs from the JAX model's {want.shape}")
    d = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64))))
    diff = d if np.isnan(d) or d > diff else diff  # a NaN stays: it fails the check
  return Check(format=fmt, samples=len(expected), max_abs_diff=diff, tolerance=tolerance,
               max_abs_output=scale)
