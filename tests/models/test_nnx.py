"""The Model contract through the NNX adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from orchard_jax.models import NNXModel, as_model


class _ConvNet(nnx.Module):
  """Conv -> BatchNorm -> ReLU -> global mean -> Dropout -> Linear (NHWC)."""

  def __init__(self, in_channels: int, num_classes: int, *, rate: float = 0.5, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_channels, 8, (3, 3), padding="SAME", rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(rate, rngs=rngs)
    self.head = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.head(self.dropout(x.mean(axis=(1, 2))))


class _MaskedNet(nnx.Module):
  """Linear -> BatchNorm that takes a row mask."""

  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)

  def __call__(self, x, mask=None):
    return self.bn(self.lin(x), mask=None if mask is None else mask[:, None])


class _Linear(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.lin(x.reshape(x.shape[0], -1))


_X = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
# Separate streams, so that the dropout rate does not change the weights.
_RNGS_SPLIT = dict(params=0, dropout=1)


def _init(rate=0.5, rngs=None):
  model = as_model(_ConvNet(3, 5, rate=rate, rngs=nnx.Rngs(**(rngs or _RNGS_SPLIT))))
  params, state = model.init(jax.random.key(9), _X)
  return model, params, state


def _values(tree):
  return jax.tree.leaves(tree)


def test_as_model_wraps_nnx_module_in_nnx_model():
  assert isinstance(as_model(_ConvNet(3, 5, rngs=nnx.Rngs(0))), NNXModel)


def test_nnx_wrappers_of_equal_architecture_compare_and_hash_equal_whatever_weights_or_mode():
  a = as_model(_ConvNet(3, 5, rngs=nnx.Rngs(0)))
  module_b = _ConvNet(3, 5, rngs=nnx.Rngs(1))
  module_b.eval()
  b = as_model(module_b)
  assert a == b
  assert hash(a) == hash(b)


def test_nnx_wrappers_of_different_architecture_compare_unequal():
  a = as_model(_ConvNet(3, 5, rngs=nnx.Rngs(0)))
  assert a != as_model(_ConvNet(3, 4, rngs=nnx.Rngs(0)))
  assert a != as_model(_ConvNet(3, 5, rate=0.1, rngs=nnx.Rngs(0)))


def test_nnx_init_returns_the_module_params_and_batch_stats_only():
  module = _ConvNet(3, 5, rngs=nnx.Rngs(0))
  params, state = as_model(module).init(jax.random.key(9), _X)
  np.testing.assert_array_equal(params["conv"]["kernel"][...], module.conv.kernel[...])
  assert set(params) == {"conv", "bn", "head"}
  kinds = {type(v) for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))}
  assert kinds == {nnx.BatchStat}


def test_nnx_init_rejects_sample_input_the_module_cannot_take():
  model = as_model(_ConvNet(3, 5, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="feature dimension"):
    model.init(jax.random.key(9), jnp.ones((4, 6, 6, 2)))


def test_nnx_apply_leaves_the_wrapped_module_untouched():
  module = _ConvNet(3, 5, rngs=nnx.Rngs(0))
  arrays = lambda m: nnx.state(m, nnx.Not(nnx.RngState))  # noqa: E731  (keys don't convert to numpy)
  before = jax.tree.map(np.asarray, arrays(module))
  model = as_model(module)
  params, state = model.init(jax.random.key(9), _X)
  model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  model.apply(params, state, _X, train=False, rng=jax.random.key(2))
  jax.tree.map(np.testing.assert_array_equal, arrays(module), before)
  assert module.dropout.deterministic is False  # as_model did not switch it to eval


def test_nnx_train_apply_updates_batch_stats():
  model, params, state = _init()
  _, new_state = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  assert not np.allclose(new_state["bn"]["mean"][...], state["bn"]["mean"][...])


def test_nnx_eval_apply_leaves_model_state_unchanged():
  model, params, state = _init()
  _, new_state = model.apply(params, state, _X, train=False, rng=jax.random.key(2))
  jax.tree.map(np.testing.assert_array_equal, new_state, state)


@pytest.mark.parametrize("rngs", [_RNGS_SPLIT, dict(default=0)], ids=["dropout_stream", "default_stream"])
def test_nnx_dropout_masks_differ_across_rngs_and_repeat_for_one_rng(rngs):
  model, params, state = _init(rngs=rngs)
  a, _ = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  b, _ = model.apply(params, state, _X, train=True, rng=jax.random.key(3))
  a2, _ = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, a2)


def test_nnx_dropout_is_identity_in_eval_mode():
  model, params, state = _init(rate=0.5)
  no_dropout, params0, _ = _init(rate=0.0)
  jax.tree.map(np.testing.assert_array_equal, params, params0)  # same weights
  a, _ = model.apply(params, state, _X, train=False, rng=jax.random.key(2))
  b, _ = no_dropout.apply(params, state, _X, train=False, rng=jax.random.key(3))
  np.testing.assert_array_equal(a, b)


def test_nnx_model_state_structure_is_stable_across_jitted_steps():
  model, params, state = _init()
  step = jax.jit(lambda p, s, x, r: model.apply(p, s, x, train=True, rng=r))
  new_state = state
  for i in range(3):
    _, new_state = step(params, new_state, _X, jax.random.key(i))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert [a.dtype for a in _values(new_state)] == [a.dtype for a in _values(state)]


def test_nnx_grads_are_finite_under_jit():
  model, params, state = _init()

  def loss(p, s, x, rng):
    logits, new_s = model.apply(p, s, x, train=True, rng=rng)
    return jnp.mean(logits**2), new_s

  grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params, state, _X, jax.random.key(2))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in _values(grads))
  assert any(bool(jnp.any(g != 0)) for g in _values(grads))


def test_nnx_grad_outside_jit_does_not_mutate_the_callers_state():
  model, params, state = _init()
  before = [np.asarray(a) for a in _values(state)]
  jax.grad(lambda p: model.apply(p, state, _X, train=True, rng=jax.random.key(2))[0].sum())(params)
  for a, b in zip(_values(state), before):
    np.testing.assert_array_equal(a, b)


def test_nnx_jitted_step_traces_once_across_values():
  model, params, state = _init()
  traces = []

  @jax.jit
  def step(p, s, x, rng):
    traces.append(1)
    return model.apply(p, s, x, train=True, rng=rng)

  _, state2 = step(params, state, _X, jax.random.key(2))
  step(jax.tree.map(lambda a: a + 1.0, params), state2, _X * 2.0, jax.random.key(3))
  assert len(traces) == 1


def test_equal_nnx_wrappers_from_two_trials_share_the_jit_cache():
  traces = []

  def step(model, p, s, x, rng):
    traces.append(1)
    return model.apply(p, s, x, train=True, rng=rng)

  step = jax.jit(step, static_argnums=0)
  for seed in range(2):  # two "trials", each building its own module and wrapper
    model = as_model(_ConvNet(3, 5, rngs=nnx.Rngs(seed)))
    params, state = model.init(jax.random.key(seed), _X)
    step(model, params, state, _X, jax.random.key(2))
  assert len(traces) == 1


def test_nnx_module_without_batchnorm_or_dropout_has_empty_model_state():
  model = as_model(_Linear(nnx.Rngs(0)))
  x = jnp.ones((2, 3))
  params, state = model.init(jax.random.key(0), x)
  logits, new_state = model.apply(params, state, x, train=True, rng=jax.random.key(1))
  assert logits.shape == (2, 2)
  assert _values(state) == [] and _values(new_state) == []


def test_nnx_mask_reaches_a_module_that_takes_one_and_excludes_padding_from_stats():
  model = as_model(_MaskedNet(nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(3), (5, 3))
  x_padded = jnp.concatenate([x, jnp.full((2, 3), 50.0)])
  mask = jnp.arange(7) < 5
  params, state = model.init(jax.random.key(0), x)
  logits, new_state = model.apply(params, state, x, train=True, rng=jax.random.key(1))
  logits_p, new_state_p = model.apply(params, state, x_padded, train=True, rng=jax.random.key(1), mask=mask)
  np.testing.assert_allclose(logits_p[:5], logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_state_p, new_state)
  _, unmasked = model.apply(params, state, x_padded, train=True, rng=jax.random.key(1))
  assert not np.allclose(unmasked["bn"]["mean"][...], new_state["bn"]["mean"][...])


def test_nnx_mask_is_dropped_for_a_module_without_a_mask_parameter():
  model, params, state = _init()
  mask = jnp.array([True, True, True, False])
  with_mask, _ = model.apply(params, state, _X, train=True, rng=jax.random.key(2), mask=mask)
  without, _ = model.apply(params, state, _X, train=True, rng=jax.random.key(2))
  np.testing.assert_array_equal(with_mask, without)
