"""The resampler against torchvision's ``rotate``, ``affine`` and ``resized_crop`` at fixed parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from orchard_jax.core import warp
from tests.torchvision_cpu import import_functional

TF = import_functional()
from torchvision.transforms.v2.functional import _geometry as tv_geometry  # noqa: E402  (after the stubs)

SHAPES = [(28, 28, 1), (20, 33, 3)]  # MNIST-sized and a non-square RGB one
BATCH = 6
BOUNDARY = 1e-3  # a source coordinate this close to a half-integer may round either way in float32
# Jitted once per shape and static argument: eager dispatch would compile every small op.
rotate = jax.jit(warp.rotate, static_argnames=("mode", "fill"))
affine = jax.jit(warp.affine, static_argnames=("mode", "fill"))
resized_crop = jax.jit(warp.resized_crop)
inverse_affine_matrix = jax.jit(warp.inverse_affine_matrix)


def _images(shape, seed=0):
  """NHWC float32 images in [0, 1] and their NCHW torch copy."""
  x = np.random.default_rng(seed).uniform(size=(BATCH, *shape)).astype(np.float32)
  return jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


def _near_half(matrix, height, width):
  """Pixels whose float64 source coordinate (torchvision's grid, unnormalised) is on a rounding boundary."""
  m = np.asarray(matrix, np.float64).reshape(2, 3)
  ys, xs = np.meshgrid(np.arange(height) - (height - 1) / 2, np.arange(width) - (width - 1) / 2, indexing="ij")
  src_x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2] + (width - 1) / 2
  src_y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2] + (height - 1) / 2
  frac = lambda v: np.abs(v - np.floor(v) - 0.5)  # noqa: E731
  return (frac(src_x) < BOUNDARY) | (frac(src_y) < BOUNDARY)


def test_inverse_affine_matrix_equals_torchvision():
  cases = [((0.0, 0.0), 17.0, (1.5, -2.0), 0.93, (5.0, -8.0)), ((3.0, -1.0), -120.0, (0.0, 0.0), 1.1, (0.0, 0.0)),
           ((0.0, 0.0), 90.0, (0.25, 0.25), 1.0, (0.0, 0.0)), ((-2.0, 4.0), 359.0, (0.0, 3.0), 0.5, (-30.0, 12.0))]
  for center, angle, translate, scale, shear in cases:
    ours = inverse_affine_matrix(jnp.array(center), angle, jnp.array(translate), scale, jnp.array(shear))
    theirs = tv_geometry._get_inverse_affine_matrix(list(center), angle, list(translate), scale, list(shear))
    np.testing.assert_allclose(np.asarray(ours).reshape(6), theirs, rtol=0, atol=2e-6, err_msg=str(angle))


