"""A multilayer perceptron classifier (flax Linen)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn


class MLP(nn.Module):
  """Flatten -> [Dense -> ReLU -> Dropout] per hidden layer -> Dense head.

  Attributes:
    num_classes: number of logits, >= 1.
    hidden: widths of the hidden layers, each >= 1 (``()`` gives a linear
      classifier). Stored as a tuple, so a list is accepted and the module
      stays hashable.
    dropout: dropout rate in [0, 1) after each hidden activation; 0 adds no
      Dropout layer.

  ``__call__(x, train)`` takes ``x`` of any shape ``[B, ...]`` (flattened to
  ``[B, prod(...)]``) and returns logits ``[B, num_classes]``. Dropout is
  active only when ``train=True`` and draws from the ``"dropout"`` RNG stream.
  Layers use ``dtype=None``, so they compute in the dtype of the (cast) inputs
  and params.
  """

  num_classes: int
  hidden: Sequence[int] = (256, 256)
  dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "hidden", tuple(self.hidden))
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got num_classes={self.num_classes}")
    if any(h < 1 for h in self.hidden):
      raise ValueError(f"hidden widths must all be >= 1, got hidden={self.hidden}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
      if self.dropout > 0.0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)
