"""The reference's training augmentation as one pure function of a batch.

orchard-ml 0.2.6 (``data_handler/transforms.py``) augments each training image
with torchvision v2, in this order, on float images in [0, 1] before
``Normalize``::

  RandomHorizontalFlip(p=hflip), RandomRotation(rotation_angle)   # unless anatomical
  ColorJitter(brightness=j, contrast=j, saturation=j if RGB else 0)  # unless texture-based
  RandomResizedCrop(size, scale=(min_scale, 1), ratio=(3/4, 4/3), bilinear, antialias)

:func:`augment` does the same to a whole NHWC batch on the device, every sample
with its own draws from one key. The strengths are :class:`AugmentParams`,
float32 scalars that live in a trial's state (a cohort vmaps a leading axis
of them away), so trials that differ only in them share one compiled program;
:class:`AugmentSpec` is the static part (which transforms, the inputs'
normalisation). The draws are separate functions of uniforms (``draw_*``,
all from one random call in :func:`draw`) that follow torchvision's
distributions, and the transforms are :mod:`.warp`'s and
:mod:`.color`'s, each equal to torchvision's functional one at fixed
parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from orchard_jax.core import color, warp

# RandomResizedCrop's aspect-ratio range and its number of tries before the central crop.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
CROP_UNIFORMS = 2 * CROP_TRIES + 2


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """The static part of the augmentation: it decides what is compiled (hashable).

  ``geometric``: the flip and the rotation (False for anatomical data, whose
  orientation is diagnostic). ``photometric``: the colour jitter (False for
  texture-based data). ``saturation``: jitter saturation too (RGB data).
  ``mean`` / ``std``: the inputs' normalisation, one value per channel;
  :func:`augment` un-normalises before and normalises after, since the
  reference augments [0, 1] images. ``None`` (both): inputs are in [0, 1].
  """
  geometric: bool = True
  photometric: bool = True
  saturation: bool = False
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def __post_init__(self):
    if (self.mean is None) != (self.std is None):
      raise ValueError(f"mean and std must both be given or both be None, got mean={self.mean}, std={self.std}")
    if self.mean is None:
      return
    mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
    if not mean or len(mean) != len(std):
      raise ValueError(f"mean and std must have one value per channel (same non-zero length), "
                       f"got mean={self.mean}, std={self.std}")
    if not all(s > 0 for s in std):
      raise ValueError(f"std must be positive, got std={self.std}")
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "std", std)


class AugmentParams(NamedTuple):
  """The per-trial strengths: float32 scalars (``[K]`` in a cohort, vmapped away before use)."""
  hflip: jax.Array            # [] float32: probability of a horizontal flip, in [0, 1]
  rotation_angle: jax.Array   # [] float32: degrees, angle ~ U(-a, a), a >= 0
  jitter_val: jax.Array       # [] float32: colour factors ~ U(max(0, 1 - j), 1 + j), j >= 0
  min_scale: jax.Array        # [] float32: RandomResizedCrop's scale=(min_scale, 1), in [0, 1]

  @classmethod
  def create(cls, hflip: float = 0.5, rotation_angle: float = 10.0, jitter_val: float = 0.2,
             min_scale: float = 0.9) -> "AugmentParams":
    """Checked float32 arrays from Python numbers (the reference's defaults)."""
    checks = {"hflip": (hflip, 0.0 <= hflip <= 1.0, "in [0, 1]"),
              "rotation_angle": (rotation_angle, rotation_angle >= 0.0, ">= 0"),
              "jitter_val": (jitter_val, jitter_val >= 0.0, ">= 0"),
              "min_scale": (min_scale, 0.0 <= min_scale <= 1.0, "in [0, 1]")}
    for name, (value, ok, allowed) in checks.items():
      if not (math.isfinite(value) and ok):
        raise ValueError(f"{name} must be {allowed}, got {name}={value}")
    return cls(*(jnp.asarray(v, jnp.float32) for v in (hflip, rotation_angle, jitter_val, min_scale)))


def draw_hflip(u_B: jax.Array, p: jax.Array) -> jax.Array:
  """``RandomHorizontalFlip(p)``'s decisions from uniforms ``u_B ~ U[0, 1)``: ``[B]`` bool, flip where
  ``u < p`` (torchvision skips the flip when ``torch.rand(1) >= p``)."""
  return u_B < jnp.asarray(p, jnp.float32)


def draw_rotation(u_B: jax.Array, degrees: jax.Array) -> jax.Array:
  """``RandomRotation(degrees)``'s angles from uniforms ``u_B ~ U[0, 1)``: ``[B]`` float32
  ``~ U(-degrees, degrees)`` (exactly 0 for ``degrees == 0``)."""
  return jnp.asarray(degrees, jnp.float32) * (2.0 * u_B - 1.0)


def _central_crop(height: int, width: int) -> tuple[int, int, int, int]:
  """RandomResizedCrop's fallback box ``(top, left, h, w)`` after ten rejected tries (static)."""
  in_ratio = width / height
  if in_ratio < min(CROP_RATIO):
    w, h = width, int(round(width / min(CROP_RATIO)))
  elif in_ratio > max(CROP_RATIO):
    w, h = int(round(height * max(CROP_RATIO))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _randint(u: jax.Array, high: jax.Array) -> jax.Array:
  """``randint(0, high)`` from ``u ~ U[0, 1)``: ``floor(u * high)``, clipped against float rounding."""
  return jnp.minimum(jnp.floor(u * high).astype(jnp.int32), high - 1)


def draw_crop(u_BxN: jax.Array, min_scale: jax.Array, height: int,
              width: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``RandomResizedCrop(scale=(min_scale, 1), ratio=(3/4, 4/3)).make_params``, per sample, from
  ``CROP_UNIFORMS`` uniforms ``U[0, 1)`` per sample (``u_BxN``).

  Returns ``(top, left, h, w)``, each ``[B]`` int32. torchvision tries ten
  times: area ``~ U(min_scale, 1) * H * W``, ``log ratio ~ U(log 3/4, log 4/3)``,
  ``w = round(sqrt(area * ratio))``, ``h = round(sqrt(area / ratio))``, kept
  if ``0 < w <= W`` and ``0 < h <= H``, then ``top ~ randint(0, H - h + 1)``,
  ``left ~ randint(0, W - w + 1)``; without a kept try, the central crop of
  the clamped ratio. Here the ten tries are drawn at once and the first kept
  one wins, which has the same distribution; the offsets are ``floor(u * n)``
  of a uniform ``u`` (float32's resolution is far below an image's side).
  """
  min_scale = jnp.asarray(min_scale, jnp.float32)
  u = u_BxN  # the tries' areas, their ratios, then the two offsets
  area = (height * width) * (min_scale + (1.0 - min_scale) * u[:, :CROP_TRIES])
  log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
  ratio = jnp.exp(log_lo + (log_hi - log_lo) * u[:, CROP_TRIES:2 * CROP_TRIES])
  w_try = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)
  h_try = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
  kept = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
  first = jnp.argmax(kept, axis=1)[:, None]
  found = kept.any(axis=1)
  top0, left0, h0, w0 = _central_crop(height, width)
  h = jnp.where(found, jnp.take_along_axis(h_try, first, axis=1)[:, 0], h0)
  w = jnp.where(found, jnp.take_along_axis(w_try, first, axis=1)[:, 0], w0)
  top = _randint(u[:, -2], height - h + 1)
  left = _randint(u[:, -1], width - w + 1)
  return jnp.where(found, top, top0), jnp.where(found, left, left0), h, w


class Draws(NamedTuple):
  """One batch's geometric draws, per sample."""
  flip: jax.Array    # [B] bool: horizontal flip
  angle: jax.Array   # [B] float32: rotation, degrees counter-clockwise
  top: jax.Array     # [B] int32: the crop box
  left: jax.Array    # [B] int32
  height: jax.Array  # [B] int32
  width: jax.Array   # [B] int32


def draw(key: jax.Array, batch_size: int, params: AugmentParams, height: int, width: int) -> Draws:
  """The flips, angles and crop boxes of a batch of ``height x width`` images, from one random call
  (each call compiles its own hash, so one call for all keeps the program small)."""
  u = jax.random.uniform(key, (batch_size, 2 + CROP_UNIFORMS), jnp.float32)
  return Draws(draw_hflip(u[:, 0], params.hflip), draw_rotation(u[:, 1], params.rotation_angle),
               *draw_crop(u[:, 2:], params.min_scale, height, width))


def hflip(images_BxHxWxC: jax.Array, flip_B: jax.Array) -> jax.Array:
  """``F.horizontal_flip`` where ``flip_B`` is True, the image unchanged elsewhere."""
  return jnp.where(flip_B[:, None, None, None], images_BxHxWxC[:, :, ::-1], images_BxHxWxC)


def _check_scalars(params: AugmentParams) -> None:
  for name, value in params._asdict().items():
    if jnp.ndim(value) != 0:
      raise ValueError(f"AugmentParams.{name} must be a scalar inside augment (vmap a cohort axis "
                       f"away), got shape {jnp.shape(value)}")


def augment(key: jax.Array, images_BxHxWxC: jax.Array, params: AugmentParams,
            spec: AugmentSpec) -> jax.Array:
  """The reference's training augmentation of a batch, each sample with its own draws.

  Flip and rotation (``spec.geometric``; nearest, fill 0, about the centre),
  colour jitter (``spec.photometric``), then the random resized crop back to
  ``H x W`` (always, as the reference). ``params`` are scalars (arrays or
  tracers); ``spec`` is static. Zero strengths leave each transform out in
  effect: ``hflip`` 0 flips nothing, ``rotation_angle`` 0 rotates by 0,
  ``jitter_val`` 0 changes no colour and ``min_scale`` 1 crops the whole image
  (on square images; on others torchvision's own draw may crop a border, and
  so does this).
  """
  _check_scalars(params)
  batch, height, width, channels = images_BxHxWxC.shape
  images = images_BxHxWxC.astype(jnp.float32)
  if spec.mean is not None:
    if len(spec.mean) not in (1, channels):
      raise ValueError(f"AugmentSpec.mean/std have {len(spec.mean)} values for {channels}-channel images")
    mean = jnp.asarray(spec.mean, jnp.float32)
    std = jnp.asarray(spec.std, jnp.float32)
    images = images * std + mean
  key_geometry, key_color = jax.random.split(key)
  draws = draw(key_geometry, batch, params, height, width)
  if spec.geometric:
    images = warp.rotate(hflip(images, draws.flip), draws.angle, "nearest", 0.0)
  if spec.photometric:
    images = color.jitter(key_color, images, params.jitter_val, spec.saturation)
  if spec.mean is not None:
    # Normalised before the crop, which is linear in the pixel values (its bilinear
    # weights sum to 1 and it never samples outside the image): the same numbers to
    # float32 rounding as normalising after it, and XLA then fuses the crop into the
    # step as for [0, 1] inputs. Normalising after the crop made XLA recompute the crop's
    # gathers for each consumer: MiniCNN's step 1.19x the unaugmented one at batch 16,
    # against 1.01x for [0, 1] inputs (benchmarks/augment_step.py).
    images = (images - mean) / std
  images = warp.resized_crop(images, draws.top, draws.left, draws.height, draws.width)
  return images.astype(images_BxHxWxC.dtype)
