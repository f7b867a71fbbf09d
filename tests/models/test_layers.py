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