@pytest.mark.parametrize("shape", SHAPES)
def test_nearest_rotation_equals_torchvision_except_on_rounding_boundaries(shape):
  x, x_t = _images(shape)
  angles = np.random.default_rng(1).uniform(-45.0, 45.0, BATCH).astype(np.float32)
  ours = np.asarray(rotate(x, angles))
  mismatched = boundary = 0
  for i, angle in enumerate(angles.tolist()):
    theirs = _nhwc(TF.rotate(x_t[i:i + 1], angle, fill=0))[0]
    differs = (ours[i] != theirs).any(-1)
    matrix = tv_geometry._get_inverse_affine_matrix([0.0, 0.0], -(angle % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
    on_boundary = _near_half(matrix, *shape[:2])
    assert not (differs & ~on_boundary).any(), f"angle {angle}: pixels differ away from a rounding boundary"
    mismatched += differs.sum()
    boundary += on_boundary.sum()
  share = mismatched / (BATCH * shape[0] * shape[1])
  print(f"rotation {shape}: {share:.4%} of pixels differ from torchvision, all on rounding boundaries "
        f"({boundary} boundary pixels)")
  assert share < 0.01


@pytest.mark.parametrize("shape", SHAPES)
def test_right_angle_rotations_equal_torchvision_exactly(shape):
  """torchvision takes rot90 shortcuts for these (non-square 90/270: an exact half-pixel grid)."""
  x, x_t = _images(shape)
  for angle in (0.0, 90.0, 180.0, 270.0, -90.0):
    np.testing.assert_array_equal(rotate(x, angle), _nhwc(TF.rotate(x_t, angle, fill=0)), err_msg=str(angle))


@pytest.mark.parametrize("shape, mode, fill", [(SHAPES[0], "nearest", None), (SHAPES[1], "nearest", None),
                                                (SHAPES[0], "bilinear", None), (SHAPES[1], "nearest", 0.3),
                                                (SHAPES[1], "bilinear", 0.0), (SHAPES[1], "bilinear", 0.3)])
def test_translate_and_zoom_equal_torchvision_affine(shape, mode, fill):
  """The test-time translation (a quarter pixel at 28 px) and zoom (1.1), as ``F.affine`` with its defaults
  (nearest, no fill), and the other modes and fills of torchvision's grid transform."""
  x, x_t = _images(shape)
  for translate, scale in (((0.25, 0.25), 1.0), ((2.0, -1.0), 1.0), ((0.0, 0.0), 1.1), ((0.0, 0.0), 0.8)):
    ours = affine(x, 0.0, jnp.array(translate), scale, jnp.zeros(2), mode, fill)
    theirs = TF.affine(x_t, angle=0.0, translate=list(translate), scale=scale, shear=[0.0, 0.0],
                       interpolation=mode, fill=fill)
    tol = 0 if mode == "nearest" else 1e-5
    np.testing.assert_allclose(ours, _nhwc(theirs), rtol=0, atol=tol, err_msg=f"{translate} {scale}")


@pytest.mark.parametrize("fill", [None, 0.4])
def test_bilinear_affine_with_rotation_and_shear_equals_torchvision(fill):
  x, x_t = _images(SHAPES[1])
  angles = np.array([17.0, -33.0, 5.0, 170.0, -95.0, 0.0], np.float32)
  translate = np.array([[1.5, -2.0], [0.0, 0.0], [-3.0, 0.5], [0.2, 0.2], [4.0, 1.0], [0.0, -1.0]], np.float32)
  scale = np.array([0.93, 1.0, 1.2, 0.7, 1.05, 1.0], np.float32)
  shear = np.array([[5.0, -8.0], [0.0, 0.0], [0.0, 10.0], [-12.0, 0.0], [3.0, 3.0], [0.0, 0.0]], np.float32)
  ours = np.asarray(affine(x, angles, translate, scale, shear, "bilinear", fill))
  for i in range(BATCH):
    theirs = TF.affine(x_t[i], angle=float(angles[i]), translate=translate[i].tolist(), scale=float(scale[i]),
                       shear=shear[i].tolist(), interpolation="bilinear", fill=fill)
    np.testing.assert_allclose(ours[i], _nhwc(theirs[None])[0], rtol=0, atol=1e-5, err_msg=str(i))


@pytest.mark.parametrize("shape", SHAPES)
def test_resized_crop_equals_torchvision_for_crops_no_larger_than_the_output(shape):
  height, width, _ = shape
  x, x_t = _images(shape)
  boxes = [(0, 0, height, width), (3, 2, height - 5, width - 4), (1, 5, height - 1, width - 7),
           (height - 10, width - 12, 10, 12), (0, 0, height, width - 3), (2, 0, height - 2, width)]
  ours = np.asarray(resized_crop(x, *np.array(boxes, np.int32).T))
  for i, box in enumerate(boxes):
    theirs = TF.resized_crop(x_t[i], *box, size=[height, width], interpolation=TF.InterpolationMode.BILINEAR,
                             antialias=True)
    np.testing.assert_allclose(ours[i], _nhwc(theirs[None])[0], rtol=0, atol=1e-5, err_msg=str(box))


def test_the_whole_box_is_the_identity():
  x, _ = _images(SHAPES[1])
  np.testing.assert_array_equal(resized_crop(x, 0, 0, SHAPES[1][0], SHAPES[1][1]), x)


def test_per_sample_parameters_in_one_jitted_program_equal_separate_calls():
  x, _ = _images(SHAPES[0])
  angles = jnp.linspace(-40.0, 40.0, BATCH)
  batched = jax.jit(warp.rotate)(x, angles)
  for i in range(BATCH):
    np.testing.assert_array_equal(batched[i], rotate(x[i:i + 1], angles[i])[0])


def test_an_unknown_mode_is_refused_in_one_line():
  x, _ = _images(SHAPES[0])
  with pytest.raises(ValueError, match=r"mode must be one of \('nearest', 'bilinear'\), got mode='bicubic'"):
    rotate(x, 10.0, mode="bicubic")
