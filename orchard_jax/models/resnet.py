"""ResNet-18 (torchvision layout), with the reference's low-resolution stem (flax Linen, NHWC).

Submodules are named after torchvision's ``resnet18`` attributes, a numeric
index joining its parent with ``_`` (torch ``layer1.0.downsample.1`` is flax
``layer1_0/downsample_1``), so :mod:`orchard_jax.models.torch_weights` maps a
torchvision ``state_dict`` onto the flax tree by name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from flax import linen as nn

from orchard_jax.models.layers import BatchNorm, global_avg_pool

# torch BatchNorm2d(momentum=0.1, eps=1e-5) keeps 0.9 of the old running statistic.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convolutions.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight.
_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Largest input side that gets the low-resolution stem: 28-64 px inputs (the reference
# switches at 32 px; a 7x7 stride-2 stem plus max-pool leaves a 64 px image 16 px wide
# before the first stage, too little for four stages, so orchard_jax keeps 64 px low-res).
LOW_RES_MAX_RESOLUTION = 64


def uses_low_res_stem(resolution: int) -> bool:
  """Whether the reference builds ResNet-18's low-resolution stem for ``resolution`` px inputs.

  True up to 64 px (3x3 stride-1 stem conv, no max-pool), False above (224 px
  keeps torchvision's 7x7 stride-2 stem and 3x3 max-pool). The reference
  switches at 32 px; see docs/differences.md.
  """
  if resolution < 1:
    raise ValueError(f"resolution must be >= 1, got resolution={resolution}")
  return resolution <= LOW_RES_MAX_RESOLUTION


def batch_norm_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array | None:
  """``mask`` [B] as a BatchNorm mask broadcastable to NHWC ``x`` (all True if none is True)."""
  if mask is None:
    return None
  if mask.shape != x.shape[:1]:
    raise ValueError(f"mask must have shape ({x.shape[0]},), got mask.shape={mask.shape}")
  mask = jnp.asarray(mask, jnp.bool_)
  return jnp.where(mask.any(), mask, True)[:, None, None, None]


def check_input(name: str, x: jax.Array, in_channels: int | None) -> None:
  """Raises ``ValueError`` unless ``x`` is NHWC with ``in_channels`` channels (when given)."""
  if x.ndim != 4:
    raise ValueError(f"{name} expects NHWC inputs of rank 4, got shape {x.shape}")
  if in_channels is not None and x.shape[-1] != in_channels:
    raise ValueError(
        f"{name} was built with in_channels={in_channels}, got inputs of shape {x.shape}"
        f" (NHWC, {x.shape[-1]} channels)"
    )


def check_classifier_args(num_classes: int, dropout: float, in_channels: int | None) -> None:
  """The attribute checks every classifier here shares, with messages naming the value."""
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got num_classes={num_classes}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got dropout={dropout}")
  if in_channels is not None and in_channels < 1:
    raise ValueError(f"in_channels must be >= 1 or None, got in_channels={in_channels}")


class MaskedClassifier(nn.Module):
  """An NHWC image classifier whose batch norms keep the padding rows of ``mask`` out of their
  statistics (as :class:`~orchard_jax.models.MiniCNN`'s).

  Its compact ``__call__`` checks the input (:func:`check_input`, naming the class), makes the
  BatchNorm mask (:func:`batch_norm_mask`) and returns the logits that the subclass's
  :meth:`logits` builds, its submodules defined there as in any compact method.
  """

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """``x``: ``[B, H, W, C]`` -> logits ``[B, num_classes]``; ``mask`` as in MiniCNN."""
    check_input(type(self).__name__, x, self.in_channels)
    return self.logits(x, train, batch_norm_mask(x, mask))

  def logits(self, x: jax.Array, train: bool, bn_mask: jax.Array | None) -> jax.Array:
    """The network on checked inputs ``x``, its batch norms masked by ``bn_mask``."""
    raise NotImplementedError


def max_pool_3x3_stride_2(x_BxHxWxC: jax.Array) -> jax.Array:
  """torch's ``nn.MaxPool2d(3, stride=2, padding=1)`` on NHWC: ``[B, (H-1)//2+1, (W-1)//2+1, C]``.

  The maximum of the nine strided window slices of the ``-inf``-padded input.
  Same values as ``flax.linen.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))``
  but its backward pass is elementwise (no ``select_and_scatter``, which is
  slow on XLA:CPU). On ties the gradient is shared among the maxima (see
  :func:`orchard_jax.models.layers.max_pool_2x2`).
  """
  b, h, w, c = x_BxHxWxC.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out = None
  for i in range(3):
    for j in range(3):
      window = lax.slice(xp, (0, i, j, 0), (b, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
      out = window if out is None else jnp.maximum(out, window)
  return out


class BasicBlock(nn.Module):
  """torchvision's ``BasicBlock``: two 3x3 convs with BN, a projected shortcut when the shape changes."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, bn_mask: jax.Array | None) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_CONV_INIT)
    bn = functools.partial(
        BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON
    )
    s = (self.strides, self.strides)
    y = conv(self.features, (3, 3), s, padding=((1, 1), (1, 1)), name="conv1")(x)
    y = nn.relu(bn(name="bn1")(y, mask=bn_mask))
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    y = bn(name="bn2")(y, mask=bn_mask)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), s, padding="VALID", name="downsample_0")(x)
      x = bn(name="downsample_1")(x, mask=bn_mask)
    return nn.relu(y + x)


