"""max_pool_2x2 and global_avg_pool against flax and torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from orchard_jax.models.layers import global_avg_pool, max_pool_2x2


def _flax_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _tie_free(shape, seed=0):
  """Distinct values, so every pooling window has a unique maximum."""
  n = int(np.prod(shape))
  return jax.random.permutation(jax.random.key(seed), jnp.arange(n, dtype=jnp.float32)).reshape(shape) / n


SHAPES = [(2, 8, 8, 3), (2, 7, 9, 3), (1, 5, 4, 2), (1, 1, 3, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_max_pool_2x2_values_equal_flax_max_pool(shape):
  x = jax.random.normal(jax.random.key(1), shape)
  np.testing.assert_array_equal(max_pool_2x2(x), _flax_pool(x))


@pytest.mark.parametrize("shape", SHAPES)
def test_max_pool_2x2_gradients_equal_flax_max_pool_on_tie_free_data(shape):
  x = _tie_free(shape)
  w = jax.random.normal(jax.random.key(2), _flax_pool(x).shape)
  grad = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * w))(x)  # noqa: E731
  np.testing.assert_array_equal(grad(max_pool_2x2), grad(_flax_pool))


def test_max_pool_2x2_floors_odd_sizes_like_torch_maxpool2d():
  x = jax.random.normal(jax.random.key(3), (2, 7, 9, 3))
  expected = torch.nn.MaxPool2d(2, 2)(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(max_pool_2x2(x), expected.permute(0, 2, 3, 1).numpy())
  assert max_pool_2x2(x).shape == (2, 3, 4, 3)


def test_max_pool_2x2_splits_tied_gradient_equally_where_flax_picks_the_first_max():
  # One window [[1, 1], [0, 1]]: three tied maxima.
  x = jnp.array([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 2, 1)
  ours = jax.grad(lambda x: max_pool_2x2(x).sum())(x).ravel()
  flax = jax.grad(lambda x: _flax_pool(x).sum())(x).ravel()
  np.testing.assert_allclose(ours, [1 / 3, 1 / 3, 0.0, 1 / 3], rtol=1e-6)
  np.testing.assert_array_equal(flax, [1.0, 0.0, 0.0, 0.0])
  assert float(ours.sum()) == pytest.approx(1.0) and float(flax.sum()) == 1.0


def test_max_pool_2x2_keeps_bfloat16():
  assert max_pool_2x2(jnp.ones((1, 4, 4, 2), jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("layer", [max_pool_2x2, global_avg_pool])
def test_pooling_rejects_arrays_that_are_not_rank_4(layer):
  with pytest.raises(ValueError, match=r"rank 4, got shape \(4, 4, 2\)"):
    layer(jnp.ones((4, 4, 2)))


def test_global_avg_pool_equals_torch_adaptive_avg_pool():
  x = jax.random.normal(jax.random.key(4), (2, 5, 3, 4))
  expected = torch.nn.AdaptiveAvgPool2d(1)(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2))
  np.testing.assert_allclose(global_avg_pool(x), expected.flatten(1).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,features", [((2, 7, 5, 3), 4), ((3, 6, 6, 1), 8)])
def test_conv3x3_equals_flax_conv_in_values_params_and_gradients(shape, features):
  from orchard_jax.models.layers import Conv3x3
  x = jax.random.normal(jax.random.key(0), shape)
  ours, ref = Conv3x3(features), nn.Conv(features, (3, 3), padding="SAME")
  params = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours.apply(params, x, False), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda module: lambda p, x: (module.apply(p, x) ** 2).sum()
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)


@pytest.mark.parametrize("side, im2col", [(2, True), (4, True), (5, False), (8, False)])
def test_evaluation_convolves_images_under_25_pixels_by_im2col(side, im2col):
  from orchard_jax.models.layers import Conv3x3
  x = jax.random.normal(jax.random.key(0), (3, side, side, 16))
  module = Conv3x3(32)
  params = module.init(jax.random.key(1), x)
  jaxpr = str(jax.make_jaxpr(lambda p, x: module.apply(p, x, False))(params, x))
  assert ("conv_general_dilated" not in jaxpr) is (im2col and jax.default_backend() == "cpu")
  np.testing.assert_allclose(module.apply(params, x, False),
                             nn.Conv(32, (3, 3), padding="SAME").apply(params, x),
                             rtol=1e-5, atol=1e-5)


def _bn_pair(momentum=0.9):
  from orchard_jax.models.layers import BatchNorm
  return (BatchNorm(use_running_average=False, momentum=momentum, epsilon=1e-5),
          nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=1e-5))


def _bn_run(module, variables, x, mask):
  def loss(params, x):
    y, updates = module.apply({**variables, "params": params}, x, mask=mask, mutable=["batch_stats"])
    return (y * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size).sum(), (y, updates)
  (_, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)
  return y, updates, grads


@pytest.mark.parametrize("mask_rows", [None, [True, False, True, True, False, True]])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_is_bit_equal_to_flax_batch_norm(mask_rows, dtype):
  ours, ref = _bn_pair()
  x = (3.0 * jax.random.normal(jax.random.key(0), (6, 5, 4, 8)) + 1.5).astype(dtype)
  mask = None if mask_rows is None else jnp.asarray(mask_rows)[:, None, None, None]
  variables = ref.init(jax.random.key(1), x, mask=mask)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x, mask=mask)) == jax.tree.map(
      jnp.shape, variables)
  variables = {"params": jax.tree.map(lambda p: p + 0.3, variables["params"]),
               "batch_stats": jax.tree.map(lambda s: s + 0.2, variables["batch_stats"])}
  y_ours, stats_ours, g_ours = _bn_run(ours, variables, x, mask)
  y_ref, stats_ref, g_ref = _bn_run(ref, variables, x, mask)
  assert y_ours.dtype == y_ref.dtype
  for a, b in zip(jax.tree.leaves((y_ours, stats_ours, g_ours)), jax.tree.leaves((y_ref, stats_ref, g_ref))):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_batch_norm_masked_rows_do_not_reach_the_statistics():
  ours, _ = _bn_pair(momentum=0.0)
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
  mask = jnp.asarray([True, True, False, False])[:, None, None, None]
  padded = x.at[2:].set(1e6)
  variables = ours.init(jax.random.key(1), x)
  _, stats = ours.apply(variables, padded, mask=mask, mutable=["batch_stats"])
  _, real = ours.apply(variables, x[:2], mutable=["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), stats, real)


def test_batch_norm_eval_mode_uses_running_statistics_like_flax():
  from orchard_jax.models.layers import BatchNorm
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 5))
  ref = nn.BatchNorm(use_running_average=True)
  variables = ref.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + 0.25, variables)
  np.testing.assert_array_equal(BatchNorm(use_running_average=True).apply(variables, x),
                                ref.apply(variables, x))


def test_batch_norm_rejects_bad_settings_and_masks():
  from orchard_jax.models.layers import BatchNorm
  with pytest.raises(ValueError, match="momentum must be in"):
    BatchNorm(momentum=1.5)
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    BatchNorm(epsilon=0.0)
  x = jnp.ones((4, 2, 2, 3))
  with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 1, 5\) does not broadcast"):
    BatchNorm(use_running_average=False).init(jax.random.key(0), x, mask=jnp.ones((5,), bool))


def test_batch_norm_counts_masked_rows_without_a_full_size_reduction():
  ours, ref = _bn_pair()
  x = jnp.ones((8, 6, 6, 4))
  mask = jnp.ones((8,), bool)[:, None, None, None]
  variables = ref.init(jax.random.key(0), x)

  def full_size_sums(module):
    jaxpr = jax.make_jaxpr(lambda v, x: module.apply(v, x, mask=mask, mutable=["batch_stats"]))(
        variables, x)
    return sum(1 for eqn in jaxpr.eqns if eqn.primitive.name == "reduce_sum"
               and eqn.invars[0].aval.shape == x.shape)

  assert full_size_sums(ref) == 4  # x, x**2 and, for each of their means, the broadcast mask
  assert full_size_sums(ours) == 2  # x and x**2 only
