"""A user's own code, named by recipes in tests: model functions and data functions.

Recipes name these as ``path/to/user_models.py:build`` or, with this folder on
``sys.path``, ``user_models:build``. Some are wrong on purpose; the lines
marked ``# BUG`` are the ones the error messages must point at.
"""

from __future__ import annotations

import json

import numpy as np
from flax import linen as nn
from flax import nnx

from orchard_jax.models import as_model


class Net(nn.Module):
  """A small MLP: flattens its input."""
  num_classes: int
  hidden: tuple[int, ...] = (16,)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class NoTrainFlag(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class NNXNet(nnx.Module):
  def __init__(self, features: int, num_classes: int, rngs: nnx.Rngs):
    self.linear = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x):
    return self.linear(x.reshape((x.shape[0], -1)))


def build(num_classes, input_shape, hidden=(16,), dropout=0.0):
  """The recipes' model: a Linen module; takes options and a dropout."""
  return Net(num_classes=num_classes, hidden=tuple(hidden), dropout=dropout)


def build_nnx(num_classes, input_shape, seed=0):
  return NNXNet(int(np.prod(input_shape)), num_classes, nnx.Rngs(seed))


def build_model(num_classes, input_shape):
  """An object with init/apply (a Model)."""
  return as_model(Net(num_classes=num_classes))


def no_dropout(num_classes, input_shape):
  return Net(num_classes=num_classes)


def wrong_signature(num_classes):
  return Net(num_classes=num_classes)


def returns_int(num_classes, input_shape):
  return num_classes


def returns_class(num_classes, input_shape):
  return Net


def returns_untrainable(num_classes, input_shape):
  return NoTrainFlag(num_classes=num_classes)


def buggy_build(num_classes, input_shape, **options):
  widths = {"small": (8,)}
  return Net(num_classes=num_classes, hidden=widths[options.get("size", "large")])  # BUG


def build_reading_json(num_classes, input_shape):
  """Fails inside the standard library: the message names this file's line, not json's."""
  settings = json.loads("{hidden: 3}")  # BUG
  return Net(num_classes=num_classes, hidden=(settings["hidden"],))


def bug_loaders(batch_size, seed):
  """A data function with a bug: the batches have no 'label' key."""
  batch = {"image": np.zeros((batch_size, 8, 8), np.float32), "target": np.zeros(batch_size)}
  labels = batch["label"]  # BUG
  return [(batch["image"], labels)], [(batch["image"], labels)]


def bug_line(name: str) -> int:
  """The line of the ``# BUG`` in function ``name`` of this file."""
  lines = open(__file__).read().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"def {name}("))
  return next(i for i in range(start, len(lines)) if lines[i].endswith("# BUG")) + 1