class ResNet18(MaskedClassifier):
  """torchvision's ``resnet18``, or the reference's low-resolution variant.

  Standard stem (``low_res=False``, for 64-224 px)::

    conv1 7x7/2 (64, no bias) -> bn1 -> ReLU -> max-pool 3x3/2

  Low-resolution stem (``low_res=True``, the reference's choice for 28-32 px;
  see :func:`uses_low_res_stem`)::

    conv1 3x3/1 (64, no bias) -> bn1 -> ReLU            (no max-pool)

  then four stages of two :class:`BasicBlock` each (64, 128, 256, 512
  features; the first block of stages 2-4 has stride 2), global average
  pooling, dropout (only if ``dropout > 0``; the reference has none) and the
  ``fc`` head. Convolutions pad like torch (explicit symmetric padding, not
  ``"SAME"``). Trainable parameters: 11,689,512 for 3 channels and 1000
  classes (torchvision's count); the low-resolution stem has 7,680 fewer.

  BatchNorm: momentum 0.9 (torch's 0.1), epsilon 1e-5, statistics kept and
  reduced in float32; ``mask`` keeps padding rows out of them (as
  :class:`~orchard_jax.models.MiniCNN`). The running variance is updated with
  the biased batch variance (torch: unbiased). Layers use ``dtype=None``, so
  they compute in the dtype of the (cast) inputs and params.

  Initialisation as torchvision: Kaiming-normal (fan-out) convolutions, BN
  scale 1 / bias 0; the head uses torch's default ``Linear`` weight range
  with a zero bias.

  Attributes:
    num_classes: number of logits, >= 1.
    low_res: use the low-resolution stem.
    dropout: dropout rate in [0, 1) before ``fc``.
    in_channels: if given, ``__call__`` checks the input channel count.
    stage_sizes: blocks per stage, stage ``i`` having ``width * 2**i``
      features; ``(2, 2, 2, 2)`` is ResNet-18.
    width: features of the stem and the first stage; 64 is ResNet-18.
      (Other ``stage_sizes`` / ``width`` make the small, fast-compiling
      variants the tests train; torch checkpoints fit only ResNet-18.)
  """

  num_classes: int
  low_res: bool = False
  dropout: float = 0.0
  in_channels: int | None = None
  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  width: int = 64

  def __post_init__(self):
    object.__setattr__(self, "stage_sizes", tuple(self.stage_sizes))
    check_classifier_args(self.num_classes, self.dropout, self.in_channels)
    if not self.stage_sizes or any(n < 1 for n in self.stage_sizes):
      raise ValueError(f"stage_sizes must be a non-empty tuple of ints >= 1, got stage_sizes={self.stage_sizes}")
    if self.width < 1:
      raise ValueError(f"width must be >= 1, got width={self.width}")
    super().__post_init__()

  def logits(self, x: jax.Array, train: bool, bn_mask: jax.Array | None) -> jax.Array:
    """The stem, the four stages, pooling, dropout and ``fc``."""
    if self.low_res:
      x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=_CONV_INIT, name="conv1")(x)
    else:
      x = nn.Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                  kernel_init=_CONV_INIT, name="conv1")(x)
    x = BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                  name="bn1")(x, mask=bn_mask)
    x = nn.relu(x)
    if not self.low_res:
      x = max_pool_3x3_stride_2(x)
    for stage, blocks in enumerate(self.stage_sizes, start=1):
      features = self.width * 2 ** (stage - 1)
      for index in range(blocks):
        strides = 2 if stage > 1 and index == 0 else 1
        x = BasicBlock(features, strides, name=f"layer{stage}_{index}")(x, train, bn_mask)
    x = global_avg_pool(x)
    if self.dropout > 0.0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=_LINEAR_INIT, name="fc")(x)
