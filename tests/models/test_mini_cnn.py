"""MiniCNN against the reference's PyTorch module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from orchard_jax.models import MiniCNN, as_model


class TorchMiniCNN(tnn.Module):
  """The reference's MiniCNN, verbatim in structure."""

  def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
    super().__init__()
    self.conv1 = tnn.Conv2d(in_channels, 32, 3, padding=1)
    self.bn1 = tnn.BatchNorm2d(32)
    self.conv2 = tnn.Conv2d(32, 64, 3, padding=1)
    self.bn2 = tnn.BatchNorm2d(64)
    self.conv3 = tnn.Conv2d(64, 128, 3, padding=1)
    self.bn3 = tnn.BatchNorm2d(128)
    self.pool = tnn.MaxPool2d(2, 2)
    self.gap = tnn.AdaptiveAvgPool2d(1)
    self.dropout = tnn.Dropout(dropout)
    self.fc = tnn.Linear(128, num_classes)

  def forward(self, x):
    x = self.pool(torch.relu(self.bn1(self.conv1(x))))
    x = self.pool(torch.relu(self.bn2(self.conv2(x))))
    x = torch.relu(self.bn3(self.conv3(x)))
    x = torch.flatten(self.gap(x), 1)
    return self.fc(self.dropout(x))


def _torch_model(in_channels, num_classes, seed=0):
  """A torch MiniCNN with random BN affine params and running stats."""
  torch.manual_seed(seed)
  m = TorchMiniCNN(in_channels, num_classes)
  with torch.no_grad():
    for bn in (m.bn1, m.bn2, m.bn3):
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.uniform_(-0.5, 0.5)
      bn.running_mean.uniform_(-0.2, 0.2)
      bn.running_var.uniform_(0.5, 2.0)
  return m


def _to_flax(m):
  """The torch module's weights as (params, model_state) for MiniCNN."""
  t = lambda a: jnp.asarray(a.detach().numpy())  # noqa: E731
  params, stats = {}, {}
  for i in (1, 2, 3):
    conv, bn = getattr(m, f"conv{i}"), getattr(m, f"bn{i}")
    params[f"conv{i}"] = {"kernel": t(conv.weight).transpose(2, 3, 1, 0), "bias": t(conv.bias)}
    params[f"bn{i}"] = {"scale": t(bn.weight), "bias": t(bn.bias)}
    stats[f"bn{i}"] = {"mean": t(bn.running_mean), "var": t(bn.running_var)}
  params["fc"] = {"kernel": t(m.fc.weight).T, "bias": t(m.fc.bias)}
  return params, {"batch_stats": stats}


def _inputs(in_channels, shape=(4, 9, 11), seed=1):
  """Random NCHW torch input (odd H/W exercise pooling floors) and its NHWC copy."""
  x = np.random.default_rng(seed).normal(size=(shape[0], in_channels, *shape[1:])).astype(np.float32)
  return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def _n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [10, 2])
def test_trainable_parameter_count_equals_torch(in_channels, num_classes):
  model = as_model(MiniCNN(num_classes))
  params, _ = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8, 8, in_channels)))
  torch_count = sum(p.numel() for p in TorchMiniCNN(in_channels, num_classes).parameters() if p.requires_grad)
  assert _n_params(params) == torch_count


def test_flax_params_have_the_torch_layout_after_transposition():
  ours, _ = jax.eval_shape(as_model(MiniCNN(10)).init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  theirs, _ = _to_flax(TorchMiniCNN(3, 10))
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)


def test_eval_logits_equal_torch():
  m = _torch_model(3, 10).eval()
  params, state = _to_flax(m)
  x_t, x = _inputs(3)
  logits, new_state = as_model(MiniCNN(10)).apply(params, state, x, train=False, rng=jax.random.key(0))
  with torch.no_grad():
    expected = m(x_t).numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, new_state, state)


def test_train_logits_and_running_means_equal_torch():
  m = _torch_model(1, 2).train()
  params, state = _to_flax(m)
  x_t, x = _inputs(1)
  logits, new_state = as_model(MiniCNN(2)).apply(params, state, x, train=True, rng=jax.random.key(0))
  with torch.no_grad():
    expected = m(x_t).numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
  for i in (1, 2, 3):
    np.testing.assert_allclose(
        new_state["batch_stats"][f"bn{i}"]["mean"],
        getattr(m, f"bn{i}").running_mean.numpy(),
        rtol=1e-4,
        atol=1e-4,
    )


