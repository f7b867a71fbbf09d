"""torchvision's ``ColorJitter`` on NHWC float images in [0, 1], one draw per sample.

The reference jitters brightness, contrast and (for RGB data) saturation with
``v2.ColorJitter(brightness=j, contrast=j, saturation=j or 0)``: each factor is
drawn from ``U(max(0, 1 - j), 1 + j)``, and the adjustments run in the order of
``torch.randperm(4)`` over (brightness, contrast, saturation, hue), the unset
ones skipped. Each adjustment is torchvision's functional one on float images:
a blend ``clamp(f * x + (1 - f) * other, 0, 1)`` with ``other`` zeros
(brightness), the mean of the grayscale image (contrast; a 1-channel image's
own mean) or the grayscale image (saturation; identity on 1 channel).

``jitter_val`` is a float32 scalar array (per trial, possibly a tracer with a
cohort axis vmapped away); 0 leaves the images unchanged, as torchvision, which
then jitters nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# torchvision's ``_rgb_to_grayscale_image`` weights (ITU-R 601-2 luma, as PIL's "L" mode).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# torchvision's order: fn_id 0 brightness, 1 contrast, 2 saturation (3 hue, never set here).
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


def _check_channels(images: jax.Array) -> int:
  if images.ndim < 3 or images.shape[-1] not in (1, 3):
    raise ValueError(f"colour adjustments take [..., H, W, C] images with C 1 or 3, got shape {images.shape}")
  return images.shape[-1]


def _per_sample(factor: jax.Array, images: jax.Array) -> jax.Array:
  """A scalar or one factor per leading index of ``images``, broadcast over H, W, C."""
  factor = jnp.asarray(factor, jnp.float32)
  return jnp.broadcast_to(factor, images.shape[:-3])[..., None, None, None]


def _blend(images: jax.Array, other: jax.Array, ratio: jax.Array) -> jax.Array:
  """torchvision's ``_blend`` on float images: ``clamp(ratio * x + (1 - ratio) * other, 0, 1)``."""
  return jnp.clip(images * ratio + other * (1.0 - ratio), 0.0, 1.0)


def grayscale(images: jax.Array) -> jax.Array:
  """``rgb_to_grayscale`` of ``[..., H, W, 3]`` images, keeping a channel axis of 1."""
  r, g, b = images[..., 0], images[..., 1], images[..., 2]
  return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2])[..., None]


def _contrast_mean(images: jax.Array) -> jax.Array:
  gray = grayscale(images) if images.shape[-1] == 3 else images
  return jnp.mean(gray, axis=(-3, -2, -1), keepdims=True)


def adjust_brightness(images: jax.Array, factor: jax.Array) -> jax.Array:
  """``F.adjust_brightness``: ``clamp(factor * x, 0, 1)``; ``factor`` a scalar or one per image."""
  _check_channels(images)
  return jnp.clip(images * _per_sample(factor, images), 0.0, 1.0)


def adjust_contrast(images: jax.Array, factor: jax.Array) -> jax.Array:
  """``F.adjust_contrast``: blend with the mean of each image's grayscale (its own mean on 1 channel)."""
  _check_channels(images)
  return _blend(images, _contrast_mean(images), _per_sample(factor, images))


def adjust_saturation(images: jax.Array, factor: jax.Array) -> jax.Array:
  """``F.adjust_saturation``: blend with each image's grayscale; 1-channel images pass unchanged."""
  if _check_channels(images) == 1:
    return images
  return _blend(images, grayscale(images), _per_sample(factor, images))


def draw_jitter(key: jax.Array, batch_size: int, jitter_val: jax.Array,
                num_ops: int) -> tuple[jax.Array, jax.Array]:
  """The per-sample draws of ``ColorJitter(j, j, j if num_ops == 3 else 0)``.

  Returns ``factors_BxN`` (float32; column ``i`` for adjustment ``i`` of
  brightness, contrast, saturation), each ``~ U(max(0, 1 - j), 1 + j)``, and
  ``order_BxN`` (int32), a uniformly random permutation of ``range(N)`` per
  sample: the order in which ``torch.randperm(4)`` visits the set adjustments.
  """
  if num_ops not in (2, 3):
    raise ValueError(f"num_ops must be 2 (brightness, contrast) or 3 (and saturation), got num_ops={num_ops}")
  jitter_val = jnp.asarray(jitter_val, jnp.float32)
  key_factors, key_order = jax.random.split(key)
  low = jnp.maximum(0.0, 1.0 - jitter_val)
  high = 1.0 + jitter_val
  factors_BxN = low + (high - low) * jax.random.uniform(key_factors, (batch_size, num_ops), jnp.float32)
  order_BxN = jnp.argsort(jax.random.uniform(key_order, (batch_size, num_ops)), axis=-1).astype(jnp.int32)
  return factors_BxN, order_BxN


def apply_jitter(images_BxHxWxC: jax.Array, factors_BxN: jax.Array, order_BxN: jax.Array) -> jax.Array:
  """The adjustments at fixed factors, in each sample's order (``ColorJitter.transform``)."""
  channels = _check_channels(images_BxHxWxC)
  out = images_BxHxWxC
  for position in range(order_BxN.shape[-1]):
    op_B = order_BxN[:, position]
    ratio = _per_sample(jnp.take_along_axis(factors_BxN, op_B[:, None], axis=-1)[:, 0], out)
    op = op_B[:, None, None, None]
    other = jnp.where(op == CONTRAST, _contrast_mean(out), 0.0)
    if channels == 3:
      other = jnp.where(op == SATURATION, grayscale(out), other)
    else:  # torchvision's adjust_saturation leaves 1-channel images as they are
      ratio = jnp.where(op == SATURATION, 1.0, ratio)
    out = _blend(out, other, ratio)
  return out


def jitter(key: jax.Array, images_BxHxWxC: jax.Array, jitter_val: jax.Array, saturation: bool) -> jax.Array:
  """``v2.ColorJitter(brightness=j, contrast=j, saturation=j if saturation else 0)``, per sample.

  ``jitter_val`` is a float32 scalar (array or tracer); ``saturation`` is
  static. ``jitter_val == 0`` returns the images unchanged (out-of-range values
  too), as torchvision, where every factor range is then ``(1, 1)`` and nothing
  runs; so does a negative value, which torchvision refuses.
  """
  if jnp.ndim(jitter_val) != 0:
    raise ValueError(f"jitter_val must be a scalar (vmap a cohort axis away), got shape {jnp.shape(jitter_val)}")
  _check_channels(images_BxHxWxC)
  factors_BxN, order_BxN = draw_jitter(key, images_BxHxWxC.shape[0], jitter_val, 3 if saturation else 2)
  out = apply_jitter(images_BxHxWxC, factors_BxN, order_BxN)
  return jnp.where(jnp.asarray(jitter_val) > 0, out, images_BxHxWxC)
