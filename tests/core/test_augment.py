"""The training augmentation: its draws against torchvision's, its composition against torchvision's
functional transforms at the drawn parameters, and its behaviour under jit and vmap."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from orchard_jax.core import augment as aug
from orchard_jax.core import color, warp
from tests.torchvision_cpu import import_functional

TF = import_functional()
from torchvision.transforms import v2  # noqa: E402  (after the CPU stubs above)

N_DRAWS = 10_000
SQUARE, OBLONG = (28, 28), (20, 33)
augment = jax.jit(aug.augment, static_argnames="spec")
IDENTITY = aug.AugmentParams.create(hflip=0.0, rotation_angle=0.0, jitter_val=0.0, min_scale=1.0)
STRONG = aug.AugmentParams.create(hflip=0.5, rotation_angle=30.0, jitter_val=0.4, min_scale=0.5)


def _images(batch=8, size=SQUARE, channels=1, seed=0):
  x = np.random.default_rng(seed).uniform(size=(batch, *size, channels)).astype(np.float32)
  return jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


def test_hflip_equals_torchvision_exactly():
  x, x_t = _images(channels=3)
  flip = jnp.array([True, False] * 4)
  theirs = np.stack([_nhwc(TF.horizontal_flip(x_t[i:i + 1]))[0] if f else np.asarray(x[i])
                     for i, f in enumerate(flip.tolist())])
  np.testing.assert_array_equal(aug.hflip(x, flip), theirs)


# -- the draws follow torchvision's distributions (two-sample KS, 10,000 draws each, seeded) --

def _draws(key, params, size=SQUARE):
  """N_DRAWS samples' draws, as augment makes them."""
  return jax.jit(aug.draw, static_argnums=(1, 3, 4))(key, N_DRAWS, params, *size)


def _ks(ours, theirs, name):
  result = stats.ks_2samp(np.asarray(ours, np.float64), np.asarray(theirs, np.float64), method="asymp")
  assert result.pvalue > 0.01, f"{name}: KS p={result.pvalue:.3g} (statistic {result.statistic:.3g})"
  return result


def test_flip_draws_follow_random_horizontal_flip():
  torch.manual_seed(0)
  probe = torch.tensor([[[0.0, 1.0]]])  # 1x1x2: flipped iff the first pixel becomes 1
  flip = v2.RandomHorizontalFlip(p=0.3)
  theirs = [float(flip(probe)[0, 0, 0]) for _ in range(N_DRAWS)]
  ours = _draws(jax.random.key(0), STRONG._replace(hflip=jnp.float32(0.3))).flip
  _ks(ours, theirs, "hflip")
  assert abs(float(ours.mean()) - 0.3) < 0.02


def test_angle_draws_follow_random_rotation():
  torch.manual_seed(0)
  rotation = v2.RandomRotation(25.0)
  theirs = [rotation.make_params([])["angle"] for _ in range(N_DRAWS)]
  ours = _draws(jax.random.key(1), STRONG._replace(rotation_angle=jnp.float32(25.0))).angle
  _ks(ours, theirs, "angle")
  assert float(jnp.abs(ours).max()) <= 25.0


CROP_CASES = [(SQUARE, 0.9), (SQUARE, 0.08), (OBLONG, 0.7)]


@pytest.fixture(scope="module")
def torch_crops():
  """``RandomResizedCrop(size, scale=(min_scale, 1)).make_params`` drawn N_DRAWS times per case (seeded)."""
  draws = {}
  for size, min_scale in CROP_CASES:
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(size, scale=(min_scale, 1.0))
    probe = [torch.empty(1, *size)]
    params = [crop.make_params(probe) for _ in range(N_DRAWS)]
    draws[size, min_scale] = {name: np.array([p[name] for p in params]) for name in ("top", "left", "height", "width")}
  return draws