def test_train_running_var_uses_biased_batch_variance_unlike_torch():
  """flax: 0.9 * old + 0.1 * var; torch: 0.9 * old + 0.1 * var * n / (n - 1)."""
  m = _torch_model(3, 10)
  params, state = _to_flax(m)
  old = {i: getattr(m, f"bn{i}").running_var.clone().numpy() for i in (1, 2, 3)}
  x_t, x = _inputs(3, shape=(2, 4, 6))
  _, new_state = as_model(MiniCNN(10)).apply(params, state, x, train=True, rng=jax.random.key(0))
  m.train()
  with torch.no_grad():
    m(x_t)
  # Elements per channel reduced by bn1, bn2, bn3: B*H*W at 4x6, 2x3, 1x1.
  for i, n in zip((1, 2, 3), (2 * 4 * 6, 2 * 2 * 3, 2 * 1 * 1)):
    torch_var = getattr(m, f"bn{i}").running_var.numpy()
    unbiased_batch_var = (torch_var - 0.9 * old[i]) / 0.1
    expected = 0.9 * old[i] + 0.1 * unbiased_batch_var * (n - 1) / n
    ours = np.asarray(new_state["batch_stats"][f"bn{i}"]["var"])
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(ours, torch_var, rtol=1e-4, atol=1e-4)


def test_dropout_acts_in_train_mode_only():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  model = as_model(MiniCNN(10, dropout=0.5))
  params, state = model.init(jax.random.key(0), x)
  a, _ = model.apply(params, state, x, train=True, rng=jax.random.key(1))
  b, _ = model.apply(params, state, x, train=True, rng=jax.random.key(2))
  assert not np.allclose(a, b)
  e, _ = model.apply(params, state, x, train=False, rng=jax.random.key(1))
  e0, _ = as_model(MiniCNN(10)).apply(params, state, x, train=False, rng=jax.random.key(2))
  np.testing.assert_array_equal(e, e0)


def test_bfloat16_forward_gives_bfloat16_logits_and_float32_batch_stats():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  model = as_model(MiniCNN(10, dropout=0.2))
  params, state = model.init(jax.random.key(0), x)
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  step = jax.jit(lambda p, s, x, r: model.apply(p, s, x, train=True, rng=r))
  logits, new_state = step(bf16, state, x.astype(jnp.bfloat16), jax.random.key(1))
  assert logits.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert {a.dtype for a in jax.tree.leaves(new_state)} == {jnp.dtype(jnp.float32)}
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(new_state))
  eval_logits, _ = model.apply(bf16, new_state, x.astype(jnp.bfloat16), train=False, rng=jax.random.key(1))
  assert eval_logits.dtype == jnp.bfloat16


def test_masked_padded_batch_trains_like_the_unpadded_batch():
  x = jax.random.normal(jax.random.key(1), (5, 8, 8, 3))
  x_padded = jnp.concatenate([x, jnp.full((3, 8, 8, 3), 20.0)])
  mask = jnp.arange(8) < 5
  model = as_model(MiniCNN(4))
  params, state = model.init(jax.random.key(0), x)
  logits, new_state = model.apply(params, state, x, train=True, rng=jax.random.key(1))
  logits_p, new_state_p = model.apply(params, state, x_padded, train=True, rng=jax.random.key(1), mask=mask)
  np.testing.assert_allclose(logits_p[:5], logits, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_state_p, new_state)
  _, unmasked = model.apply(params, state, x_padded, train=True, rng=jax.random.key(1))
  assert not np.allclose(unmasked["batch_stats"]["bn1"]["mean"], new_state["batch_stats"]["bn1"]["mean"])


def test_all_padding_mask_falls_back_to_all_rows_instead_of_nan_statistics():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  model = as_model(MiniCNN(4))
  params, state = model.init(jax.random.key(0), x)
  none, none_state = model.apply(params, state, x, train=True, rng=jax.random.key(1), mask=jnp.zeros(4, bool))
  full, full_state = model.apply(params, state, x, train=True, rng=jax.random.key(1))
  np.testing.assert_array_equal(none, full)
  jax.tree.map(np.testing.assert_array_equal, none_state, full_state)


def test_mini_cnn_checks_mask_shape():
  model = as_model(MiniCNN(4))
  x = jnp.ones((4, 8, 8, 3))
  params, state = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"mask must have shape \(4,\), got mask.shape=\(3,\)"):
    model.apply(params, state, x, train=True, rng=jax.random.key(1), mask=jnp.ones(3, bool))


def test_mini_cnn_checks_input_rank_and_declared_in_channels():
  model = as_model(MiniCNN(10, in_channels=1))
  with pytest.raises(ValueError, match=r"in_channels=1, got inputs of shape \(2, 8, 8, 3\)"):
    model.init(jax.random.key(0), jnp.ones((2, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"rank 4, got shape \(2, 8, 8\)"):
    model.init(jax.random.key(0), jnp.ones((2, 8, 8)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0), "num_classes must be >= 1, got num_classes=0"),
        (dict(num_classes=2, dropout=1.0), r"dropout must be in \[0, 1\), got dropout=1.0"),
        (dict(num_classes=2, in_channels=0), "in_channels must be >= 1 or None, got in_channels=0"),
    ],
)
def test_mini_cnn_rejects_invalid_configuration(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MiniCNN(**kwargs)
