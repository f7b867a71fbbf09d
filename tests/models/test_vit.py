"""ViT-Tiny/16 against a timm-layout torch module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax.models import ViTTiny, as_model, build_model
from orchard_jax.models.torch_weights import load_torch_state_dict

from . import torch_reference as tr

TIMM_VIT_TINY_PARAMS = 5_717_416  # timm.create_model("vit_tiny_patch16_224")
SMALL = {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}


def test_parameter_count_matches_timm():
  assert tr.n_params(tr.ViTTiny()) == TIMM_VIT_TINY_PARAMS
  params, state = tr.abstract_init(as_model(ViTTiny(1000)), jnp.zeros((1, 224, 224, 3)))
  assert tr.n_params(params) == TIMM_VIT_TINY_PARAMS
  assert params["pos_embed"].shape == (1, 197, 192) and state == {}


def test_eval_logits_equal_torch_at_224_px_from_a_saved_state_dict(tmp_path):
  x_t, x = tr.random_images(2, 224)
  torch_model = tr.randomize_(tr.ViTTiny(10))
  path = tr.save_state_dict(torch_model, tmp_path / "vit_tiny.pt")
  model = as_model(ViTTiny(10))
  shapes, state_shapes = tr.abstract_init(model, x)
  params, state = load_torch_state_dict(path, "vit_tiny", params=shapes, model_state=state_shapes)
  expected = tr.torch_logits(torch_model, x_t)
  assert expected.std() > 0.1
  np.testing.assert_allclose(tr.eval_logits(model, params, state, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_train_step_is_finite_and_keeps_the_policy_dtypes(precision):
  # A small ViT (two narrow blocks, 4 patches + the class token) keeps the compile within CI time.
  module = ViTTiny(3, dropout=0.1, drop_path=0.1, **SMALL)
  tr.check_train_step(module, 16, 3, precision, stem="patch_embed/proj", head="head")


def test_drop_path_and_head_dropout_act_in_train_mode_only():
  model = as_model(ViTTiny(3, dropout=0.5, drop_path=0.5, **SMALL))
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  params, state = tr.numpy_init(model, x)
  apply = jax.jit(lambda train, key: model.apply(params, state, x, train=train, rng=key)[0], static_argnums=0)
  np.testing.assert_array_equal(apply(False, jax.random.key(1)), apply(False, jax.random.key(2)))
  np.testing.assert_array_equal(apply(True, jax.random.key(1)), apply(True, jax.random.key(1)))
  assert not np.allclose(apply(True, jax.random.key(1)), apply(True, jax.random.key(2)))


def test_rejects_sides_that_are_not_multiples_of_the_patch_size():
  with pytest.raises(ValueError, match=r"multiples of patch_size=16, got shape \(1, 28, 28, 3\)"):
    tr.abstract_init(as_model(ViTTiny(3)), jnp.zeros((1, 28, 28, 3)))


def test_rejects_inputs_of_another_size_than_the_position_embedding_was_built_for():
  model = as_model(ViTTiny(3, depth=1))
  params, state = tr.abstract_init(model, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"pos_embed has 5 tokens .* give 1 \+ 16"):
    jax.eval_shape(lambda p: model.apply(p, state, jnp.zeros((1, 64, 64, 3)), train=False,
                                         rng=jax.random.key(0)), params)


def test_build_model_vit_tiny_checks_the_resolution_against_the_patch_size():
  assert build_model("vit_tiny", num_classes=2, resolution=224, in_channels=1).module == ViTTiny(2, in_channels=1)
  with pytest.raises(ValueError, match="multiple of patch_size=16, got resolution=28"):
    build_model("vit_tiny", num_classes=2, resolution=28)
