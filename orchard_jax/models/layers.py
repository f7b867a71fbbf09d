"""Small stateless layers shared by the built-in models (NHWC layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2, as torch's ``nn.MaxPool2d(2, 2)``.

  Written as reshape-then-max, which has the same values as
  ``flax.linen.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")`` but a
  much cheaper backward pass on XLA:CPU (``reduce_window``'s gradient is a
  slow ``select_and_scatter``). Measured on 2 CPU cores: value-and-gradient
  of the pool on ``[64, 32, 32, 32]`` ~7x faster, a MiniCNN gradient step on
  ``[64, 28, 28, 3]`` ~1.7x faster.

  Odd sizes are floored like torch (``ceil_mode=False``): the last row/column
  is dropped when ``H`` / ``W`` is odd, so the output is
  ``[B, H // 2, W // 2, C]``.

  Gradient on ties: when several elements of a window share the maximum, the
  incoming gradient is split *equally* among them (``jnp.max``'s rule), while
  ``flax.linen.max_pool`` and torch give all of it to the first maximum in
  row-major window order. Both are valid subgradients (the window's gradient
  sums to the incoming one either way), and they agree whenever the window's
  maximum is unique. After a ReLU, all-zero windows are ties, but the ReLU's
  gradient there is 0, so the choice does not reach the parameters.

  Args:
    x_BxHxWxC: array of rank 4, NHWC.

  Returns:
    The pooled array ``[B, H // 2, W // 2, C]``, same dtype.
  """
  if x_BxHxWxC.ndim != 4:
    raise ValueError(
        f"max_pool_2x2 expects an NHWC array of rank 4, got shape {x_BxHxWxC.shape}"
    )
  b, h, w, c = x_BxHxWxC.shape
  h2, w2 = h // 2, w // 2
  x = x_BxHxWxC[:, : 2 * h2, : 2 * w2, :]
  return x.reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


def global_avg_pool(x_BxHxWxC: jax.Array) -> jax.Array:
  """Mean over the spatial axes, as torch's ``AdaptiveAvgPool2d(1)`` + flatten: ``[B, C]``."""
  if x_BxHxWxC.ndim != 4:
    raise ValueError(
        f"global_avg_pool expects an NHWC array of rank 4, got shape {x_BxHxWxC.shape}"
    )
  return x_BxHxWxC.mean(axis=(1, 2))


def conv3x3_same(x_BxHxWxC: jax.Array, kernel_3x3xCxO: jax.Array, *, im2col: bool = True) -> jax.Array:
  """3x3 stride-1 "SAME" convolution (NHWC, HWIO), fast on every backend.

  On XLA:CPU the convolution's backward pass is slow; the same convolution
  written as im2col (nine shifted views concatenated, then one matmul) runs
  its forward and backward passes on the fast matmul path: measured on 2 CPU
  cores, value-and-gradient 1.7-6x faster on MiniCNN's layers, and bit-equal
  in float32 on those shapes (``benchmarks/conv_im2col.py``). Other backends
  keep ``lax.conv_general_dilated`` (cuDNN and TPU convolutions are faster
  than im2col there), and so does ``im2col=False``: a forward-only pass
  (evaluation) is faster with XLA:CPU's own convolution. The backend is read
  at trace time.
  """
  if not im2col or jax.default_backend() != "cpu":
    return jax.lax.conv_general_dilated(x_BxHxWxC, kernel_3x3xCxO, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  b, h, w, c = x_BxHxWxC.shape
  padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], -1)
  out = cols.reshape(b * h * w, 9 * c) @ kernel_3x3xCxO.reshape(9 * c, -1)
  return out.reshape(b, h, w, -1)


class Conv3x3(nn.Module):
  """``nn.Conv(features, (3, 3), padding="SAME")`` computed by :func:`conv3x3_same`.

  Same parameter names, shapes and initialisers as ``nn.Conv`` (``kernel``
  HWIO, LeCun-normal; ``bias`` zeros), so checkpoints and weight converters
  are unchanged. Computes in the promoted dtype of inputs and parameters, as
  ``nn.Conv`` with ``dtype=None`` does.
  """
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = True) -> jax.Array:
    """``train`` selects im2col on XLA:CPU (fast backward); False: the plain convolution."""
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x_BxHxWxC.shape[-1], self.features), jnp.float32)
    dtype = jnp.promote_types(x_BxHxWxC.dtype, kernel.dtype)
    y = conv3x3_same(x_BxHxWxC.astype(dtype), kernel.astype(dtype), im2col=train)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(dtype)
    return y
