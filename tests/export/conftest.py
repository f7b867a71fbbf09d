"""Trained-looking models for the export tests: the built-in MiniCNN, MLP and ResNet-18 (the
low-resolution stem) and a user's NNX model, each with running statistics moved away from
their initial values, so an export that dropped the model state
would not reproduce the model."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from orchard_jax.models import as_model, build_model

NUM_CLASSES = 3
SHAPES = {"mini_cnn": (16, 16, 3), "mlp": (8, 8, 3), "resnet_18": (28, 28, 3), "nnx": (12, 12, 3)}


class NNXConvNet(nnx.Module):
  """A user's NNX model: Conv -> BatchNorm -> ReLU -> global mean -> Dropout -> Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.head(self.dropout(x.mean(axis=(1, 2))))


@dataclasses.dataclass(frozen=True)
class Trained:
  model: Any
  params: Any
  model_state: Any
  input_shape: tuple[int, int, int]

  @property
  def weights(self) -> tuple[Any, Any, Any, tuple[int, int, int]]:
    return self.model, self.params, self.model_state, self.input_shape

  @functools.cached_property
  def _apply(self):
    return jax.jit(lambda p, s, x: self.model.apply(p, s, x, train=False, rng=jax.random.key(0))[0])

  def logits(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(self._apply(self.params, self.model_state, x))


def _model(name: str):
  if name == "nnx":
    return as_model(NNXConvNet(nnx.Rngs(0)))
  return build_model(name, num_classes=NUM_CLASSES, resolution=SHAPES[name][0])


def _random(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct, rng: np.random.Generator):
  """A value for a Linen variable drawn as a trained one might be (He-scaled kernels, scales
  near 1, small biases and means, variances in [0.5, 1.5])."""
  name, shape = str(getattr(path[-1], "key", path[-1])), leaf.shape
  if name == "var":
    value = rng.uniform(0.5, 1.5, shape)
  elif name == "scale":
    value = 1.0 + 0.1 * rng.standard_normal(shape)
  elif name == "kernel":
    value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
  else:
    value = 0.1 * rng.standard_normal(shape)
  return value.astype(leaf.dtype)


def trained(name: str) -> Trained:
  """``name``'s model with random weights and running statistics away from their initial
  values. A Linen model's are drawn in numpy on the shapes of its init (running its init
  compiles a ResNet-18 for seconds); the NNX model's statistics are shifted."""
  model, shape = _model(name), SHAPES[name]
  x = np.zeros((2, *shape), np.float32)
  if name == "nnx":
    params, state = model.init(jax.random.key(0), x)
    return Trained(model, params, jax.tree.map(lambda a: a * 0.5 + 0.2, state), shape)
  rng = np.random.default_rng(0)
  params, state = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _random(path, leaf, rng), jax.eval_shape(model.init, jax.random.key(0), x))
  return Trained(model, params, state, shape)


@pytest.fixture(scope="session")
def models() -> dict[str, Trained]:
  return {}


@pytest.fixture(params=list(SHAPES))
def model(request, models) -> Trained:
  """Each model, built once per session."""
  if request.param not in models:
    models[request.param] = trained(request.param)
  return models[request.param]
