"""Models: the :class:`Model` contract, adapters, and the built-in networks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import linen as nn

from orchard_jax.models.base import LinenModel, Model, NNXModel, as_model
from orchard_jax.models.mini_cnn import MiniCNN
from orchard_jax.models.mlp import MLP


def _mlp(num_classes: int, in_channels: int | None, dropout: float, **kw: Any) -> nn.Module:
  del in_channels  # the MLP flattens whatever it receives
  return MLP(num_classes=num_classes, dropout=dropout, **kw)


def _mini_cnn(num_classes: int, in_channels: int | None, dropout: float, **kw: Any) -> nn.Module:
  return MiniCNN(num_classes=num_classes, dropout=dropout, in_channels=in_channels, **kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "mini_cnn": _mini_cnn}


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int | None = None,
    dropout: float = 0.0,
    **kw: Any,
) -> Model:
  """Builds a built-in model by name and returns it behind the :class:`Model` contract.

  Args:
    name: ``"mlp"`` (:class:`MLP`) or ``"mini_cnn"`` (:class:`MiniCNN`).
    num_classes: number of logits.
    in_channels: input channels; checked by ``mini_cnn`` at call time, unused
      by ``mlp`` (which flattens its input).
    dropout: dropout rate in [0, 1).
    **kw: further module attributes, e.g. ``hidden=(512, 256)`` for ``mlp``.

  Returns:
    A :class:`LinenModel`; its ``.module`` is the Linen module.

  Raises:
    ValueError: for an unknown ``name`` (the message lists the known names).
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model name={name!r}; known names: {sorted(_BUILDERS)}")
  module = _BUILDERS[name](num_classes, in_channels, dropout, **kw)
  return as_model(module)


__all__ = [
    "MLP",
    "LinenModel",
    "MiniCNN",
    "Model",
    "NNXModel",
    "as_model",
    "build_model",
]
