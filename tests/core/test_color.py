"""Colour jitter against torchvision's ``v2.ColorJitter`` and its functional adjustments."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from orchard_jax.core import color
from tests.torchvision_cpu import import_functional

TF = import_functional()
from torchvision.transforms import v2  # noqa: E402  (after the CPU stubs above)

FACTORS = (0.0, 0.35, 1.0, 1.7)  # 0 and 1.7 clamp, 1 is the identity
N_DRAWS = 10_000
jitter = jax.jit(color.jitter, static_argnums=3)  # one compile per image shape and flag, not one dispatch per op


def _images(channels, batch=len(FACTORS), size=(5, 6), seed=0):
  """NHWC images in [0, 1] (float32) and their NCHW torch copy."""
  x = np.random.default_rng(seed).uniform(size=(batch, *size, channels)).astype(np.float32)
  return jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_each_adjustment_at_fixed_factors_equals_torchvision(name, channels):
  x, x_t = _images(channels)
  ours = getattr(color, f"adjust_{name}")(x, jnp.asarray(FACTORS))
  theirs = torch.stack([getattr(TF, f"adjust_{name}")(x_t[i], f) for i, f in enumerate(FACTORS)])
  np.testing.assert_allclose(ours, _nhwc(theirs), rtol=0, atol=1e-5)


def test_a_scalar_factor_applies_to_every_image():
  x, x_t = _images(3)
  np.testing.assert_allclose(color.adjust_contrast(x, 0.5), _nhwc(TF.adjust_contrast(x_t, 0.5)), atol=1e-5)


def _torch_params(order_row, factor_row):
  """``ColorJitter.make_params``'s dict for our draws: ``fn_idx`` a permutation of 4 with the set adjustments
  in our order (hue, 3, and an unset saturation wherever: torchvision skips them)."""
  n = len(order_row)
  fn_idx = torch.tensor([*map(int, order_row), *range(n, 4)])
  factors = [float(f) for f in factor_row] + [None] * (3 - n)
  return dict(fn_idx=fn_idx, brightness_factor=factors[0], contrast_factor=factors[1],
              saturation_factor=factors[2], hue_factor=None)


@pytest.mark.parametrize("channels,saturation", [(1, False), (1, True), (3, False), (3, True)])
def test_jitter_applies_the_drawn_factors_in_the_drawn_order_as_colorjitter(channels, saturation):
  batch, jitter_val = 24, 0.9  # factors up to 1.9: clamping makes the order matter
  x, x_t = _images(channels, batch=batch, seed=1)
  key = jax.random.key(3)
  ours = jitter(key, x, jnp.float32(jitter_val), saturation)
  factors, order = color.draw_jitter(key, batch, jnp.float32(jitter_val), 3 if saturation else 2)
  cj = v2.ColorJitter(brightness=jitter_val, contrast=jitter_val, saturation=jitter_val if saturation else 0.0)
  theirs = torch.stack([cj.transform(x_t[i], _torch_params(np.asarray(order[i]), np.asarray(factors[i])))
                        for i in range(batch)])
  np.testing.assert_allclose(ours, _nhwc(theirs), rtol=0, atol=1e-5)
  # the order is a real per-sample choice: the other order of brightness and contrast differs somewhere
  swapped = color.apply_jitter(x, factors, order[:, ::-1])
  assert np.abs(np.asarray(swapped) - np.asarray(ours)).max() > 1e-3


def _torch_draws(jitter_val, saturation, seed=1):
  # seed 1: torch's own seed-0 brightness draws at j=0.4 sit at p=0.008 against the exact uniform
  torch.manual_seed(seed)
  cj = v2.ColorJitter(brightness=jitter_val, contrast=jitter_val, saturation=jitter_val if saturation else 0.0)
  names = ("brightness_factor", "contrast_factor", "saturation_factor")[:3 if saturation else 2]
  factors, orders = [], []
  for _ in range(N_DRAWS):
    p = cj.make_params([])
    factors.append([p[n] for n in names])
    orders.append(tuple(int(i) for i in p["fn_idx"] if int(i) < len(names)))
  return np.asarray(factors), orders


@pytest.fixture(scope="module")
def draws():
  """10,000 draws of torchvision's and ours, for j = 0.4 (range (0.6, 1.4)) and j = 1.5 (clipped to (0, 2.5))."""
  out = {}
  for j, saturation in ((0.4, True), (1.5, False)):
    f, o = color.draw_jitter(jax.random.key(0), N_DRAWS, jnp.float32(j), 3 if saturation else 2)
    out[j] = (np.asarray(f), [tuple(map(int, row)) for row in np.asarray(o)]), _torch_draws(j, saturation)
  return out


