"""Small stateless layers shared by the built-in models (NHWC layout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import canonicalize_dtype

from orchard_jax.models import conv_choice


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


def conv3x3_xla(x_BxHxWxC: jax.Array, kernel_3x3xCxO: jax.Array) -> jax.Array:
  """3x3 "SAME" convolution by ``lax.conv_general_dilated``."""
  return jax.lax.conv_general_dilated(x_BxHxWxC, kernel_3x3xCxO, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv3x3_im2col(x_BxHxWxC: jax.Array, kernel_3x3xCxO: jax.Array) -> jax.Array:
  """3x3 "SAME" convolution as im2col: nine shifted views concatenated, one matmul.

  On XLA:CPU the convolution's backward pass is often slow, and im2col runs the forward and
  backward passes on the matmul path: measured on 2 cores of an AMD EPYC, value-and-gradient
  1.7-6x faster on MiniCNN's layers, and equal in float32 to rounding on those shapes
  (``benchmarks/conv_im2col.py``). :func:`conv3x3_lowering` says which a layer uses.
  """
  b, h, w, c = x_BxHxWxC.shape
  padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], -1)
  out = cols.reshape(b * h * w, 9 * c) @ kernel_3x3xCxO.reshape(9 * c, -1)
  return out.reshape(b, h, w, -1)


LOWERINGS = {"im2col": conv3x3_im2col, "xla": conv3x3_xla}


# A forward-only (evaluation) convolution uses im2col on images of fewer than
# this many pixels. XLA:CPU's own convolution is very slow on the tiniest
# images; batch 256, forward only (benchmarks/conv_forward.py): 2x2x64->128
# 25.9 ms vs 2.7 ms with im2col, 4x4x64->128 13.2 vs 11.2, 4x4x32->64 2.5 vs
# 2.4, so MiniCNN's evaluation step on 8x8 digits takes 0.20x the time. On
# larger images im2col does not pay: alone, 7x7x64->128 measured 0.83x, but
# inside MiniCNN's 28x28 evaluation step it made the step 1.5x slower;
# 14x14x32->64 2.9x, 32x32x3->32 1.3x. Training is measured per layer.
IM2COL_FORWARD_PIXELS = 25


def conv3x3_lowering(x_BxHxWxC: jax.Array, kernel: jax.Array, train: bool) -> str:
  """``"im2col"`` or ``"xla"``: the lowering a :class:`Conv3x3` layer uses, at trace time.

  :envvar:`ORCHARD_JAX_CONV` (``im2col`` or ``xla``) forces one everywhere. Else, on
  XLA:CPU, a training step (the kernel differentiated) takes the faster for this layer,
  measured once on this machine (:func:`orchard_jax.models.conv_choice.choose`; vmapped over
  the weights, measured vmapped); a training-mode pass that is not differentiated (a
  program's inspection, as the cohort rule's) uses im2col, and evaluation uses im2col on
  images under :data:`IM2COL_FORWARD_PIXELS` pixels; other backends use XLA's convolution
  (cuDNN's, TPU's).
  """
  lowering = conv_choice.forced()
  if lowering is not None:
    return lowering
  if jax.default_backend() != "cpu":
    return "xla"
  if not train:
    return "im2col" if x_BxHxWxC.shape[1] * x_BxHxWxC.shape[2] < IM2COL_FORWARD_PIXELS else "xla"
  if not conv_choice.differentiated(kernel):
    return "im2col"
  key = conv_choice.layer_key(x_BxHxWxC, kernel, x_BxHxWxC.dtype)
  return conv_choice.choose(key, LOWERINGS)


class Conv3x3(nn.Module):
  """``nn.Conv(features, (3, 3), padding="SAME")`` computed by the lowering
  :func:`conv3x3_lowering` chooses for the layer.

  Same parameter names, shapes and initialisers as ``nn.Conv`` (``kernel``
  HWIO, LeCun-normal; ``bias`` zeros), so checkpoints and weight converters
  are unchanged. Computes in the promoted dtype of inputs and parameters, as
  ``nn.Conv`` with ``dtype=None`` does.
  """
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = True) -> jax.Array:
    """``train`` selects the training rule of :func:`conv3x3_lowering` (measured per layer on
    XLA:CPU); False the evaluation rule."""
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x_BxHxWxC.shape[-1], self.features), jnp.float32)
    dtype = jnp.promote_types(x_BxHxWxC.dtype, kernel.dtype)
    x, kernel = x_BxHxWxC.astype(dtype), kernel.astype(dtype)
    y = LOWERINGS[conv3x3_lowering(x, kernel, train)](x, kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(dtype)
    return y


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` (feature axis last) with a cheap count of masked rows.

  Same variables as ``nn.BatchNorm`` (params ``scale``/``bias``, batch_stats
  ``mean``/``var``, kept in float32), same initialisers, the same statistics
  (``E[x]`` and ``E[x^2] - E[x]^2`` clipped at 0, reduced in at least
  float32), the same running-average update (skipped while initialising) and
  the same output dtype, so checkpoints and weight converters are unchanged.

  The difference is how a mask is counted. flax takes the masked mean as
  ``x.mean(axes, where=mask)``, which broadcasts the mask to the full shape of
  ``x`` and sums it: for a per-row mask ``[B, 1, 1, 1]`` over a
  ``[64, 28, 28, 32]`` activation that is a 1.6-million-element reduction per
  layer. Timed side by side (``benchmarks/step_ab.py``), MiniCNN's batch-64
  training step is 0.98-1.00 of the one with flax's BatchNorm: a small gain,
  at the noise level of 2 CPU cores.
  Here the mask is summed over its own shape and multiplied by the number of
  elements each mask entry covers. The count is an integer, exact in float32
  below 2**24 elements, so the statistics are the ones flax computes (tested
  bit-equal in values and gradients).

  Attributes:
    use_running_average: normalise with the running statistics (evaluation)
      instead of the batch's; may also be passed to ``__call__``.
    momentum: decay of the running statistics, in [0, 1].
    epsilon: added to the variance, > 0.
    dtype: output dtype; None infers it from the input and parameters.
    param_dtype: dtype of ``scale`` and ``bias``.
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if not 0.0 <= self.momentum <= 1.0:
      raise ValueError(f"momentum must be in [0, 1], got momentum={self.momentum}")
    if not self.epsilon > 0.0:
      raise ValueError(f"epsilon must be > 0, got epsilon={self.epsilon}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    """Normalises ``x`` over every axis but the last.

    ``mask`` (bool, broadcastable to ``x``, e.g. ``[B, 1, 1, 1]``) selects
    the elements the batch statistics are taken over; None takes all.
    """
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    axes = tuple(range(x.ndim - 1))
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var = _batch_stats(x, axes, self.dtype, mask)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
    # flax's _normalize, operation for operation.
    y = x - mean
    mul = jax.lax.rsqrt(var + self.epsilon)
    mul *= scale
    y *= mul
    y += bias
    return jnp.asarray(y, canonicalize_dtype(x, scale, bias, dtype=self.dtype))


def _batch_stats(x: jax.Array, axes: tuple[int, ...], dtype, mask: jax.Array | None):
  """Mean and biased variance of ``x`` over ``axes`` as flax computes them, masked rows counted cheaply."""
  compute = jnp.promote_types(dtype if dtype is not None else x.dtype, jnp.float32)
  x = x.astype(compute)
  x2 = jax.lax.square(x)
  if mask is None:
    mean, mean2 = x.mean(axes), x2.mean(axes)
  else:
    mask = jnp.asarray(mask, jnp.bool_)
    mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
    if mask.ndim != x.ndim or any(m not in (1, n) for m, n in zip(mask.shape, x.shape)):
      raise ValueError(f"mask of shape {mask.shape} does not broadcast to the input's shape {x.shape}")
    covered = 1
    for axis in axes:
      if mask.shape[axis] == 1:
        covered *= x.shape[axis]
    count = jnp.sum(mask, axis=axes, dtype=compute) * covered
    mean = jnp.sum(x, axes, dtype=compute, where=mask) / count
    mean2 = jnp.sum(x2, axes, dtype=compute, where=mask) / count
  return mean, jnp.maximum(0.0, mean2 - jax.lax.square(mean))
