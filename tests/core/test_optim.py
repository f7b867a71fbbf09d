"""Parity of one optimizer step with torch, on the same weights and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from orchard_jax.core import optim


def _torch_step(opt_name, weights, grads, steps, *, lr, momentum, wd, clip):
  params = [torch.nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in weights]
  if opt_name == "sgd":
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
  else:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
  for _ in range(steps):
    for p, g in zip(params, grads):
      p.grad = torch.tensor(g, dtype=torch.float64)
    if clip:
      torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
  return np.concatenate([p.detach().numpy().ravel() for p in params])


def _jax_step(opt_name, weights, grads, steps, *, lr, momentum, wd, clip):
  params = [jnp.asarray(w, jnp.float32) for w in weights]
  state = optim.init_optimizer(opt_name, params, learning_rate=lr, momentum=momentum,
                               weight_decay=wd, grad_clip=clip)
  tx = optim.optimizer(opt_name)
  for _ in range(steps):
    updates, state = tx.update([jnp.asarray(g, jnp.float32) for g in grads], state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return np.concatenate([np.asarray(p).ravel() for p in params])


def _problem(seed):
  rng = np.random.default_rng(seed)
  weights = [rng.normal(size=(4, 3)), rng.normal(size=(3,))]
  grads = [3.0 * rng.normal(size=(4, 3)), 3.0 * rng.normal(size=(3,))]
  return weights, grads


@pytest.mark.parametrize("clip", [1.0, 0.0, 100.0])
@pytest.mark.parametrize("steps", [1, 3])
def test_sgd_matches_torch_with_coupled_decay_momentum_and_clipping(clip, steps):
  weights, grads = _problem(0)
  kw = dict(lr=0.05, momentum=0.9, wd=0.1, clip=clip)
  np.testing.assert_allclose(_jax_step("sgd", weights, grads, steps, **kw),
                             _torch_step("sgd", weights, grads, steps, **kw), rtol=1e-5, atol=1e-6)


def test_sgd_decay_is_coupled_not_decoupled():
  # With coupled decay, momentum carries wd * p into the second step; decoupled would not.
  weights, grads = _problem(1)
  kw = dict(lr=0.1, momentum=0.9, wd=0.2, clip=0.0)
  ours = _jax_step("sgd", weights, grads, 2, **kw)
  decoupled = _torch_step("adamw", weights, grads, 2, **kw)
  assert not np.allclose(ours, decoupled, atol=1e-3)
  np.testing.assert_allclose(ours, _torch_step("sgd", weights, grads, 2, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [1.0, 0.0])
@pytest.mark.parametrize("steps", [1, 4])
def test_adamw_matches_torch_with_decoupled_decay_and_clipping(clip, steps):
  weights, grads = _problem(2)
  kw = dict(lr=0.01, momentum=0.9, wd=0.05, clip=clip)
  np.testing.assert_allclose(_jax_step("adamw", weights, grads, steps, **kw),
                             _torch_step("adamw", weights, grads, steps, **kw), rtol=1e-5, atol=1e-6)


def test_clipping_happens_before_decay():
  # A huge weight decay term must not be clipped: only the gradient is.
  weights = [np.full((2,), 10.0)]
  grads = [np.full((2,), 1e-3)]
  kw = dict(lr=0.1, momentum=0.0, wd=0.1, clip=1e-4)
  np.testing.assert_allclose(_jax_step("sgd", weights, grads, 1, **kw),
                             _torch_step("sgd", weights, grads, 1, **kw), rtol=1e-6)


def test_hyperparams_are_float32_arrays_in_state():
  state = optim.init_optimizer("sgd", {"w": jnp.ones(2)}, learning_rate=0.1, momentum=0.5,
                               weight_decay=0.0, grad_clip=None)
  for name in ("learning_rate", "momentum", "weight_decay", "grad_clip"):
    assert state.hyperparams[name].dtype == jnp.float32
  state = optim.set_hyperparams(state, learning_rate=0.01)
  assert float(optim.get_hyperparam(state, "learning_rate")) == pytest.approx(0.01)


def test_unknown_optimizer_and_hyperparam_are_refused():
  with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'adamw'\), got optimizer='adam'"):
    optim.optimizer("adam")
  state = optim.init_optimizer("sgd", {"w": jnp.ones(2)}, learning_rate=0.1, momentum=0.5,
                               weight_decay=0.0, grad_clip=1.0)
  with pytest.raises(ValueError, match="lr"):
    optim.set_hyperparams(state, lr=0.1)