@pytest.mark.parametrize("jitter_val", [0.4, 1.5])
def test_factor_draws_follow_torchvision(draws, jitter_val):
  (ours, _), (theirs, _) = draws[jitter_val]
  assert ours.shape == theirs.shape
  for i in range(ours.shape[1]):
    assert stats.ks_2samp(ours[:, i], theirs[:, i]).pvalue > 0.01, i
  low, high = max(0.0, 1.0 - jitter_val), 1.0 + jitter_val
  assert low <= ours.min() and ours.max() <= high


def test_the_factor_test_detects_a_wrong_range(draws):
  (ours, _), _ = draws[0.4]
  wrong, _ = _torch_draws(0.3, True, seed=2)
  assert stats.ks_2samp(ours[:, 0], wrong[:, 0]).pvalue < 0.01


@pytest.mark.parametrize("jitter_val", [0.4, 1.5])
def test_order_draws_follow_torchvision(draws, jitter_val):
  (_, ours), (_, theirs) = draws[jitter_val]
  perms = list(itertools.permutations(range(len(ours[0]))))
  table = [[orders.count(p) for p in perms] for orders in (ours, theirs)]
  assert stats.chi2_contingency(table).pvalue > 0.01
  np.testing.assert_allclose(np.asarray(table[0]) / N_DRAWS, 1 / len(perms), atol=0.02)


def test_zero_jitter_is_the_identity():
  x, _ = _images(3)
  x = x.at[0, 0, 0].set(jnp.asarray([1.5, -0.2, 0.5]))  # torchvision skips everything, out-of-range values too
  for saturation in (False, True):
    np.testing.assert_array_equal(jitter(jax.random.key(0), x, jnp.float32(0.0), saturation), x)
  assert not np.array_equal(jitter(jax.random.key(0), x, jnp.float32(0.2), True), x)


def test_every_sample_gets_its_own_draw():
  x = jnp.broadcast_to(_images(3, batch=1)[0], (4, 5, 6, 3))
  out = np.asarray(jitter(jax.random.key(0), x, jnp.float32(0.5), True))
  assert len({out[i].tobytes() for i in range(4)}) == 4


def test_vmap_over_members_equals_one_call_each():
  x, _ = _images(3)
  keys = jax.random.split(jax.random.key(1), 4)
  vals = jnp.asarray([0.0, 0.1, 0.4, 1.2], jnp.float32)
  batched = jax.jit(jax.vmap(color.jitter, in_axes=(0, None, 0, None)), static_argnums=3)(keys, x, vals, True)
  for k in range(4):
    np.testing.assert_allclose(batched[k], jitter(keys[k], x, vals[k], True), rtol=0, atol=1e-6)


def test_a_new_jitter_value_does_not_recompile(xla_compiles):
  x, _ = _images(1)
  jitter(jax.random.key(0), x, jnp.float32(0.1), False).block_until_ready()
  with xla_compiles() as seen:
    jitter(jax.random.key(0), x, jnp.float32(0.7), False).block_until_ready()
  assert seen.count == 0


def test_bad_inputs_are_refused_in_one_line():
  x, _ = _images(3)
  with pytest.raises(ValueError, match=r"C 1 or 3, got shape \(2, 5, 6, 2\)"):
    color.jitter(jax.random.key(0), x[:2, ..., :2], jnp.float32(0.1), False)
  with pytest.raises(ValueError, match=r"jitter_val must be a scalar.*\(2,\)"):
    color.jitter(jax.random.key(0), x, jnp.zeros(2), False)
  with pytest.raises(ValueError, match="num_ops must be 2"):
    color.draw_jitter(jax.random.key(0), 4, jnp.float32(0.1), 4)
