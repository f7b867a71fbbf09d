"""Per-sample resampling of NHWC images with torchvision's conventions.

One sampler, :func:`sample`, reads images at source coordinates (pixel units,
pixel centres at integers, as ``grid_sample(..., align_corners=False)`` after
unnormalising). Everything geometric is built on it: :func:`affine` and
:func:`rotate` (``torchvision.transforms.v2.functional.affine`` / ``rotate``,
``expand=False``) and :func:`resized_crop` (``resized_crop`` with bilinear
interpolation, for crops no larger than the output).

Every function takes per-sample parameters as ``[B]`` arrays (or scalars,
broadcast), so a batch warps each image differently in one program; modes and
fills are static. Nothing branches on values: the functions are jit- and
vmap-safe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("nearest", "bilinear")


def _cos_sin_degrees(degrees: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``cos`` and ``sin`` of an angle in degrees, exact at multiples of 90.

  The angle is split into quarter turns and a remainder in [-45, 45], so that
  a right angle gives exact zeros and ones in float32, as torchvision's
  double-precision ``math.cos`` gives after its cast to float32 (about 6e-17
  instead of the ~4e-8 of float32's ``cos(pi / 2)``, enough to move a
  nearest-neighbour pick on non-square images).
  """
  quarters = jnp.round(degrees / 90.0)
  rest = jnp.deg2rad(degrees - 90.0 * quarters)
  cos_r, sin_r = jnp.cos(rest), jnp.sin(rest)
  k = jnp.mod(quarters, 4.0)
  cos = jnp.select([k == 0, k == 1, k == 2], [cos_r, -sin_r, -cos_r], sin_r)
  sin = jnp.select([k == 0, k == 1, k == 2], [sin_r, cos_r, -sin_r], -cos_r)
  return cos, sin


def inverse_affine_matrix(center_xy, angle, translate_xy, scale, shear_xy) -> jax.Array:
  """torchvision's ``_get_inverse_affine_matrix(center, angle, translate, scale, shear)``.

  The map from output to input pixel coordinates, ``[..., 2, 3]`` float32, of
  ``M = T * C * RotateScaleShear * C^-1``. ``angle`` and ``shear_xy`` are in
  degrees; ``center_xy`` and ``translate_xy`` are ``(x, y)`` pairs (``[..., 2]``);
  scalars broadcast against ``[B]`` arrays. For the tensor kernels of
  torchvision the centre is relative to the image centre (``(0, 0)`` for the
  default), as ``affine_image`` passes it.
  """
  center_xy, translate_xy, shear_xy = (jnp.asarray(v, jnp.float32)
                                       for v in (center_xy, translate_xy, shear_xy))
  angle, scale = jnp.asarray(angle, jnp.float32), jnp.asarray(scale, jnp.float32)
  sx, sy = shear_xy[..., 0], shear_xy[..., 1]
  cx, cy = center_xy[..., 0], center_xy[..., 1]
  tx, ty = translate_xy[..., 0], translate_xy[..., 1]
  cos_rot, sin_rot = _cos_sin_degrees(angle)
  cos_rot_sy, sin_rot_sy = _cos_sin_degrees(angle - sy)
  cos_sy, _ = _cos_sin_degrees(sy)
  tan_sx = jnp.tan(jnp.deg2rad(sx))
  # Rotate-shear without scale, as torchvision; its determinant is 1.
  a = cos_rot_sy / cos_sy
  b = -(a * tan_sx + sin_rot)
  c = sin_rot_sy / cos_sy
  d = cos_rot - c * tan_sx
  m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
  m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
  m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
  m0, m1, m2, m3, m4, m5 = jnp.broadcast_arrays(m0, m1, m2, m3, m4, m5)
  return jnp.stack([jnp.stack([m0, m1, m2], -1), jnp.stack([m3, m4, m5], -1)], -2)


