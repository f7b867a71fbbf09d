"""Models: the :class:`Model` contract, adapters, the built-in networks and their registry.

Names (as the reference's): ``mini_cnn``, ``resnet_18``, ``efficientnet_b0``,
``convnext_tiny``, ``vit_tiny``; plus ``mlp``. :func:`build_model` builds one
by name; :func:`available_models` lists those an architecture search at a
given input resolution draws from. Torch checkpoints load through
:func:`orchard_jax.models.torch_weights.load_torch_state_dict` (imported
lazily: it needs torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import linen as nn

from orchard_jax.models.base import LinenModel, Model, NNXModel, as_model
from orchard_jax.models.convnext import ConvNeXtTiny
from orchard_jax.models.efficientnet import EfficientNetB0
from orchard_jax.models.mini_cnn import MiniCNN
from orchard_jax.models.mlp import MLP
from orchard_jax.models.resnet import ResNet18, uses_low_res_stem
from orchard_jax.models.vit import ViTTiny

# Below this input side the reference's search offers the low-resolution pool.
HIGH_RES_MIN_RESOLUTION = 224
# The reference's architecture search pools (orchard-ml's get_model_space_224 / _28), in its order.
_HIGH_RES_MODELS = ("resnet_18", "efficientnet_b0", "vit_tiny", "convnext_tiny")
_LOW_RES_MODELS = ("resnet_18", "mini_cnn")


def _kwargs(dropout: float | None, in_channels: int | None, **kw: Any) -> dict[str, Any]:
  """Module keyword arguments; ``dropout=None`` keeps the architecture's default."""
  return {**kw, "in_channels": in_channels, **({} if dropout is None else {"dropout": dropout})}


def _mlp(num_classes, in_channels, dropout, resolution, **kw) -> nn.Module:
  del in_channels, resolution  # the MLP flattens whatever it receives
  return MLP(num_classes=num_classes, dropout=0.0 if dropout is None else dropout, **kw)


def _mini_cnn(num_classes, in_channels, dropout, resolution, **kw) -> nn.Module:
  del resolution
  return MiniCNN(num_classes=num_classes, **_kwargs(dropout, in_channels, **kw))


def _resnet_18(num_classes, in_channels, dropout, resolution, *, low_res=None, **kw) -> nn.Module:
  if low_res is None:
    low_res = resolution is not None and uses_low_res_stem(resolution)
  return ResNet18(num_classes=num_classes, low_res=low_res, **_kwargs(dropout, in_channels, **kw))


def _efficientnet_b0(num_classes, in_channels, dropout, resolution, **kw) -> nn.Module:
  del resolution
  return EfficientNetB0(num_classes=num_classes, **_kwargs(dropout, in_channels, **kw))


def _convnext_tiny(num_classes, in_channels, dropout, resolution, **kw) -> nn.Module:
  del resolution
  return ConvNeXtTiny(num_classes=num_classes, **_kwargs(dropout, in_channels, **kw))


def _vit_tiny(num_classes, in_channels, dropout, resolution, **kw) -> nn.Module:
  module = ViTTiny(num_classes=num_classes, **_kwargs(dropout, in_channels, **kw))
  if resolution is not None and resolution % module.patch_size:
    raise ValueError(
        f"vit_tiny needs a resolution that is a multiple of patch_size={module.patch_size},"
        f" got resolution={resolution}"
    )
  return module


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "mini_cnn": _mini_cnn,
    "resnet_18": _resnet_18,
    "efficientnet_b0": _efficientnet_b0,
    "convnext_tiny": _convnext_tiny,
    "vit_tiny": _vit_tiny,
}
# Every name build_model accepts, sorted.
MODEL_NAMES: tuple[str, ...] = tuple(sorted(_BUILDERS))


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int | None = None,
    dropout: float | None = None,
    resolution: int | None = None,
    **kw: Any,
) -> Model:
  """Builds a built-in model by name and returns it behind the :class:`Model` contract.

  Args:
    name: one of :data:`MODEL_NAMES`: ``"mlp"`` (:class:`MLP`), ``"mini_cnn"``
      (:class:`MiniCNN`), ``"resnet_18"`` (:class:`ResNet18`),
      ``"efficientnet_b0"`` (:class:`EfficientNetB0`), ``"convnext_tiny"``
      (:class:`ConvNeXtTiny`), ``"vit_tiny"`` (:class:`ViTTiny`).
    num_classes: number of logits.
    in_channels: input channels; when given, the model checks its inputs
      against it (``mlp`` ignores it: it flattens its input).
    dropout: dropout rate in [0, 1) before the head; ``None`` keeps the
      architecture's default (0.2 for ``efficientnet_b0``, as torchvision;
      0 for the others).
    resolution: the input side in pixels, if known. ``resnet_18`` uses it to
      choose its stem as the reference does (the low-resolution stem up to
      32 px, see :func:`~orchard_jax.models.resnet.uses_low_res_stem`; an
      explicit ``low_res=`` wins; without either it builds torchvision's
      standard stem); ``vit_tiny`` checks it is a multiple of its patch size.
      The others ignore it.
    **kw: further module attributes, e.g. ``hidden=(512, 256)`` for ``mlp``,
      ``stochastic_depth=0.1`` for ``efficientnet_b0`` / ``convnext_tiny``.

  Returns:
    A :class:`LinenModel`; its ``.module`` is the Linen module.

  Raises:
    ValueError: for an unknown ``name`` (the message lists the known names).
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model name={name!r}; known names: {sorted(_BUILDERS)}")
  module = _BUILDERS[name](num_classes, in_channels, dropout, resolution, **kw)
  return as_model(module)


def available_models(resolution: int) -> list[str]:
  """The architectures an architecture search draws from at ``resolution`` px, as the reference.

  ``["resnet_18", "efficientnet_b0", "vit_tiny", "convnext_tiny"]`` from
  224 px on, ``["resnet_18", "mini_cnn"]`` below (the reference's 224 and
  28 px search spaces, in its order). Build each with
  ``build_model(name, ..., resolution=resolution)`` so that ``resnet_18``
  gets the stem the reference uses at that resolution.

  Raises:
    ValueError: if ``resolution < 1``.
  """
  if resolution < 1:
    raise ValueError(f"resolution must be >= 1, got resolution={resolution}")
  return list(_HIGH_RES_MODELS if resolution >= HIGH_RES_MIN_RESOLUTION else _LOW_RES_MODELS)


__all__ = [
    "MLP",
    "MODEL_NAMES",
    "ConvNeXtTiny",
    "EfficientNetB0",
    "LinenModel",
    "MiniCNN",
    "Model",
    "NNXModel",
    "ResNet18",
    "ViTTiny",
    "as_model",
    "available_models",
    "build_model",
]