@pytest.mark.parametrize("size, min_scale", CROP_CASES)
def test_crop_draws_follow_random_resized_crop(torch_crops, size, min_scale):
  """The reference's default scale, torchvision's (many rejected tries) and a non-square image (the
  central-crop fallback in part of the draws)."""
  theirs = torch_crops[size, min_scale]
  ours = _draws(jax.random.key(2), STRONG._replace(min_scale=jnp.float32(min_scale)), size)
  for name in ("top", "left", "height", "width"):
    _ks(getattr(ours, name), theirs[name], name)
  if size == OBLONG:  # the draws reach the central 20x27 crop (or a kept try of that size) as often
    theirs_central = ((theirs["height"] == 20) & (theirs["width"] == 27)).mean()
    ours_central = float(((ours.height == 20) & (ours.width == 27)).mean())
    assert 0.05 < theirs_central < 0.95
    assert abs(ours_central - theirs_central) < 0.02


def test_the_crop_test_detects_a_wrong_ratio_range(torch_crops):
  """A square crop (ratio 1) of the right areas: the same test refuses it."""
  theirs = torch_crops[SQUARE, 0.08]
  area = 784 * np.random.default_rng(0).uniform(0.08, 1.0, N_DRAWS)
  side = np.round(np.sqrt(area))
  assert stats.ks_2samp(side, theirs["width"], method="asymp").pvalue < 0.01


def test_crop_boxes_lie_inside_the_image():
  u = np.random.default_rng(3).uniform(size=(2000, aug.CROP_UNIFORMS)).astype(np.float32)
  top, left, h, w = jax.jit(aug.draw_crop, static_argnums=(2, 3))(u, jnp.float32(0.08), *OBLONG)
  assert bool(((top >= 0) & (left >= 0) & (h > 0) & (w > 0)).all())
  assert bool(((top + h <= OBLONG[0]) & (left + w <= OBLONG[1])).all())


# -- the composition --

def test_augment_is_the_reference_pipeline_at_the_drawn_parameters():
  """Flip, rotation and resized crop, per sample, equal torchvision's functional ones in the
  reference's order at the same parameters (jitter left out: tests/core/test_color.py covers it)."""
  x, x_t = _images(size=OBLONG, channels=3)
  spec = aug.AugmentSpec(photometric=False)
  key = jax.random.key(4)
  ours = np.asarray(augment(key, x, STRONG, spec=spec))
  draws = aug.draw(jax.random.split(key)[0], 8, STRONG, *OBLONG)
  flips, angles = draws.flip.tolist(), draws.angle.tolist()
  boxes = np.stack(draws[2:], -1).tolist()
  assert 0 < sum(flips) < 8 and len(set(map(tuple, boxes))) == 8
  for i in range(8):
    img = TF.horizontal_flip(x_t[i]) if flips[i] else x_t[i]
    img = TF.rotate(img, angles[i], interpolation=TF.InterpolationMode.NEAREST, fill=0)
    img = TF.resized_crop(img, *boxes[i], size=list(OBLONG), antialias=True)
    np.testing.assert_allclose(ours[i], _nhwc(img[None])[0], rtol=0, atol=1e-5, err_msg=str(i))


@jax.jit
def _by_hand(key, x, params):
  """Flip, rotation, jitter (with saturation), crop: the reference's order, from augment's keys."""
  key_geometry, key_color = jax.random.split(key)
  draws = aug.draw(key_geometry, x.shape[0], params, *x.shape[1:3])
  x = warp.rotate(aug.hflip(x, draws.flip), draws.angle)
  x = color.jitter(key_color, x, params.jitter_val, True)
  return warp.resized_crop(x, *draws[2:])


