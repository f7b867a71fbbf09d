"""ConvNeXt-Tiny (torchvision layout; flax Linen, NHWC).

Submodules are named after torchvision's ``convnext_tiny`` attributes, a
numeric index joining its parent with ``_`` (torch ``features.5.3.block.3``
is flax ``features_5_3/block_3``), so
:mod:`orchard_jax.models.torch_weights` maps its ``state_dict`` by name.
"""

from __future__ import annotations

import functools

import jax
from flax import linen as nn

from orchard_jax.models.efficientnet import stochastic_depth
from orchard_jax.models.layers import global_avg_pool
from orchard_jax.models.resnet import check_classifier_args, check_input

# torchvision: trunc_normal_(std=0.02) for every Conv2d and Linear weight, zero biases.
_INIT = nn.initializers.truncated_normal(stddev=0.02)
LN_EPSILON = 1e-6

# convnext_tiny: (channels, blocks) per stage.
TINY_STAGES = ((96, 3), (192, 3), (384, 9), (768, 3))

_layer_norm = functools.partial(nn.LayerNorm, epsilon=LN_EPSILON)


class CNBlock(nn.Module):
  """torchvision's ``CNBlock``: ``x + drop(layer_scale * mlp(ln(dwconv7x7(x))))``.

  Children: ``block_0`` (depthwise 7x7 conv), ``block_2`` (LayerNorm),
  ``block_3`` / ``block_5`` (the ``4 * dim`` MLP, exact GELU between) and the
  ``layer_scale`` parameter (``[dim]``; torch stores ``[dim, 1, 1]``),
  initialised to ``layer_scale_init``.
  """

  drop_rate: float
  layer_scale_init: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dim = x.shape[-1]
    y = nn.Conv(dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=dim,
                kernel_init=_INIT, name="block_0")(x)
    y = _layer_norm(name="block_2")(y)
    y = nn.Dense(4 * dim, kernel_init=_INIT, name="block_3")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(dim, kernel_init=_INIT, name="block_5")(y)
    scale = self.param("layer_scale", nn.initializers.constant(self.layer_scale_init), (dim,))
    y = scale.astype(y.dtype) * y
    return stochastic_depth(self.drop_rate, train)(y) + x


class ConvNeXtTiny(nn.Module):
  """torchvision's ``convnext_tiny``.

  ::

    features_0: conv 4x4/4 (96) -> LayerNorm
    features_1, 3, 5, 7: 3, 3, 9, 3 CNBlocks at 96, 192, 384, 768 channels
    features_2, 4, 6: LayerNorm -> conv 2x2/2 (downsampling)
    global average pool -> classifier_0 (LayerNorm) -> dropout -> classifier_2 (Dense)

  Trainable parameters: 28,589,128 for 3 channels and 1000 classes. Layer
  norms use epsilon 1e-6 and reduce in float32 whatever the compute dtype;
  GELU is the exact (erf) one, as torch's ``nn.GELU()``. Stochastic depth on
  each block's branch, its rate growing linearly with the block index ``i``
  (0..17) as ``stochastic_depth * i / 17``; identity in eval mode. Layer
  scale starts at ``1e-6``. Initialisation as torchvision (truncated normal,
  std 0.02; flax truncates at 2 std, torch at +-2 absolute).

  Inputs must be at least 32 px on each side (Tiny downsamples by 32).

  Attributes:
    num_classes: number of logits, >= 1.
    dropout: dropout rate in [0, 1) before the head (torchvision has none).
    stochastic_depth: the last block's stochastic depth rate, in [0, 1);
      torchvision's ``convnext_tiny`` uses 0.1.
    layer_scale: initial layer-scale value (torchvision: 1e-6).
    in_channels: if given, ``__call__`` checks the input channel count.
    stages: ``(channels, blocks)`` per stage; :data:`TINY_STAGES` is
      ConvNeXt-Tiny (smaller tables make the fast variants the tests train).
  """

  num_classes: int
  dropout: float = 0.0
  stochastic_depth: float = 0.1
  layer_scale: float = 1e-6
  in_channels: int | None = None
  stages: tuple[tuple[int, int], ...] = TINY_STAGES

  def __post_init__(self):
    object.__setattr__(self, "stages", tuple(tuple(int(v) for v in s) for s in self.stages))
    if not self.stages or any(len(s) != 2 or min(s) < 1 for s in self.stages):
      raise ValueError(
          f"stages must be a non-empty tuple of (channels, blocks) pairs of ints >= 1, got stages={self.stages}"
      )
    check_classifier_args(self.num_classes, self.dropout, self.in_channels)
    if not 0.0 <= self.stochastic_depth < 1.0:
      raise ValueError(f"stochastic_depth must be in [0, 1), got stochastic_depth={self.stochastic_depth}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """``x``: ``[B, H, W, C]`` with ``H, W >= 32`` -> logits ``[B, num_classes]``."""
    check_input("ConvNeXtTiny", x, self.in_channels)
    factor = 4 * 2 ** (len(self.stages) - 1)
    if min(x.shape[1:3]) < factor:
      raise ValueError(
          f"ConvNeXtTiny needs inputs of at least {factor}x{factor} px"
          f" (it downsamples by {factor}), got shape {x.shape} (NHWC)"
      )
    x = nn.Conv(self.stages[0][0], (4, 4), (4, 4), padding="VALID", kernel_init=_INIT,
                name="features_0_0")(x)
    x = _layer_norm(name="features_0_1")(x)
    total = sum(blocks for _, blocks in self.stages)
    block_id = 0
    for stage, (dim, blocks) in enumerate(self.stages):
      index = 1 + 2 * stage
      for j in range(blocks):
        rate = self.stochastic_depth * block_id / max(total - 1, 1)
        x = CNBlock(rate, self.layer_scale, name=f"features_{index}_{j}")(x, train)
        block_id += 1
      if stage + 1 < len(self.stages):
        x = _layer_norm(name=f"features_{index + 1}_0")(x)
        x = nn.Conv(self.stages[stage + 1][0], (2, 2), (2, 2), padding="VALID", kernel_init=_INIT,
                    name=f"features_{index + 1}_1")(x)
    x = global_avg_pool(x)
    x = _layer_norm(name="classifier_0")(x)
    x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
    return nn.Dense(self.num_classes, kernel_init=_INIT, name="classifier_2")(x)
