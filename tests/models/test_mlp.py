"""The MLP built-in model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax.models import MLP, as_model


def _init(module, x):
  model = as_model(module)
  params, state = model.init(jax.random.key(0), x)
  return model, params, state


@pytest.mark.parametrize("shape", [(4, 12), (4, 3, 4), (4, 2, 2, 3)])
def test_mlp_flattens_any_input_rank_to_logits(shape):
  x = jnp.ones(shape)
  model, params, state = _init(MLP(num_classes=5, hidden=(7,)), x)
  logits, _ = model.apply(params, state, x, train=False, rng=jax.random.key(1))
  assert logits.shape == (4, 5)
  assert params["Dense_0"]["kernel"].shape == (12, 7)


def test_mlp_has_one_dense_per_hidden_width_plus_head_and_no_model_state():
  x = jnp.ones((2, 6))
  _, params, state = _init(MLP(num_classes=3, hidden=(8, 4)), x)
  shapes = {k: v["kernel"].shape for k, v in params.items()}
  assert shapes == {"Dense_0": (6, 8), "Dense_1": (8, 4), "Dense_2": (4, 3)}
  assert state == {}


def test_mlp_without_hidden_layers_is_linear():
  x = jax.random.normal(jax.random.key(2), (3, 4))
  model, params, state = _init(MLP(num_classes=2, hidden=()), x)
  logits, _ = model.apply(params, state, x, train=False, rng=jax.random.key(1))
  expected = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-6)


def test_mlp_hidden_list_is_stored_as_tuple_so_the_module_hashes_by_value():
  a, b = MLP(num_classes=3, hidden=[8, 4]), MLP(num_classes=3, hidden=(8, 4))
  assert a.hidden == (8, 4)
  assert a == b and hash(a) == hash(b)
  assert as_model(a) == as_model(b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0), "num_classes must be >= 1, got num_classes=0"),
        (dict(num_classes=2, hidden=(4, 0)), r"hidden widths must all be >= 1, got hidden=\(4, 0\)"),
        (dict(num_classes=2, dropout=1.0), r"dropout must be in \[0, 1\), got dropout=1.0"),
        (dict(num_classes=2, dropout=-0.1), r"dropout must be in \[0, 1\), got dropout=-0.1"),
    ],
)
def test_mlp_rejects_invalid_configuration(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MLP(**kwargs)


def test_mlp_dropout_differs_across_rngs_in_train_mode_only():
  x = jax.random.normal(jax.random.key(2), (8, 10))
  model, params, state = _init(MLP(num_classes=3, hidden=(32,), dropout=0.5), x)
  a, _ = model.apply(params, state, x, train=True, rng=jax.random.key(1))
  b, _ = model.apply(params, state, x, train=True, rng=jax.random.key(2))
  assert not np.allclose(a, b)
  no_dropout = as_model(MLP(num_classes=3, hidden=(32,), dropout=0.0))
  e, _ = model.apply(params, state, x, train=False, rng=jax.random.key(1))
  e0, _ = no_dropout.apply(params, state, x, train=False, rng=jax.random.key(2))
  np.testing.assert_array_equal(e, e0)


def test_mlp_computes_in_bfloat16_when_params_and_inputs_are_cast():
  x = jax.random.normal(jax.random.key(2), (4, 10))
  model, params, state = _init(MLP(num_classes=3, hidden=(16,), dropout=0.2), x)
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  logits, _ = model.apply(bf16, state, x.astype(jnp.bfloat16), train=True, rng=jax.random.key(1))
  assert logits.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(logits)))
