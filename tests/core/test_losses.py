"""Losses against torch on the same logits, and MixUp's invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchard_jax.core import losses


def _data(seed, batch=12, classes=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, classes)).astype(np.float32) * 3
  labels = rng.integers(0, classes, size=batch)
  weights = rng.uniform(0.2, 3.0, size=classes).astype(np.float32)
  return logits, labels, weights


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_torch_with_weights_and_smoothing(smoothing, weighted):
  logits, labels, weights = _data(0)
  w = weights if weighted else np.ones_like(weights)
  expected = F.cross_entropy(torch.tensor(logits), torch.tensor(labels),
                             weight=torch.tensor(weights) if weighted else None,
                             label_smoothing=smoothing).item()
  ours = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.ones(12, bool),
                              jnp.asarray(w), jnp.float32(smoothing))
  np.testing.assert_allclose(float(ours), expected, rtol=1e-6)


def test_cross_entropy_ignores_padded_rows():
  logits, labels, weights = _data(1)
  mask = np.arange(12) < 7
  expected = F.cross_entropy(torch.tensor(logits[:7]), torch.tensor(labels[:7]),
                             weight=torch.tensor(weights), label_smoothing=0.2).item()
  padded_logits = np.where(mask[:, None], logits, 1e4)  # garbage in the padding must not leak
  ours = losses.cross_entropy(jnp.asarray(padded_logits), jnp.asarray(labels), jnp.asarray(mask),
                              jnp.asarray(weights), jnp.float32(0.2))
  np.testing.assert_allclose(float(ours), expected, rtol=1e-6)


def _torch_focal(logits, labels, weight, gamma, alpha=1.0):
  ce = F.cross_entropy(logits, labels, reduction="none", weight=weight)
  pt = torch.exp(-ce)
  return (alpha * (1 - pt) ** gamma * ce).mean()


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_matches_reference_formula(gamma, weighted):
  logits, labels, weights = _data(2)
  expected = _torch_focal(torch.tensor(logits), torch.tensor(labels),
                          torch.tensor(weights) if weighted else None, gamma).item()
  mask = np.ones(12, bool)
  mask_padded = np.concatenate([mask, np.zeros(4, bool)])
  logits_padded = np.concatenate([logits, np.zeros((4, 5), np.float32)])
  labels_padded = np.concatenate([labels, np.zeros(4, labels.dtype)])
  ours = losses.focal_loss(jnp.asarray(logits_padded), jnp.asarray(labels_padded),
                           jnp.asarray(mask_padded),
                           jnp.asarray(weights if weighted else np.ones(5, np.float32)),
                           jnp.float32(gamma))
  np.testing.assert_allclose(float(ours), expected, rtol=1e-6)


def test_class_weights_are_n_over_c_count_and_one_for_absent_classes():
  labels = np.array([0, 0, 0, 1, 3, 3])
  np.testing.assert_allclose(losses.compute_class_weights(labels, 5),
                             [6 / 15, 6 / 5, 1.0, 6 / 10, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got \[3\]"):
    losses.compute_class_weights(labels, 3)


def test_mixup_off_returns_inputs_unchanged_and_lambda_one():
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
  y = jnp.arange(8) % 3
  mask = jnp.ones(8, bool)
  for enabled, alpha in [(False, 0.4), (True, 0.0)]:
    mixed, _, lam = losses.mixup(jax.random.key(1), x, y, mask, jnp.float32(alpha), jnp.bool_(enabled))
    assert float(lam) == 1.0
    np.testing.assert_array_equal(mixed, x)


def test_mixup_blends_with_a_permutation_and_beta_lambda():
  x = jax.random.normal(jax.random.key(0), (16, 3))
  y = jnp.arange(16)
  mixed, y_perm, lam = losses.mixup(jax.random.key(2), x, y, jnp.ones(16, bool),
                                    jnp.float32(0.4), jnp.bool_(True))
  assert 0.0 < float(lam) < 1.0
  assert sorted(np.asarray(y_perm).tolist()) == list(range(16))
  np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[y_perm], rtol=1e-6)
  # lam ~ Beta(a, a): the mean over many keys is 1/2 and the variance 1 / (4 (2a + 1)).
  keys = jax.random.split(jax.random.key(3), 4000)
  lams = jax.vmap(lambda k: losses.mixup(k, x, y, jnp.ones(16, bool), jnp.float32(0.4),
                                         jnp.bool_(True))[2])(keys)
  assert abs(float(lams.mean()) - 0.5) < 0.03
  assert abs(float(lams.var()) - 1 / (4 * 1.8)) < 0.02


def test_mixup_never_mixes_padding_into_real_rows():
  mask = jnp.array([True] * 5 + [False] * 3)
  for seed in range(20):
    perm = losses.masked_permutation(jax.random.key(seed), mask)
    assert sorted(np.asarray(perm[:5]).tolist()) == list(range(5))
    assert sorted(np.asarray(perm[5:]).tolist()) == [5, 6, 7]
