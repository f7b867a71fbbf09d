"""The Model contract through the Linen adapter, and as_model's dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from orchard_jax.models import LinenModel, Model, as_model


class _Net(nn.Module):
  """Dense -> BatchNorm -> ReLU -> Dropout -> Dense, with a `train` flag."""

  num_classes: int = 3
  rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(self.rate, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_classes)(x)


class _DeterministicNet(nn.Module):
  """A module whose flag is `deterministic` (True in eval mode)."""

  @nn.compact
  def __call__(self, x, deterministic: bool):
    return nn.Dropout(0.5, deterministic=deterministic)(nn.Dense(4)(x))


class _SowingNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    self.sow("intermediates", "h", x)
    return nn.Dense(2)(x)


class _ListNet(nn.Module):
  widths: list

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.widths[0])(x)


class _MaskedNet(nn.Module):
  """Dense -> BatchNorm that takes a row mask."""

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = nn.Dense(4)(x)
    bn_mask = None if mask is None else mask[:, None]
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x, mask=bn_mask)


class _HasInitApply:
  def init(self, rng, sample_input):
    return {}, {}

  def apply(self, params, model_state, x, *, train, rng):
    return x, model_state


_X = jax.random.normal(jax.random.key(0), (6, 5))


def _init(model=None):
  model = model or as_model(_Net())
  params, state = model.init(jax.random.key(1), _X)
  return model, params, state


def test_as_model_wraps_linen_module_in_linen_model():
  model = as_model(_Net())
  assert isinstance(model, LinenModel)
  assert isinstance(model, Model)


def test_as_model_returns_object_with_init_and_apply_as_is():
  obj = _HasInitApply()
  assert as_model(obj) is obj


def test_as_model_returns_an_existing_wrapper_as_is():
  model = as_model(_Net())
  assert as_model(model) is model


def test_as_model_rejects_other_objects_naming_type_and_accepted_kinds():
  with pytest.raises(TypeError, match=r"builtins\.int.*flax\.linen\.Module.*flax\.nnx\.Module"):
    as_model(3)


def test_as_model_rejects_train_kwarg_for_non_linen_objects():
  with pytest.raises(TypeError, match="only to flax Linen modules"):
    as_model(_HasInitApply(), train_kwarg="deterministic")


def test_linen_wrappers_of_equal_modules_compare_and_hash_equal():
  a, b = as_model(_Net(num_classes=3)), as_model(_Net(num_classes=3))
  assert a == b
  assert hash(a) == hash(b)


def test_linen_wrappers_of_different_modules_compare_unequal():
  assert as_model(_Net(num_classes=3)) != as_model(_Net(num_classes=4))
  assert as_model(_Net()) != as_model(_DeterministicNet(), train_kwarg="deterministic", invert=True)


def test_linen_model_rejects_unhashable_module_attributes():
  with pytest.raises(TypeError, match="not hashable.*tuples"):
    as_model(_ListNet(widths=[4]))


def test_linen_model_rejects_module_without_the_train_keyword():
  with pytest.raises(TypeError, match=r"no keyword argument 'train'.*deterministic"):
    as_model(_DeterministicNet())


def test_linen_model_inverted_flag_runs_dropout_only_in_train_mode():
  model, params, state = _init(as_model(_DeterministicNet(), train_kwarg="deterministic", invert=True))
  eval_a, _ = model.apply(params, state, _X, train=False, rng=jax.random.key(2))
  eval_b, _ = model.apply(params, state, _X, train=False, rng=jax.random.key(3))
  train_a, _ = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.array_equal(train_a, eval_a)


def test_linen_init_splits_params_from_batch_stats():
  _, params, state = _init()
  assert set(params) == {"Dense_0", "BatchNorm_0", "Dense_1"}
  assert set(state) == {"batch_stats"}
  assert set(state["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}


def test_linen_init_drops_intermediates_collection():
  model, params, state = _init(as_model(_SowingNet()))
  assert state == {}
  _, new_state = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  assert new_state == {}


def test_linen_train_apply_updates_running_stats():
  model, params, state = _init()
  _, new_state = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  mean = new_state["batch_stats"]["BatchNorm_0"]["mean"]
  assert not np.allclose(mean, state["batch_stats"]["BatchNorm_0"]["mean"])
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_linen_eval_apply_leaves_model_state_unchanged():
  model, params, state = _init()
  _, new_state = model.apply(params, state, _X, train=False, rng=jax.random.key(2))
  jax.tree.map(np.testing.assert_array_equal, new_state, state)


def test_linen_dropout_masks_differ_across_rngs_and_repeat_for_one_rng():
  model, params, state = _init()
  a, _ = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  b, _ = model.apply(params, state, _X, train=True, rng=jax.random.key(3))
  a2, _ = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, a2)


def test_linen_dropout_is_identity_in_eval_mode():
  model, params, state = _init()
  no_dropout = as_model(_Net(rate=0.0))
  a, _ = model.apply(params, state, _X, train=False, rng=jax.random.key(2))
  b, _ = no_dropout.apply(params, state, _X, train=False, rng=jax.random.key(3))
  np.testing.assert_array_equal(a, b)


def test_linen_accepts_legacy_uint32_prng_keys():
  model = as_model(_Net())
  params, state = model.init(jax.random.PRNGKey(1), _X)
  a, _ = model.apply(params, state, _X, train=True, rng=jax.random.PRNGKey(2))
  assert a.shape == (6, 3)


def test_apply_rejects_non_bool_train():
  model, params, state = _init()
  with pytest.raises(TypeError, match="train must be a Python bool"):
    model.apply(params, state, _X, train=jnp.array(True), rng=jax.random.key(2))


def test_linen_grads_are_finite_under_jit():
  model, params, state = _init()

  def loss(p, s, x, rng):
    logits, new_s = model.apply(p, s, x, train=True, rng=rng)
    return jnp.mean(logits**2), new_s

  grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params, state, _X, jax.random.key(2))
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == len(jax.tree.leaves(params))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert any(bool(jnp.any(g != 0)) for g in leaves)


def test_linen_jitted_step_traces_once_across_values():
  model, params, state = _init()
  traces = []

  @jax.jit
  def step(p, s, x, rng):
    traces.append(1)
    return model.apply(p, s, x, train=True, rng=rng)

  _, state2 = step(params, state, _X, jax.random.key(2))
  step(jax.tree.map(lambda a: a + 1.0, params), state2, _X * 2.0, jax.random.key(3))
  assert len(traces) == 1


def test_equal_linen_wrappers_from_two_trials_share_the_jit_cache():
  traces = []

  def step(model, p, s, x, rng):
    traces.append(1)
    return model.apply(p, s, x, train=True, rng=rng)

  step = jax.jit(step, static_argnums=0)
  for _ in range(2):  # two "trials", each building its own module and wrapper
    model, params, state = _init(as_model(_Net(num_classes=3)))
    step(model, params, state, _X, jax.random.key(2))
  assert len(traces) == 1



def _padded():
  """_X plus two padding rows of large values, and the mask of the real rows."""
  x_padded = jnp.concatenate([_X, jnp.full((2, _X.shape[1]), 50.0)])
  return x_padded, jnp.arange(x_padded.shape[0]) < _X.shape[0]


def test_linen_mask_reaches_a_module_that_takes_one_and_excludes_padding_from_stats():
  model, params, state = _init(as_model(_MaskedNet()))
  x_padded, mask = _padded()
  logits, new_state = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  logits_p, new_state_p = model.apply(params, state, x_padded, train=True, rng=jax.random.key(2), mask=mask)
  np.testing.assert_allclose(logits_p[: _X.shape[0]], logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_state_p, new_state)
  _, unmasked = model.apply(params, state, x_padded, train=True, rng=jax.random.key(2))
  assert not np.allclose(unmasked["batch_stats"]["BatchNorm_0"]["mean"], new_state["batch_stats"]["BatchNorm_0"]["mean"])


def test_linen_mask_is_dropped_for_a_module_without_a_mask_parameter():
  model, params, state = _init()
  x_padded, mask = _padded()
  with_mask, _ = model.apply(params, state, x_padded, train=True, rng=jax.random.key(2), mask=mask)
  without, _ = model.apply(params, state, x_padded, train=True, rng=jax.random.key(2))
  np.testing.assert_array_equal(with_mask, without)
