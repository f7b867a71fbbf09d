"""ResNet-18 against a torchvision-layout torch module; the registry's resolution rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from orchard_jax.models import ResNet18, as_model, available_models, build_model
from orchard_jax.models.resnet import max_pool_3x3_stride_2, uses_low_res_stem
from orchard_jax.models.torch_weights import load_torch_state_dict

from . import torch_reference as tr

TORCHVISION_RESNET18_PARAMS = 11_689_512  # torchvision.models.resnet18(), 3 channels, 1000 classes


def test_parameter_counts_match_torchvision():
  assert tr.n_params(tr.ResNet18()) == TORCHVISION_RESNET18_PARAMS
  params, _ = tr.abstract_init(as_model(ResNet18(1000)), jnp.zeros((1, 64, 64, 3)))
  assert tr.n_params(params) == TORCHVISION_RESNET18_PARAMS


def test_low_res_parameter_count_equals_torch_surgery_and_is_within_0_1_percent():
  params, _ = tr.abstract_init(as_model(ResNet18(1000, low_res=True)), jnp.zeros((1, 32, 32, 3)))
  assert tr.n_params(params) == tr.n_params(tr.ResNet18(low_res=True))
  assert abs(tr.n_params(params) - TORCHVISION_RESNET18_PARAMS) / TORCHVISION_RESNET18_PARAMS < 1e-3


@pytest.mark.parametrize("low_res, size", [(True, 32), (False, 64)])
def test_eval_logits_equal_torch_from_a_saved_state_dict(tmp_path, low_res, size):
  x_t, x = tr.random_images(2, size)
  torch_model = tr.randomize_(tr.ResNet18(10, low_res=low_res), calibrate=tr.random_images(8, size, seed=5)[0])
  path = tr.save_state_dict(torch_model, tmp_path / "resnet18.pt")
  model = as_model(ResNet18(10, low_res=low_res))
  shapes, state_shapes = tr.abstract_init(model, x)
  params, state = load_torch_state_dict(path, "resnet_18", params=shapes, model_state=state_shapes)
  expected = tr.torch_logits(torch_model, x_t)
  assert expected.std() > 0.1  # logits that depend on the input: a meaningful comparison
  np.testing.assert_allclose(tr.eval_logits(model, params, state, x), expected, rtol=1e-4, atol=1e-4)


def test_max_pool_3x3_stride_2_equals_flax_max_pool_with_torch_padding():
  x = jax.random.normal(jax.random.key(0), (2, 7, 8, 3))
  expected = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(max_pool_3x3_stride_2(x), expected)
  assert max_pool_3x3_stride_2(x).shape == (2, 4, 4, 3)  # torch: floor((H + 2 - 3) / 2) + 1


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_train_step_is_finite_and_keeps_the_policy_dtypes(precision):
  # A small ResNet (one narrow stage of two blocks): on XLA:CPU every distinct parameter draw
  # costs a compile; the parity tests cover the full ResNet-18.
  tr.check_train_step(ResNet18(3, low_res=True, stage_sizes=(2,), width=8), 8, 1, precision,
                      stem="conv1", head="fc")


def test_padding_rows_stay_out_of_batch_statistics():
  model = as_model(ResNet18(3, low_res=True, stage_sizes=(1, 1), width=8))
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 2))
  params, state = tr.numpy_init(model, x)
  step = jax.jit(lambda x, mask: model.apply(params, state, x, train=True, rng=jax.random.key(0), mask=mask))
  padded_logits, padded_state = step(x.at[2].set(100.0), jnp.array([True, True, False]))
  logits, new_state = step(x[:2], None)
  np.testing.assert_allclose(padded_logits[:2], logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), padded_state, new_state)


def test_rejects_inputs_with_other_channel_count_than_built_for():
  model = as_model(ResNet18(3, in_channels=1, stage_sizes=(1,)))
  with pytest.raises(ValueError, match=r"in_channels=1, got inputs of shape \(1, 8, 8, 3\)"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize("resolution, low_res", [(28, True), (32, True), (64, True), (65, False),
                                                 (224, False)])
def test_low_res_stem_is_used_for_28_to_64_px(resolution, low_res):
  assert uses_low_res_stem(resolution) is low_res
  assert build_model("resnet_18", num_classes=2, resolution=resolution).module.low_res is low_res


def test_build_model_resnet_18_explicit_low_res_wins_and_default_is_torchvision_stem():
  assert build_model("resnet_18", num_classes=2, resolution=224, low_res=True).module.low_res
  assert build_model("resnet_18", num_classes=2).module == ResNet18(2)
  assert build_model("resnet_18", num_classes=2, in_channels=1, dropout=0.3).module == ResNet18(
      2, in_channels=1, dropout=0.3)


@pytest.mark.parametrize("resolution, expected", [
    (28, ["resnet_18", "mini_cnn"]),
    (64, ["resnet_18", "mini_cnn"]),
    (224, ["resnet_18", "efficientnet_b0", "vit_tiny", "convnext_tiny"]),
])
def test_available_models_are_the_reference_search_pools(resolution, expected):
  assert available_models(resolution) == expected


def test_available_models_rejects_a_non_positive_resolution():
  with pytest.raises(ValueError, match="resolution must be >= 1, got resolution=0"):
    available_models(0)
