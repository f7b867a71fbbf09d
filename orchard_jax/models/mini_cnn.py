"""The reference's MiniCNN (flax Linen, NHWC)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from orchard_jax.models.layers import BatchNorm, Conv3x3, global_avg_pool, max_pool_2x2

# torch BatchNorm2d(momentum=0.1) keeps 0.9 of the old running statistic.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


class MiniCNN(nn.Module):
  """Three conv blocks, global average pooling, dropout, a Dense head.

  The layers of the reference's PyTorch ``MiniCNN``, in NHWC::

    conv3x3(32, SAME) -> BN -> ReLU -> maxpool 2x2
    conv3x3(64, SAME) -> BN -> ReLU -> maxpool 2x2
    conv3x3(128, SAME) -> BN -> ReLU -> global average pool
    dropout (only if dropout > 0) -> Dense(num_classes)

  Convolutions have biases, as in the reference; the trainable parameter count
  equals the torch module's. Submodules are named ``conv1..3``, ``bn1..3`` and
  ``fc`` after the torch attributes. Max pooling floors odd sizes like
  ``nn.MaxPool2d(2, 2)`` (see :func:`max_pool_2x2`).

  BatchNorm: momentum 0.9 (torch's 0.1), epsilon 1e-5. In train mode the
  output is normalised with the biased batch variance, as in torch, and the
  running mean matches torch's. The running *variance* does not: flax updates
  it with the biased batch variance ``var``, torch with the unbiased
  ``var * n / (n - 1)`` (``n = B * H * W``), so flax's running variance is
  slightly smaller, by ``0.1 * var / (n - 1)`` per step. Running statistics
  are kept and reduced in float32 whatever the compute dtype.

  Deviation: weights start from flax's default initialisers (LeCun-normal
  kernels, zero biases), not torch's Kaiming-uniform ones.

  Attributes:
    num_classes: number of logits, >= 1.
    dropout: dropout rate in [0, 1) before the head; 0 adds no Dropout layer.
    in_channels: if given, ``__call__`` checks that inputs have this many
      channels (flax infers it from the input otherwise).
  """

  num_classes: int
  dropout: float = 0.0
  in_channels: int | None = None

  def __post_init__(self):
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got num_classes={self.num_classes}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout}")
    if self.in_channels is not None and self.in_channels < 1:
      raise ValueError(f"in_channels must be >= 1 or None, got in_channels={self.in_channels}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """``x``: ``[B, H, W, C]`` -> logits ``[B, num_classes]``.

    ``mask`` (bool ``[B]``, optional) keeps padding rows (False) out of the
    train-mode batch statistics, so a padded batch normalises, and updates the
    running statistics, exactly like the batch of its real rows. A mask with no
    True row is treated as all True (finite statistics rather than NaN).
    """
    if x.ndim != 4:
      raise ValueError(f"MiniCNN expects NHWC inputs of rank 4, got shape {x.shape}")
    if self.in_channels is not None and x.shape[-1] != self.in_channels:
      raise ValueError(
          f"MiniCNN was built with in_channels={self.in_channels}, got inputs of"
          f" shape {x.shape} (NHWC, {x.shape[-1]} channels)"
      )
    bn_mask = None
    if mask is not None:
      if mask.shape != x.shape[:1]:
        raise ValueError(f"mask must have shape ({x.shape[0]},), got mask.shape={mask.shape}")
      mask = jnp.asarray(mask, jnp.bool_)
      bn_mask = jnp.where(mask.any(), mask, True)[:, None, None, None]
    for i, features in enumerate((32, 64, 128), start=1):
      x = Conv3x3(features, name=f"conv{i}")(x, train)
      x = BatchNorm(
          use_running_average=not train,
          momentum=_BN_MOMENTUM,
          epsilon=_BN_EPSILON,
          name=f"bn{i}",
      )(x, mask=bn_mask)
      x = nn.relu(x)
      if i < 3:
        x = max_pool_2x2(x)
    x = global_avg_pool(x)
    if self.dropout > 0.0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc")(x)
