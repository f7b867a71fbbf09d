"""load_torch_state_dict: names, layouts, the reference's adaptations, and its error reports."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchard_jax.models import EfficientNetB0, ResNet18, ViTTiny, as_model
from orchard_jax.models.torch_weights import flax_module_path, flax_path, load_torch_state_dict, torch_key

from . import torch_reference as tr


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
  """A torchvision-shaped ResNet-18 (3 channels, 1000 classes), randomised, saved to a file."""
  calibrate = tr.random_images(8, 64, seed=5)[0]
  model = tr.randomize_(tr.ResNet18(1000), calibrate=calibrate)
  return model, tr.save_state_dict(model, tmp_path_factory.mktemp("ckpt") / "resnet18.pt")


def _resnet_targets(num_classes=1000, in_channels=3, low_res=False, size=64):
  return tr.abstract_init(as_model(ResNet18(num_classes, low_res=low_res)), jnp.zeros((1, size, size, in_channels)))


@pytest.mark.parametrize("module, path", [
    ("layer1.0.downsample.0", ("layer1_0", "downsample_0")),
    ("features.2.1.block.3.1", ("features_2_1", "block_3_1")),
    ("blocks.3.attn.qkv", ("blocks_3", "attn", "qkv")),
    ("patch_embed.proj", ("patch_embed", "proj")),
    ("", ()),
])
def test_flax_module_path_joins_numeric_parts_to_their_parent(module, path):
  assert flax_module_path(module) == path


def test_flax_path_resolves_leaf_names_by_what_the_module_has():
  targets = {("params", "conv1", "kernel"): 0, ("params", "bn1", "scale"): 0,
             ("batch_stats", "bn1", "var"): 0, ("params", "fc", "bias"): 0}
  assert flax_path("conv1.weight", targets) == ("params", "conv1", "kernel")
  assert flax_path("bn1.weight", targets) == ("params", "bn1", "scale")
  assert flax_path("bn1.running_var", targets) == ("batch_stats", "bn1", "var")
  assert flax_path("fc.bias", targets) == ("params", "fc", "bias")
  assert flax_path("fc.weight", targets) is None


@pytest.mark.parametrize("key", ["layer4.1.bn2.running_mean", "features.0.0.weight", "cls_token",
                                 "features.1.0.layer_scale", "blocks.11.mlp.fc2.bias"])
def test_torch_key_inverts_the_mapping(key):
  path = flax_path(key, {p: 0 for p in [
      ("batch_stats", "layer4_1", "bn2", "mean"), ("params", "features_0_0", "kernel"),
      ("params", "cls_token"), ("params", "features_1_0", "layer_scale"),
      ("params", "blocks_11", "mlp", "fc2", "bias")]})
  assert torch_key(path) == key


def test_grayscale_low_res_model_with_new_head_gets_the_reference_stem_surgery(resnet_checkpoint):
  torch_model, path = resnet_checkpoint
  flax_model = as_model(ResNet18(10, low_res=True))
  x_t, x = tr.random_images(2, 32, channels=1)
  params0, state0 = tr.numpy_init(flax_model, x, seed=3)
  params, state = load_torch_state_dict(path, "resnet_18", params=params0, model_state=state0)
  # The reference's _adapt_stem_28 on the same weights, and the flax head copied over.
  reference = tr.ResNet18(10, in_channels=1, low_res=True)
  sd = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("fc.")}
  w = F.interpolate(sd["conv1.weight"], size=(3, 3), mode="bicubic", align_corners=True)
  sd["conv1.weight"] = w.mean(dim=1, keepdim=True)
  sd["fc.weight"] = torch.from_numpy(np.asarray(params0["fc"]["kernel"]).T.copy())
  sd["fc.bias"] = torch.from_numpy(np.asarray(params0["fc"]["bias"]).copy())
  reference.load_state_dict(sd)
  np.testing.assert_array_equal(params["fc"]["kernel"], params0["fc"]["kernel"])
  expected = tr.torch_logits(reference, x_t)
  assert expected.std() > 0.1
  np.testing.assert_allclose(tr.eval_logits(flax_model, params, state, x), expected, rtol=1e-4, atol=1e-4)


def test_grayscale_stem_is_the_channel_mean_of_the_rgb_kernel():
  torch_model = tr.randomize_(tr.EfficientNetB0(1000))
  targets = tr.abstract_init(as_model(EfficientNetB0(1000)), jnp.zeros((1, 32, 32, 1)))
  params, _ = load_torch_state_dict(torch_model.state_dict(), "efficientnet_b0", params=targets[0],
                                    model_state=targets[1])
  rgb = torch_model.state_dict()["features.0.0.weight"].numpy()  # [32, 3, 3, 3]
  np.testing.assert_allclose(params["features_0_0"]["kernel"], rgb.mean(axis=1, keepdims=True).transpose(2, 3, 1, 0),
                             rtol=1e-6, atol=1e-7)


def test_report_names_unknown_missing_and_mismatched_keys(resnet_checkpoint):
  sd = dict(resnet_checkpoint[0].state_dict())
  sd["extra.weight"] = torch.zeros(3)
  del sd["layer1.0.bn1.running_var"]
  sd["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
  params, state = _resnet_targets()
  with pytest.raises(ValueError) as info:
    load_torch_state_dict(sd, "resnet_18", params=params, model_state=state)
  message = str(info.value)
  assert "state_dict does not fit resnet_18" in message
  assert "1 unknown key(s) ['extra.weight']" in message
  assert "2 missing key(s) ['layer1.0.bn1.running_var', 'layer2.0.conv1.weight']" in message
  assert "layer2.0.conv1.weight: checkpoint (128, 32, 3, 3), model params/layer2_0/conv1/kernel" in message
  assert "torch layout (128, 64, 3, 3)" in message


def test_non_strict_load_warns_and_keeps_the_given_values_for_what_does_not_fit(resnet_checkpoint):
  torch_model, _ = resnet_checkpoint
  sd = dict(torch_model.state_dict())
  sd["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
  model = as_model(ResNet18(1000))
  params0, state0 = tr.numpy_init(model, jnp.zeros((1, 64, 64, 3)))
  with pytest.warns(UserWarning, match=r"shape mismatch.*loaded the leaves that fit \(strict=False\)"):
    params, state = load_torch_state_dict(sd, "resnet_18", params=params0, model_state=state0, strict=False)
  np.testing.assert_array_equal(params["layer2_0"]["conv1"]["kernel"], params0["layer2_0"]["conv1"]["kernel"])
  np.testing.assert_array_equal(params["layer2_0"]["conv2"]["kernel"],
                                sd["layer2.0.conv2.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state["batch_stats"]["bn1"]["var"], sd["bn1.running_var"].numpy())


def test_head_load_refuses_another_class_count_and_head_new_keeps_a_fitting_head(resnet_checkpoint):
  torch_model, path = resnet_checkpoint
  with pytest.raises(ValueError, match=r"fc.weight: checkpoint \(1000, 512\), model params/fc/kernel \(512, 10\)"):
    load_torch_state_dict(path, "resnet_18", params=_resnet_targets(10)[0], model_state=_resnet_targets(10)[1],
                          head="load")
  params0, state0 = tr.numpy_init(as_model(ResNet18(1000)), jnp.zeros((1, 64, 64, 3)))
  params, _ = load_torch_state_dict(path, "resnet_18", params=params0, model_state=state0, head="new")
  np.testing.assert_array_equal(params["fc"]["kernel"], params0["fc"]["kernel"])
  params, _ = load_torch_state_dict(path, "resnet_18", params=params0, model_state=state0)  # "auto"
  np.testing.assert_array_equal(params["fc"]["kernel"], torch_model.state_dict()["fc.weight"].numpy().T)


def test_a_new_head_needs_initialised_values_not_shapes(resnet_checkpoint):
  params, state = _resnet_targets(10)
  with pytest.raises(ValueError, match=r"no values for \['fc.bias', 'fc.weight'\].*jax.eval_shape"):
    load_torch_state_dict(resnet_checkpoint[1], "resnet_18", params=params, model_state=state)


def test_other_input_channel_changes_than_rgb_to_gray_are_shape_mismatches(resnet_checkpoint):
  params, state = _resnet_targets(in_channels=2)
  with pytest.raises(ValueError, match=r"conv1.weight: checkpoint \(64, 3, 7, 7\), model params/conv1/kernel"):
    load_torch_state_dict(resnet_checkpoint[1], "resnet_18", params=params, model_state=state)


def test_vit_position_embedding_of_another_resolution_is_a_shape_mismatch():
  sd = tr.ViTTiny(1000, depth=1).state_dict()  # 224 px: 197 tokens
  targets = tr.abstract_init(as_model(ViTTiny(1000, depth=1)), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 197, 192\), model params/pos_embed \(1, 17, 192\)"):
    load_torch_state_dict(sd, "vit_tiny", params=targets[0], model_state=targets[1])


def test_a_file_without_a_state_dict_is_refused(tmp_path):
  torch.save([torch.zeros(2)], tmp_path / "list.pt")
  params, state = _resnet_targets()
  with pytest.raises(ValueError, match=r"does not hold a state_dict .* got list"):
    load_torch_state_dict(tmp_path / "list.pt", "resnet_18", params=params, model_state=state)


def test_unknown_model_name_and_head_mode_are_refused():
  params, state = _resnet_targets()
  with pytest.raises(ValueError, match=r"unknown model_name='resnet50'; allowed: \['convnext_tiny'"):
    load_torch_state_dict({}, "resnet50", params=params, model_state=state)
  with pytest.raises(ValueError, match=r"head must be one of \('auto', 'new', 'load'\), got head='fresh'"):
    load_torch_state_dict({}, "resnet_18", params=params, model_state=state, head="fresh")
