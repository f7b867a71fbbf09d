"""train_epoch / evaluate over real DataLoaders: exact metrics, padding, one compile."""

import warnings

import jax
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from orchard_jax import MLP, MiniCNN, create_train_state, eval_step, evaluate, train_epoch
from orchard_jax.core import executables
from orchard_jax.engine import epoch as epoch_module

C = 4


def _dataset(n, seed=0, classes=C):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 1, 6, 6)).astype(np.float32)  # NCHW, as torch pipelines give
  y = rng.integers(0, classes, n)
  y[:classes] = np.arange(classes)  # every class present
  return x, y


def _loader(x, y, batch_size, shuffle=False):
  return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch_size,
                    shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def _state(model=None, **kw):
  kw = {"mixup_alpha": 0.0, "learning_rate": 0.05, **kw}
  return create_train_state(model or MiniCNN(num_classes=C), input_shape=(6, 6, 1), num_classes=C,
                            **kw)


def _reference_metrics(state, x, y):
  """The reference's definitions on the whole set at once, with scikit-learn."""
  batch = {"image": np.transpose(x, (0, 2, 3, 1)), "label": y.astype(np.int32),
           "mask": np.ones(len(y), bool)}
  logits = np.asarray(eval_step(state, batch)["logits"], np.float64)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  preds = probs.argmax(1)
  return {"loss": float(np.mean(-np.log(probs[np.arange(len(y)), y]))),
          "accuracy": accuracy_score(y, preds),
          "auc": roc_auc_score(y, probs, multi_class="ovr", average="macro"),
          "f1": f1_score(y, preds, average="macro", zero_division=0)}


def test_padded_epochs_match_whole_set_metrics_and_compile_once():
  x, y = _dataset(70)  # 70 = 4 * 16 + 6: a padded last batch
  state = _state()
  executables.clear()
  for epoch in range(1, 4):
    state, loss = train_epoch(state, _loader(x, y, 16, shuffle=True), epoch=epoch)
    metrics = evaluate(state, _loader(x, y, 16), epoch=epoch)
  assert np.isfinite(loss)
  assert executables.stats("train_step")["compiled"] == 1
  assert executables.stats("eval_step")["compiled"] == 1
  expected = _reference_metrics(state, x, y)
  for key in expected:
    np.testing.assert_allclose(metrics[key], expected[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_single_batch_and_two_class_metrics_match_sklearn():
  x, y = _dataset(9, seed=3, classes=2)
  state = create_train_state(MLP(num_classes=2, hidden=(8,)), input_shape=(6, 6, 1), num_classes=2)
  metrics = evaluate(state, _loader(x, y, 32))
  logits = np.asarray(eval_step(state, {"image": np.transpose(x, (0, 2, 3, 1)), "label": y.astype(np.int32),
                                        "mask": np.ones(9, bool)})["logits"], np.float64)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  np.testing.assert_allclose(metrics["auc"], roc_auc_score(y, probs[:, 1]), rtol=1e-6)
  np.testing.assert_allclose(metrics["f1"], f1_score(y, probs.argmax(1), average="macro",
                                                     zero_division=0), rtol=1e-6)


def test_missing_class_gives_nan_auc_but_finite_f1():
  x, y = _dataset(20)
  y = np.where(y == 3, 0, y)
  metrics = evaluate(_state(), _loader(x, y, 8))
  assert np.isnan(metrics["auc"])
  assert np.isfinite(metrics["f1"]) and np.isfinite(metrics["loss"])


def test_epoch_loss_is_sample_weighted_over_a_padded_last_batch():
  x, y = _dataset(10)
  state = _state(MLP(num_classes=C, hidden=(8,)), learning_rate=1e-7)  # lr tiny: loss ~ constant
  before = _reference_metrics(state, x, y)["loss"]
  _, loss = train_epoch(state, _loader(x, y, 4))
  np.testing.assert_allclose(loss, before, rtol=1e-4)


def test_empty_loaders_give_zero_loss_with_warning_and_nan_metrics():
  state = _state()
  with pytest.warns(RuntimeWarning, match="yielded no batch"):
    _, loss = train_epoch(state, [], epoch=1)
  assert loss == 0.0
  metrics = evaluate(state, [])
  assert set(metrics) == {"loss", "accuracy", "auc", "f1"}
  assert all(np.isnan(v) for v in metrics.values())


def test_diverging_loss_raises_with_the_reference_message():
  x, y = _dataset(32)
  x[5, 0, 0, 0] = np.inf
  state = _state(MLP(num_classes=C, hidden=(8,)))
  with pytest.raises(RuntimeError, match=r"Training diverged: loss=nan at epoch 2"):
    train_epoch(state, _loader(x, y, 8), epoch=2)


def test_bad_label_is_caught_on_the_host_with_its_value():
  x, y = _dataset(16)
  y[9] = 7
  with pytest.raises(ValueError, match="7"):
    train_epoch(_state(), _loader(x, y, 8), epoch=1)


def test_loader_error_propagates_with_epoch_and_batch_index():
  def broken():
    x, y = _dataset(8)
    yield torch.from_numpy(x), torch.from_numpy(y)
    raise OSError("disk went away")
  with pytest.raises(OSError, match="disk went away") as info:
    train_epoch(_state(), broken(), epoch=3)
  assert any("batch 1" in note and "epoch 3" in note for note in info.value.__notes__)


def test_a_resident_loader_trains_and_evaluates_like_its_batches_as_a_list():
  x, y = _dataset(38)  # 38 = 2 * 16 + 6: a padded last batch
  make = lambda: _loader(x, y, 16, shuffle=True)
  a, b = (_state(MLP(num_classes=C, hidden=(8,)), mixup_alpha=0.2) for _ in range(2))
  for epoch in range(1, 3):
    a, loss_a = train_epoch(a, make(), epoch=epoch)   # IndexedBatch rows, gathered in the step
    b, loss_b = train_epoch(b, list(make()), epoch=epoch)  # dict batches
    assert loss_a == loss_b
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))
  assert evaluate(a, _loader(x, y, 16)) == evaluate(b, list(_loader(x, y, 16)))


@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 37])
def test_epoch_sums_are_packed_in_power_of_two_groups_and_summed_in_float64(n):
  rng = np.random.default_rng(n)
  values = rng.uniform(0, 1e4, (n, 3)).astype(np.float32)
  per_batch = [dict(zip(("loss_sum", "correct", "count"), map(jax.numpy.asarray, row)))
               for row in values]
  packed = epoch_module._packed(per_batch)
  sizes = [len(p) for p in packed]
  assert sum(sizes) == n and all(s & (s - 1) == 0 and s <= epoch_module._GROUP for s in sizes)
  got = epoch_module._sums(jax.device_get(packed))
  expected = values.astype(np.float64).sum(axis=0)
  np.testing.assert_allclose([got["loss_sum"], got["correct"], got["count"]], expected, rtol=1e-15)


def test_packing_compiles_at_most_one_program_per_group_size():
  epoch_module._stack.clear_cache()
  one = jax.device_put(np.float32(1))
  for n in range(1, 40):
    epoch_module._packed([{"loss_sum": one, "correct": one, "count": one}] * n)
  assert epoch_module._stack._cache_size() == 5  # groups of 1, 2, 4, 8 and 16
