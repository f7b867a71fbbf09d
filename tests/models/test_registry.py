"""build_model and the package's exports."""

import pytest

import orchard_jax.models as models
from orchard_jax.models import MLP, LinenModel, MiniCNN, build_model


def test_package_exports_the_documented_names():
  assert set(models.__all__) == {"Model", "as_model", "LinenModel", "NNXModel", "MLP", "MiniCNN", "build_model",
                                 "ResNet18", "EfficientNetB0", "ConvNeXtTiny", "ViTTiny",
                                 "available_models", "MODEL_NAMES"}
  assert all(hasattr(models, name) for name in models.__all__)


def test_build_model_mlp_returns_wrapped_mlp_with_given_options():
  model = build_model("mlp", num_classes=4, dropout=0.25, hidden=(16, 8))
  assert isinstance(model, LinenModel)
  assert model.module == MLP(num_classes=4, hidden=(16, 8), dropout=0.25)


def test_build_model_mini_cnn_passes_in_channels_and_dropout():
  model = build_model("mini_cnn", num_classes=2, in_channels=1, dropout=0.1)
  assert model.module == MiniCNN(num_classes=2, dropout=0.1, in_channels=1)


def test_build_model_twice_gives_equal_hashable_models():
  a = build_model("mini_cnn", num_classes=10, in_channels=3)
  b = build_model("mini_cnn", num_classes=10, in_channels=3)
  assert a == b and hash(a) == hash(b)


def test_build_model_rejects_unknown_name_listing_known_names():
  with pytest.raises(ValueError, match=r"unknown model name='resnet'; known names: \['convnext_tiny', 'efficientnet_b0', 'mini_cnn', 'mlp', 'resnet_18', 'vit_tiny'\]"):
    build_model("resnet", num_classes=10)


def test_build_model_rejects_options_the_module_does_not_have():
  with pytest.raises(TypeError, match="hidden"):
    build_model("mini_cnn", num_classes=10, hidden=(4,))
