"""EfficientNet-B0 (torchvision layout; flax Linen, NHWC).

Submodules are named after torchvision's ``efficientnet_b0`` attributes, a
numeric index joining its parent with ``_`` (torch ``features.2.1.block.3.1``
is flax ``features_2_1/block_3_1``), so
:mod:`orchard_jax.models.torch_weights` maps its ``state_dict`` by name.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from orchard_jax.models.layers import BatchNorm, global_avg_pool
from orchard_jax.models.resnet import (
    BN_EPSILON,
    BN_MOMENTUM,
    MaskedClassifier,
    check_classifier_args,
)

# torchvision: kaiming_normal_(mode="fan_out") convolutions, U(+-1/sqrt(out)) Linear weights.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")

# torchvision's B0 table: (expand_ratio, kernel, stride, in_channels, out_channels, num_layers).
B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's ``_make_divisible``: the nearest multiple of ``divisor``, at most 10 % below ``value``."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * value else new


def stochastic_depth(rate: float, train: bool, name: str | None = None) -> nn.Dropout:
  """torchvision's ``StochasticDepth(rate, "row")`` as a Linen layer (for inputs of rank 4).

  In train mode each sample's branch is zeroed with probability ``rate`` and
  the survivors are scaled by ``1 / (1 - rate)`` (``rate == 1`` zeroes all);
  the draws come from the ``"dropout"`` RNG stream, so they are a pure
  function of the step's key. Identity in eval mode.
  """
  return nn.Dropout(rate, broadcast_dims=(1, 2, 3), deterministic=not train or rate == 0.0,
                    name=name)


def conv_bn_act(x: jax.Array, prefix: str, train: bool, bn_mask: jax.Array | None, features: int,
                kernel: int = 1, strides: int = 1, groups: int = 1, activation: bool = True) -> jax.Array:
  """torchvision's ``Conv2dNormActivation``: conv (no bias, torch padding) -> BN -> [SiLU].

  Call it inside a compact ``__call__``: it creates the conv ``<prefix>_0``
  and the BatchNorm ``<prefix>_1`` in the caller's scope, as torch's
  ``<prefix>.0`` / ``<prefix>.1``.
  """
  pad = (kernel - 1) // 2
  x = nn.Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
              feature_group_count=groups, use_bias=False, kernel_init=_CONV_INIT,
              name=f"{prefix}_0")(x)
  x = BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                name=f"{prefix}_1")(x, mask=bn_mask)
  return nn.silu(x) if activation else x


class SqueezeExcitation(nn.Module):
  """torchvision's ``SqueezeExcitation`` with SiLU: ``x * sigmoid(fc2(silu(fc1(mean_hw(x)))))``."""

  squeeze: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = x.mean(axis=(1, 2), keepdims=True)
    s = nn.silu(nn.Conv(self.squeeze, (1, 1), kernel_init=_CONV_INIT, name="fc1")(s))
    s = nn.Conv(x.shape[-1], (1, 1), kernel_init=_CONV_INIT, name="fc2")(s)
    return x * nn.sigmoid(s)


