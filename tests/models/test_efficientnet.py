"""EfficientNet-B0 against a torchvision-layout torch module; stochastic depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from orchard_jax.models import EfficientNetB0, as_model, build_model
from orchard_jax.models.efficientnet import make_divisible, stochastic_depth
from orchard_jax.models.torch_weights import load_torch_state_dict

from . import torch_reference as tr

TORCHVISION_EFFICIENTNET_B0_PARAMS = 5_288_548  # torchvision.models.efficientnet_b0()
# A small EfficientNet for the train step: one expanding residual block (expansion, depthwise conv,
# squeeze-excitation, projection, stochastic depth). On XLA:CPU every distinct parameter draw costs
# a compile, so fewer layers keep the test within CI time; the parity test covers the full B0.
SMALL_STAGES = ((6, 3, 1, 8, 8, 2),)


def test_parameter_count_matches_torchvision():
  assert tr.n_params(tr.EfficientNetB0()) == TORCHVISION_EFFICIENTNET_B0_PARAMS
  params, state = tr.abstract_init(as_model(EfficientNetB0(1000)), jnp.zeros((1, 32, 32, 3)))
  assert tr.n_params(params) == TORCHVISION_EFFICIENTNET_B0_PARAMS
  assert len(jax.tree.leaves(state)) == 2 * 49  # mean and var of each BatchNorm, as torch


def test_eval_logits_equal_torch_from_a_saved_state_dict(tmp_path):
  x_t, x = tr.random_images(2, 32)
  torch_model = tr.randomize_(tr.EfficientNetB0(10), calibrate=tr.random_images(8, 32, seed=5)[0])
  path = tr.save_state_dict(torch_model, tmp_path / "efficientnet_b0.pt")
  model = as_model(EfficientNetB0(10))
  shapes, state_shapes = tr.abstract_init(model, x)
  params, state = load_torch_state_dict(path, "efficientnet_b0", params=shapes, model_state=state_shapes)
  expected = tr.torch_logits(torch_model, x_t)
  assert expected.std() > 0.1
  # float32 through 80 layers of random weights: logits reach |66|, and their rounding differs
  # between XLA:CPU and torch by up to 4e-6 of that scale (2.6e-4 absolute on one logit with
  # jax 0.10.2), so the absolute tolerance is relative to the logits' scale.
  np.testing.assert_allclose(tr.eval_logits(model, params, state, x), expected, rtol=1e-4,
                             atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_train_step_is_finite_and_keeps_the_policy_dtypes(precision):
  module = EfficientNetB0(3, stages=SMALL_STAGES, stochastic_depth=0.5)
  tr.check_train_step(module, 8, 3, precision, stem="features_0_0", head="classifier_1")


def _apply_stochastic_depth(rate, train, seed):
  x = jnp.ones((64, 2, 2, 3))
  layer = stochastic_depth(rate, train)
  return layer.apply({}, x, rngs={"dropout": jax.random.key(seed)})


def test_stochastic_depth_drops_whole_samples_and_rescales_survivors_in_train_mode():
  y = np.asarray(_apply_stochastic_depth(0.25, True, 0))
  per_sample = y.reshape(64, -1)
  assert set(np.unique(per_sample)) == {0.0, np.float32(1.0) / np.float32(0.75)}
  assert (per_sample == per_sample[:, :1]).all()  # one draw per sample ("row" mode)
  assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_stochastic_depth_is_a_pure_function_of_the_key_and_identity_in_eval():
  np.testing.assert_array_equal(_apply_stochastic_depth(0.25, True, 3), _apply_stochastic_depth(0.25, True, 3))
  assert not np.array_equal(_apply_stochastic_depth(0.25, True, 3), _apply_stochastic_depth(0.25, True, 4))
  np.testing.assert_array_equal(_apply_stochastic_depth(0.25, False, 3), jnp.ones((64, 2, 2, 3)))


def test_block_stochastic_depth_rates_grow_linearly_to_the_last_block():
  module = EfficientNetB0(3, stages=((1, 3, 1, 8, 8, 1), (6, 5, 2, 8, 16, 2)), stochastic_depth=0.3,
                          dropout=0.1)
  x = jnp.zeros((1, 16, 16, 3))
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
      rates["/".join(context.module.scope.path)] = context.module.rate
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(as_model(module).init, jax.random.key(0), x)
  # Block i of 3 gets 0.3 * i / 3; blocks 0 (8 -> 8) and 2 (16 -> 16) are residual.
  assert rates == {"features_1_0/Dropout_0": 0.0, "features_2_1/Dropout_0": pytest.approx(0.2),
                   "Dropout_0": 0.1}


@pytest.mark.parametrize("value, expected", [(32, 32), (96, 96), (100, 104), (36, 40), (7, 8)])
def test_make_divisible_rounds_as_torchvision(value, expected):
  assert make_divisible(value) == expected


def test_build_model_keeps_the_torchvision_classifier_dropout_unless_given():
  assert build_model("efficientnet_b0", num_classes=4).module.dropout == 0.2
  assert build_model("efficientnet_b0", num_classes=4, in_channels=1, dropout=0.0).module == EfficientNetB0(
      4, dropout=0.0, in_channels=1)


def test_rejects_a_stem_stride_other_than_1_or_2():
  with pytest.raises(ValueError, match="stem_stride must be 1 or 2, got stem_stride=3"):
    EfficientNetB0(3, stem_stride=3)