def test_augment_applies_the_jitter_between_rotation_and_crop():
  x, _ = _images(channels=3)
  key = jax.random.key(5)
  ours = augment(key, x, STRONG, spec=aug.AugmentSpec(saturation=True))
  np.testing.assert_allclose(ours, _by_hand(key, x, STRONG), rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels, spec", [(1, aug.AugmentSpec()), (3, aug.AugmentSpec(saturation=True))])
def test_zero_strengths_are_the_identity(channels, spec):
  x, _ = _images(channels=channels)
  np.testing.assert_array_equal(augment(jax.random.key(6), x, IDENTITY, spec=spec), x)


def test_switched_off_transforms_do_nothing():
  """Anatomical and texture-based data (no flip, rotation or jitter) at full strengths: only the crop
  runs, the whole image at min_scale 1; with the flip on, every image is flipped and nothing else."""
  x, _ = _images()
  strong = IDENTITY._replace(hflip=jnp.float32(1.0), rotation_angle=jnp.float32(45.0), jitter_val=jnp.float32(0.9))
  key = jax.random.key(7)
  np.testing.assert_array_equal(augment(key, x, strong, spec=aug.AugmentSpec(geometric=False, photometric=False)), x)
  flip_only = IDENTITY._replace(hflip=jnp.float32(1.0))
  np.testing.assert_array_equal(augment(key, x, flip_only, spec=aug.AugmentSpec()), x[:, :, ::-1])


def test_every_sample_gets_its_own_draws():
  x, _ = _images(batch=1)
  out = augment(jax.random.key(8), jnp.repeat(x, 8, axis=0), STRONG, spec=aug.AugmentSpec())
  assert len({np.asarray(o).tobytes() for o in out}) == 8


def test_normalised_inputs_are_augmented_in_unit_range_and_normalised_back():
  x, _ = _images(channels=3)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  normalise = lambda v: (v - jnp.array(mean)) / jnp.array(std)  # noqa: E731
  spec = aug.AugmentSpec(saturation=True)
  spec_norm = dataclasses.replace(spec, mean=mean, std=std)
  key = jax.random.key(9)
  ours = augment(key, normalise(x), STRONG, spec=spec_norm)
  np.testing.assert_allclose(ours, normalise(augment(key, x, STRONG, spec=spec)), rtol=0, atol=1e-5)
  np.testing.assert_allclose(augment(key, normalise(x), IDENTITY, spec=spec_norm), normalise(x), rtol=0, atol=1e-6)


def test_different_strengths_share_one_compiled_program(xla_compiles):
  x, _ = _images(batch=3)  # a shape no other test compiles
  program = jax.jit(aug.augment, static_argnames="spec")
  key, spec = jax.random.key(10), aug.AugmentSpec()
  with xla_compiles() as seen:
    first = program(key, x, STRONG, spec=spec)
    second = program(key, x, IDENTITY, spec=spec)
  assert seen.count == 1, seen.by_name
  assert not np.array_equal(first, second)


def test_vmap_over_members_equals_one_call_each():
  x, _ = _images(channels=3)
  members = [STRONG, IDENTITY, aug.AugmentParams.create(1.0, 5.0, 0.1, 0.8), aug.AugmentParams.create()]
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *members)
  spec = aug.AugmentSpec(saturation=True)
  key = jax.random.key(11)
  cohort = jax.jit(jax.vmap(aug.augment, in_axes=(None, None, 0, None)), static_argnums=3)(key, x, stacked, spec)
  for k, member in enumerate(members):
    np.testing.assert_allclose(cohort[k], augment(key, x, member, spec=spec), rtol=0, atol=1e-6, err_msg=str(k))


def test_bad_settings_are_refused_in_one_line():
  with pytest.raises(ValueError, match=r"min_scale must be in \[0, 1\], got min_scale=1.5"):
    aug.AugmentParams.create(min_scale=1.5)
  with pytest.raises(ValueError, match=r"hflip must be in \[0, 1\], got hflip=1.5"):
    aug.AugmentParams.create(hflip=1.5)
  with pytest.raises(ValueError, match=r"rotation_angle must be >= 0, got rotation_angle=-1"):
    aug.AugmentParams.create(rotation_angle=-1)
  with pytest.raises(ValueError, match="mean and std must both be given or both be None"):
    aug.AugmentSpec(mean=(0.5,))
  with pytest.raises(ValueError, match=r"std must be positive, got std=\(0.0,\)"):
    aug.AugmentSpec(mean=(0.5,), std=(0.0,))
  with pytest.raises(ValueError, match=r"AugmentParams.hflip must be a scalar inside augment .* got shape \(2,\)"):
    aug.augment(jax.random.key(0), _images()[0], STRONG._replace(hflip=jnp.zeros(2)), aug.AugmentSpec())
  with pytest.raises(ValueError, match="AugmentSpec.mean/std have 2 values for 1-channel images"):
    aug.augment(jax.random.key(0), _images()[0], STRONG, aug.AugmentSpec(mean=(0.5, 0.5), std=(1.0, 1.0)))