def affine_coordinates(theta_Bx2x3: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Source coordinates ``(y, x)``, each ``[B, height, width]``, of an affine warp.

  torchvision's ``_affine_grid`` (output pixel centres relative to the image
  centre, mapped by ``theta`` and normalised by half the size) followed by
  ``grid_sample``'s unnormalisation with ``align_corners=False``, in the same
  float32 order, so that nearest-neighbour rounding agrees with torch's.
  """
  theta = jnp.asarray(theta_Bx2x3, jnp.float32)
  xs_W = jnp.arange(width, dtype=jnp.float32) - (width - 1) * 0.5
  ys_H = jnp.arange(height, dtype=jnp.float32) - (height - 1) * 0.5
  rescaled = theta / jnp.array([0.5 * width, 0.5 * height], jnp.float32)[:, None]

  def grid(row_3):
    return (xs_W[None, :] * row_3[..., 0, None, None] + ys_H[:, None] * row_3[..., 1, None, None]
            + row_3[..., 2, None, None])

  gx, gy = grid(rescaled[..., 0, :]), grid(rescaled[..., 1, :])
  return ((gy + 1.0) * height - 1.0) * 0.5, ((gx + 1.0) * width - 1.0) * 0.5


def _gather(images_BxHxWxC, y, x):
  """``images[b, y, x]`` for integer ``y, x`` of shape ``[B, Ho, Wo]``, zero where out of range,
  and the in-range indicator (float32 ``[B, Ho, Wo, 1]``)."""
  _, height, width, channels = images_BxHxWxC.shape
  inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
  flat_idx = jnp.where(inside, y * width + x, 0)
  out_shape = flat_idx.shape
  flat = images_BxHxWxC.reshape(images_BxHxWxC.shape[0], height * width, channels)
  values = jnp.take_along_axis(flat, flat_idx.reshape(out_shape[0], -1, 1), axis=1)
  inside = inside[..., None].astype(images_BxHxWxC.dtype)
  return values.reshape(*out_shape, channels) * inside, inside


def sample(images_BxHxWxC: jax.Array, y_BxHoxWo: jax.Array, x_BxHoxWo: jax.Array,
           mode: str = "nearest", fill: float | None = None) -> jax.Array:
  """The images read at source coordinates: ``[B, Ho, Wo, C]``.

  ``mode`` "nearest" rounds half to even (``grid_sample``'s ``nearbyint``);
  "bilinear" weighs the four neighbours. Outside the image reads zero
  (``padding_mode="zeros"``). ``fill`` follows torchvision's
  ``_apply_grid_transform``: ``None`` is plain ``grid_sample``; a number fills
  what lies outside, through a sampled mask of ones (nearest: ``fill`` where the
  mask is below 0.5; bilinear: ``mask * (img - fill) + fill``, so pixels near
  the border blend towards ``fill``).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
  images = jnp.asarray(images_BxHxWxC)
  if mode == "nearest":
    values, mask = _gather(images, jnp.round(y_BxHoxWo).astype(jnp.int32),
                           jnp.round(x_BxHoxWo).astype(jnp.int32))
    return values if fill is None else jnp.where(mask < 0.5, jnp.asarray(fill, values.dtype), values)
  y0, x0 = jnp.floor(y_BxHoxWo), jnp.floor(x_BxHoxWo)
  wy1, wx1 = y_BxHoxWo - y0, x_BxHoxWo - x0
  wy0, wx0 = (y0 + 1.0) - y_BxHoxWo, (x0 + 1.0) - x_BxHoxWo
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  values, mask = 0.0, 0.0
  for dy, wy in ((0, wy0), (1, wy1)):
    for dx, wx in ((0, wx0), (1, wx1)):
      corner, inside = _gather(images, y0 + dy, x0 + dx)
      weight = (wy * wx)[..., None]
      values, mask = values + corner * weight, mask + inside * weight
  return values if fill is None else mask * (values - fill) + fill


def affine(images_BxHxWxC: jax.Array, angle, translate_xy, scale, shear_xy,
           mode: str = "nearest", fill: float | None = None, center_xy=(0.0, 0.0)) -> jax.Array:
  """``F.affine(img, angle, translate, scale, shear, interpolation, fill)`` per sample.

  Parameters are per sample (``[B]``, ``[B, 2]`` for the pairs) or shared; the
  output keeps the input size. ``center_xy`` is relative to the image centre.
  """
  _, height, width, _ = images_BxHxWxC.shape
  theta = inverse_affine_matrix(center_xy, angle, translate_xy, scale, shear_xy)
  theta = jnp.broadcast_to(theta, (images_BxHxWxC.shape[0], 2, 3))
  y, x = affine_coordinates(theta, height, width)
  return sample(images_BxHxWxC, y, x, mode, fill)


def rotate(images_BxHxWxC: jax.Array, angle_B, mode: str = "nearest", fill: float | None = 0.0) -> jax.Array:
  """``F.rotate(img, angle, interpolation, expand=False, center=None, fill)`` per sample.

  Counter-clockwise by ``angle_B`` degrees about the image centre. torchvision
  takes shortcuts for multiples of 90 degrees (``rot90``); the warp gives the
  same image for 0 and 180 and, on square images, 90 and 270, up to the
  floating-point rounding of the sines near pixel boundaries.
  """
  zeros = jnp.zeros((2,), jnp.float32)
  return affine(images_BxHxWxC, -jnp.asarray(angle_B, jnp.float32), zeros, 1.0, zeros, mode, fill)


def resized_crop(images_BxHxWxC: jax.Array, top_B, left_B, height_B, width_B) -> jax.Array:
  """``F.resized_crop(img, top, left, height, width, size=img.shape, bilinear, antialias=True)``
  per sample, for boxes inside the image and no larger than it.

  The box ``(top, left, height, width)`` is integer, one per sample. The crop
  is resized back to the input size with ``align_corners=False`` bilinear
  weights (source ``s * (i + 0.5) - 0.5`` clamped into the box, ``s`` the box
  over the output size). Upsampling is all RandomResizedCrop at
  ``scale <= 1`` does, where torch's antialiased kernel reduces to these
  weights; downsampling would need the antialias filter, which this is not.
  """
  batch, height, width, _ = images_BxHxWxC.shape
  boxes = [jnp.broadcast_to(jnp.asarray(v, jnp.float32), (batch,)) for v in (top_B, left_B, height_B, width_B)]
  top, left, box_h, box_w = boxes

  def source(start_B, extent_B, size):
    out = jnp.arange(size, dtype=jnp.float32)
    local = (extent_B / size)[:, None] * (out + 0.5) - 0.5
    return start_B[:, None] + jnp.clip(local, 0.0, (extent_B - 1.0)[:, None])

  y_BxH, x_BxW = source(top, box_h, height), source(left, box_w, width)
  y = jnp.broadcast_to(y_BxH[:, :, None], (batch, height, width))
  x = jnp.broadcast_to(x_BxW[:, None, :], (batch, height, width))
  return sample(images_BxHxWxC, y, x, "bilinear")
