"""ConvNeXt-Tiny against a torchvision-layout torch module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax.models import ConvNeXtTiny, as_model, build_model
from orchard_jax.models.convnext import CNBlock
from orchard_jax.models.torch_weights import load_torch_state_dict

from . import torch_reference as tr

TORCHVISION_CONVNEXT_TINY_PARAMS = 28_589_128  # torchvision.models.convnext_tiny()
# A small ConvNeXt for the train step: one narrow stage of two blocks. On XLA:CPU every distinct
# parameter draw costs a compile; the parity test covers the full ConvNeXt-Tiny.
SMALL_STAGES = ((16, 2),)


def test_parameter_count_matches_torchvision():
  assert tr.n_params(tr.ConvNeXtTiny()) == TORCHVISION_CONVNEXT_TINY_PARAMS
  params, state = tr.abstract_init(as_model(ConvNeXtTiny(1000)), jnp.zeros((1, 32, 32, 3)))
  assert tr.n_params(params) == TORCHVISION_CONVNEXT_TINY_PARAMS
  assert state == {}


def test_eval_logits_equal_torch_from_a_saved_state_dict(tmp_path):
  x_t, x = tr.random_images(2, 64)
  torch_model = tr.randomize_(tr.ConvNeXtTiny(10))
  path = tr.save_state_dict(torch_model, tmp_path / "convnext_tiny.pt")
  model = as_model(ConvNeXtTiny(10))
  shapes, state_shapes = tr.abstract_init(model, x)
  params, state = load_torch_state_dict(path, "convnext_tiny", params=shapes, model_state=state_shapes)
  expected = tr.torch_logits(torch_model, x_t)
  assert expected.std() > 0.1
  np.testing.assert_allclose(tr.eval_logits(model, params, state, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_train_step_is_finite_and_keeps_the_policy_dtypes_and_layer_scale_starts_at_1e_minus_6(precision):
  module = ConvNeXtTiny(3, stages=SMALL_STAGES, stochastic_depth=0.5, dropout=0.1)
  params, _ = tr.check_train_step(module, 4, 3, precision, stem="features_0_0", head="classifier_2")
  np.testing.assert_array_equal(params["features_1_1"]["layer_scale"], np.full(16, 1e-6, np.float32))


def test_block_stochastic_depth_acts_in_train_mode_only_and_is_a_function_of_the_key():
  block, x = CNBlock(0.5), jax.random.normal(jax.random.key(1), (16, 7, 7, 4))
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)
  apply = jax.jit(lambda train, key: block.apply(params, x, train, rngs={"dropout": key}), static_argnums=0)
  np.testing.assert_array_equal(apply(False, jax.random.key(1)), apply(False, jax.random.key(2)))
  assert not np.all(np.asarray(apply(False, jax.random.key(1))) == np.asarray(x), axis=(1, 2, 3)).any()
  np.testing.assert_array_equal(apply(True, jax.random.key(1)), apply(True, jax.random.key(1)))
  dropped = np.all(np.asarray(apply(True, jax.random.key(1))) == np.asarray(x), axis=(1, 2, 3))
  assert 0 < dropped.sum() < 16  # some samples skip the branch (output == input), others do not
  assert not np.array_equal(apply(True, jax.random.key(1)), apply(True, jax.random.key(2)))


def test_rejects_inputs_smaller_than_the_downsampling_factor():
  with pytest.raises(ValueError, match=r"at least 32x32 px \(it downsamples by 32\), got shape \(1, 28, 28, 3\)"):
    tr.abstract_init(as_model(ConvNeXtTiny(3)), jnp.zeros((1, 28, 28, 3)))


def test_build_model_convnext_tiny_passes_options():
  assert build_model("convnext_tiny", num_classes=5, in_channels=1, dropout=0.2,
                     stochastic_depth=0.0).module == ConvNeXtTiny(5, dropout=0.2, stochastic_depth=0.0, in_channels=1)