class MBConv(nn.Module):
  """torchvision's ``MBConv``: [expand 1x1] -> depthwise kxk -> squeeze-excite -> project 1x1.

  Children are ``block_<i>_0`` / ``block_<i>_1`` (conv / BN of the i-th
  layer of torch's ``block`` Sequential) and ``block_<i>`` (the SE layer).
  The residual (with stochastic depth) is used when the stride is 1 and the
  channel count is unchanged.
  """

  expand_ratio: int
  kernel: int
  strides: int
  out_features: int
  drop_rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, bn_mask: jax.Array | None) -> jax.Array:
    in_features = x.shape[-1]
    expanded = make_divisible(in_features * self.expand_ratio)
    i, y = 0, x
    if expanded != in_features:
      y = conv_bn_act(y, "block_0", train, bn_mask, expanded)
      i = 1
    y = conv_bn_act(y, f"block_{i}", train, bn_mask, expanded, self.kernel, self.strides, expanded)
    y = SqueezeExcitation(max(1, in_features // 4), name=f"block_{i + 1}")(y)
    y = conv_bn_act(y, f"block_{i + 2}", train, bn_mask, self.out_features, activation=False)
    if self.strides == 1 and in_features == self.out_features:
      y = stochastic_depth(self.drop_rate, train)(y) + x
    return y


class EfficientNetB0(MaskedClassifier):
  """torchvision's ``efficientnet_b0``.

  ::

    features_0: conv 3x3/2 (32) -> BN -> SiLU
    features_1..7: the 16 MBConv blocks of :data:`B0_STAGES`
    features_8: conv 1x1 (1280) -> BN -> SiLU
    global average pool -> dropout -> classifier_1 (Dense)

  Trainable parameters: 5,288,548 for 3 channels and 1000 classes. BatchNorm
  as torchvision's B0 (``nn.BatchNorm2d`` defaults: eps 1e-5, torch momentum
  0.1 = flax 0.9; statistics float32, padding rows masked out as in
  :class:`~orchard_jax.models.ResNet18`). SiLU activations; stochastic depth
  on the residual branches, its rate growing linearly with the block index
  ``i`` (0..15) as ``stochastic_depth * i / 16`` (for B0's 16 blocks); identity in eval mode.
  Initialisation as torchvision.

  Deviation: the reference (orchard-ml) swaps the stem conv for a stride-1
  one at every resolution; here the stem keeps torchvision's stride 2 unless
  ``stem_stride=1`` is given (parameter count unchanged either way).

  Attributes:
    num_classes: number of logits, >= 1.
    dropout: classifier dropout in [0, 1); torchvision's B0 uses 0.2.
    stochastic_depth: the last block's stochastic depth rate, in [0, 1);
      torchvision uses 0.2.
    stem_stride: 2 (torchvision) or 1 (the reference).
    in_channels: if given, ``__call__`` checks the input channel count.
    stages: torchvision's MBConv table, rows ``(expand_ratio, kernel, stride,
      in_channels, out_channels, num_layers)``; :data:`B0_STAGES` is B0 (the
      stem has ``stages[0][3]`` channels, the last conv ``4 * stages[-1][4]``;
      smaller tables make the fast variants the tests train).
  """

  num_classes: int
  dropout: float = 0.2
  stochastic_depth: float = 0.2
  stem_stride: int = 2
  in_channels: int | None = None
  stages: tuple[tuple[int, int, int, int, int, int], ...] = B0_STAGES

  def __post_init__(self):
    object.__setattr__(self, "stages", tuple(tuple(int(v) for v in s) for s in self.stages))
    if not self.stages or any(len(s) != 6 or min(s) < 1 for s in self.stages):
      raise ValueError(
          "stages must be a non-empty tuple of (expand_ratio, kernel, stride, in_channels,"
          f" out_channels, num_layers) rows of ints >= 1, got stages={self.stages}"
      )
    check_classifier_args(self.num_classes, self.dropout, self.in_channels)
    if not 0.0 <= self.stochastic_depth < 1.0:
      raise ValueError(f"stochastic_depth must be in [0, 1), got stochastic_depth={self.stochastic_depth}")
    if self.stem_stride not in (1, 2):
      raise ValueError(f"stem_stride must be 1 or 2, got stem_stride={self.stem_stride}")
    super().__post_init__()

  def logits(self, x: jax.Array, train: bool, bn_mask: jax.Array | None) -> jax.Array:
    """The stem, the MBConv stages, the last conv, pooling, dropout and ``classifier_1``."""
    x = conv_bn_act(x, "features_0", train, bn_mask, self.stages[0][3], 3, self.stem_stride)
    total = sum(stage[-1] for stage in self.stages)
    block_id = 0
    for s, (expand, kernel, stride, _, out, layers) in enumerate(self.stages, start=1):
      for j in range(layers):
        rate = self.stochastic_depth * block_id / total
        x = MBConv(expand, kernel, stride if j == 0 else 1, out, rate,
                   name=f"features_{s}_{j}")(x, train, bn_mask)
        block_id += 1
    x = conv_bn_act(x, f"features_{len(self.stages) + 1}", train, bn_mask, 4 * self.stages[-1][4])
    x = global_avg_pool(x)
    x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
    return nn.Dense(self.num_classes, kernel_init=_LINEAR_INIT, name="classifier_1")(x)
