"""train_epoch / evaluate over real DataLoaders: exact metrics, padding, one compile, bad data."""

import jax
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from orchard_jax import (MLP, MiniCNN, create_train_state, eval_step, evaluate, train_epoch,
                         train_step)
from orchard_jax.engine import executables
from orchard_jax.core.metrics import SUM_KEYS
from orchard_jax.engine import passes as epoch_module
from orchard_jax.errors import DataError, EmptyLoaderError, LoaderError, NonFiniteInputError

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


def test_empty_loaders_raise_instead_of_a_zero_loss_or_nan_metrics():
  state = _state()
  with pytest.raises(EmptyLoaderError, match="^the training loader yielded no batch at epoch 1$"):
    train_epoch(state, [], epoch=1)
  with pytest.raises(EmptyLoaderError, match="^the validation loader yielded no batch at epoch 2$"):
    evaluate(state, [], epoch=2)
  with pytest.raises(EmptyLoaderError, match="^the validation loader yielded no batch$"):
    empty = TensorDataset(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.int64))
    evaluate(state, DataLoader(empty, batch_size=8))


def test_diverging_loss_raises_with_the_reference_message():
  x, y = _dataset(32)
  x[5] = 3e38  # finite, but the logits overflow
  state = _state(MLP(num_classes=C, hidden=(8,)))
  with pytest.raises(RuntimeError, match=r"^Training diverged: loss=(nan|inf) at epoch 2$"):
    train_epoch(state, _loader(x, y, 8), epoch=2)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "per_batch"])
def test_nonfinite_training_inputs_are_bad_data_not_divergence(resident):
  x, y = _dataset(32)
  x[3, 0, 1, 1] = np.nan
  x[17, 0, 0, 0] = np.inf
  x[30] = -np.inf
  loader = _loader(x, y, 8)  # a TensorDataset: its images are made device-resident
  state = _state(MLP(num_classes=C, hidden=(8,)))
  message = (r"^training inputs: 3 rows with NaN or Inf at epoch 1; fix the data "
             r"\(this is not divergence\)$")
  with pytest.raises(NonFiniteInputError, match=message) as info:
    train_epoch(state, loader if resident else list(loader), epoch=1)
  assert isinstance(info.value, DataError) and not isinstance(info.value, RuntimeError)


def test_one_nonfinite_training_row_is_named_in_the_singular():
  x, y = _dataset(10)
  x[9, 0, 2, 2] = np.nan  # in the padded last batch
  with pytest.raises(NonFiniteInputError, match="^training inputs: 1 row with NaN or Inf at epoch 4;"
                     " fix the data"):
    train_epoch(_state(MLP(num_classes=C, hidden=(8,))), _loader(x, y, 4), epoch=4)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "per_batch"])
def test_telling_bad_inputs_from_divergence_costs_the_steps_nothing(resident, xla_compiles):
  x, y = _dataset(40)  # 40 = 2 * 16 + 8: a padded last batch
  bad = x.copy()
  bad[[2, 33]] = np.nan
  make = lambda images: _loader(images, y, 16) if resident else list(_loader(images, y, 16))
  state = _state(MLP(num_classes=C, hidden=(13,)))  # a structure no other test compiles
  executables.clear()
  with xla_compiles() as first:
    state, loss = train_epoch(state, make(x), epoch=1)
    evaluate(state, make(x), epoch=1)
  with xla_compiles() as second:
    with pytest.raises(NonFiniteInputError, match="^training inputs: 2 rows with NaN or Inf at"):
      state, loss = train_epoch(state, make(bad), epoch=2)
  assert first.count >= 2 and second.count == 0  # the inputs are checked on the host
  assert executables.stats("train_step")["compiled"] == 1
  shape = (16, *state.spec.input_shape)
  batch = {"image": jax.numpy.zeros(shape), "label": jax.numpy.zeros(16, "int32"),
           "mask": jax.numpy.ones(16, bool)}
  assert "is_finite" not in str(jax.make_jaxpr(train_step)(state, batch))  # nothing per step


def test_bad_label_is_caught_on_the_host_with_its_value():
  x, y = _dataset(16)
  y[9] = 7
  with pytest.raises(DataError, match=r"^training labels must be in \[0, 4\), got 7 in batch 1 "
                                      r"\(epoch 1\)$"):
    train_epoch(_state(), _loader(x, y, 8), epoch=1)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "per_batch"])
def test_inputs_of_another_shape_than_the_model_s_are_a_data_error(resident):
  x, y = _dataset(16)
  loader = _loader(x[:, :, :5, :5].copy(), y, 8)
  loader = loader if resident else list(loader)
  pattern = (r"^{} inputs have per-sample shape \(5, 5, 1\) \(channels last\) in batch 0 "
             r"\(epoch 2\), but the model's input shape is \(6, 6, 1\)$")
  with pytest.raises(DataError, match=pattern.format("training")):
    train_epoch(_state(), loader, epoch=2)
  with pytest.raises(DataError, match=pattern.format("validation")):
    evaluate(_state(), loader, epoch=2)


def test_nonfinite_validation_logits_are_a_failed_validation_with_their_count():
  x, y = _dataset(48)
  x[[0, 10, 20, 30, 47], 0, 3, 3] = np.nan
  with pytest.raises(ValueError, match=r"^5 of 48 validation rows have non-finite logits "
                                       r"\(5 have NaN or Inf inputs\)$"):
    evaluate(_state(MLP(num_classes=C, hidden=(8,))), _loader(x, y, 16), epoch=2)


def test_loader_error_is_a_data_error_with_epoch_batch_and_the_original():
  def broken():
    x, y = _dataset(8)
    yield torch.from_numpy(x), torch.from_numpy(y)
    raise OSError("disk went away")
  with pytest.raises(LoaderError, match=r"^training loader raised OSError: disk went away while "
                                        r"reading batch 1 \(epoch 3\)$") as info:
    train_epoch(_state(), broken(), epoch=3)
  assert isinstance(info.value.__cause__, OSError)


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
  values = rng.uniform(0, 1e4, (n, len(SUM_KEYS))).astype(np.float32)
  per_batch = [dict(zip(SUM_KEYS, map(jax.numpy.asarray, row))) for row in values]
  packed = epoch_module._packed(per_batch)
  sizes = [len(p) for p in packed]
  assert sum(sizes) == n and all(s & (s - 1) == 0 and s <= epoch_module._GROUP for s in sizes)
  got = epoch_module._sums(jax.device_get(packed))
  expected = values.astype(np.float64).sum(axis=0)
  np.testing.assert_allclose([got[key] for key in SUM_KEYS], expected, rtol=1e-15)


def test_packing_compiles_at_most_one_program_per_group_size():
  epoch_module._stack.clear_cache()
  one = jax.device_put(np.float32(1))
  for n in range(1, 40):
    epoch_module._packed([dict.fromkeys(SUM_KEYS, one)] * n)
  assert epoch_module._stack._cache_size() == 5  # groups of 1, 2, 4, 8 and 16
