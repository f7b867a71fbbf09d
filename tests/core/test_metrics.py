"""Validation metrics against scikit-learn (the reference's definitions), and masked sums."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from orchard_jax.core import metrics

TOL = 1e-6


def _softmax(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _random_case(n, c, seed, quantise=None):
  rng = np.random.default_rng(seed)
  probs = _softmax(rng.normal(size=(n, c)) * 2).astype(np.float32)
  if quantise:  # coarse scores -> many ties; renormalised so rows still sum to 1
    probs = np.round(probs * quantise) / quantise
    probs[:, -1] = 1.0 - probs[:, :-1].sum(axis=1)
  labels = rng.integers(0, c, size=n)
  labels[:c] = np.arange(c)  # every class present
  return probs, labels


def _sk_auc(probs, labels):
  if probs.shape[1] == 2:
    return roc_auc_score(labels, probs[:, 1])
  return roc_auc_score(labels, probs, multi_class="ovr", average="macro")


def _sk_f1(preds, labels):
  return f1_score(labels, preds, average="macro", zero_division=0)


# ----------------------------------------------------------------- roc_auc
@pytest.mark.parametrize("n,c,seed", [(40, 2, 0), (97, 3, 1), (300, 10, 2), (20000, 10, 3)])
def test_roc_auc_matches_sklearn_on_random_probabilities(n, c, seed):
  probs, labels = _random_case(n, c, seed)
  assert metrics.roc_auc(probs, labels) == pytest.approx(_sk_auc(probs, labels), abs=TOL)


@pytest.mark.parametrize("c", [2, 4])
def test_roc_auc_matches_sklearn_with_tied_scores(c):
  probs, labels = _random_case(500, c, seed=7, quantise=10)
  assert len(np.unique(probs[:, 1])) < 15  # the case really has ties
  assert metrics.roc_auc(probs, labels) == pytest.approx(_sk_auc(probs, labels), abs=TOL)


def test_roc_auc_of_constant_scores_is_one_half():
  probs = np.full((6, 2), 0.5, np.float32)
  labels = np.array([0, 1, 0, 1, 1, 0])
  assert metrics.roc_auc(probs, labels) == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=TOL)
  assert metrics.roc_auc(probs, labels) == 0.5


def test_roc_auc_large_multiclass_is_exact_in_float64():
  probs, labels = _random_case(20000, 10, seed=11, quantise=1000)
  assert metrics.roc_auc(probs, labels) == pytest.approx(_sk_auc(probs, labels), abs=1e-12)


def test_binary_roc_auc_with_one_class_present_is_nan():
  probs, _ = _random_case(10, 2, seed=0)
  assert np.isnan(metrics.roc_auc(probs, np.ones(10, np.int64)))
  with pytest.warns(UndefinedMetricWarning, match="Only one class"):  # older sklearn: ValueError
    assert np.isnan(roc_auc_score(np.ones(10), probs[:, 1]))


def test_multiclass_roc_auc_with_a_class_missing_from_labels_is_nan():
  probs, labels = _random_case(50, 4, seed=0)
  labels = np.where(labels == 3, 0, labels)
  assert np.isnan(metrics.roc_auc(probs, labels))
  with pytest.raises(ValueError, match="Number of classes in y_true not equal"):
    _sk_auc(probs, labels)


def test_multiclass_roc_auc_of_rows_not_summing_to_one_is_nan_like_sklearn():
  probs, labels = _random_case(30, 3, seed=0)
  probs = probs * 1.1
  assert np.isnan(metrics.roc_auc(probs, labels))
  with pytest.raises(ValueError, match="should sum up to 1.0"):
    _sk_auc(probs, labels)


def test_roc_auc_of_a_single_sample_is_nan():
  assert np.isnan(metrics.roc_auc(np.array([[0.3, 0.7]]), np.array([1])))


def test_roc_auc_with_non_finite_scores_is_nan():
  probs, labels = _random_case(10, 2, seed=0)
  probs[3, 1] = np.nan
  assert np.isnan(metrics.roc_auc(probs, labels))


def test_roc_auc_rejects_labels_outside_the_classes():
  with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), got \[2\]"):
    metrics.roc_auc(np.full((3, 2), 0.5), np.array([0, 1, 2]))


# ----------------------------------------------------------------- macro_f1
@pytest.mark.parametrize("n,c,seed", [(50, 2, 0), (200, 5, 1), (20000, 10, 2)])
def test_macro_f1_matches_sklearn_on_random_predictions(n, c, seed):
  rng = np.random.default_rng(seed)
  labels, preds = rng.integers(0, c, n), rng.integers(0, c, n)
  assert metrics.macro_f1(preds, labels) == pytest.approx(_sk_f1(preds, labels), abs=TOL)


def test_macro_f1_averages_over_classes_in_labels_or_predictions():
  labels = np.array([0, 0, 1, 1, 1])  # class 2 only predicted, class 3 nowhere
  preds = np.array([0, 2, 1, 1, 0])
  expected = _sk_f1(preds, labels)
  assert metrics.macro_f1(preds, labels) == pytest.approx(expected, abs=TOL)
  assert expected == pytest.approx((2 / 4 + 4 / 5 + 0.0) / 3)  # 3 classes, not 4


def test_macro_f1_when_all_predictions_are_one_class():
  labels = np.array([0, 1, 2, 2, 1, 0, 2])
  preds = np.full(7, 2)
  assert metrics.macro_f1(preds, labels) == pytest.approx(_sk_f1(preds, labels), abs=TOL)


def test_macro_f1_of_a_single_sample():
  assert metrics.macro_f1(np.array([1]), np.array([1])) == _sk_f1(np.array([1]), np.array([1])) == 1.0
  assert metrics.macro_f1(np.array([0]), np.array([1])) == _sk_f1(np.array([0]), np.array([1])) == 0.0


def test_macro_f1_of_empty_inputs_is_nan():
  assert np.isnan(metrics.macro_f1(np.array([], np.int64), np.array([], np.int64)))


# ----------------------------------------------------------------- classification_metrics
def test_classification_metrics_match_sklearn():
  probs, labels = _random_case(500, 5, seed=4)
  probs64 = probs / probs.sum(axis=1, keepdims=True, dtype=np.float64)
  ce = -np.log(probs64[np.arange(500), labels])
  out = metrics.classification_metrics(probs, labels, loss_sum=ce.sum(), count=500)
  preds = probs.argmax(axis=1)
  assert list(out) == ["loss", "accuracy", "auc", "f1"]
  assert out["loss"] == pytest.approx(log_loss(labels, probs64), abs=TOL)
  assert out["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=TOL)
  assert out["auc"] == pytest.approx(_sk_auc(probs, labels), abs=TOL)
  assert out["f1"] == pytest.approx(_sk_f1(preds, labels), abs=TOL)
  assert all(type(v) is float for v in out.values())


def test_classification_metrics_with_a_class_missing_keep_f1_and_give_nan_auc():
  probs, labels = _random_case(60, 4, seed=5)
  labels = np.where(labels == 2, 1, labels)
  out = metrics.classification_metrics(probs, labels, loss_sum=6.0, count=60)
  assert np.isnan(out["auc"])
  assert out["f1"] == pytest.approx(_sk_f1(probs.argmax(1), labels), abs=TOL)
  assert out["loss"] == pytest.approx(0.1)


def test_classification_metrics_of_an_empty_set_are_all_nan():
  out = metrics.classification_metrics(np.zeros((0, 3)), np.zeros(0, np.int64), 0.0, 0)
  assert set(out) == {"loss", "accuracy", "auc", "f1"}
  assert all(np.isnan(v) for v in out.values())


def test_classification_metrics_drop_masked_rows():
  probs, labels = _random_case(40, 3, seed=6)
  mask = np.arange(48) < 40
  padded_probs = np.concatenate([probs, np.full((8, 3), 1 / 3, np.float32)])
  padded_labels = np.concatenate([labels, np.zeros(8, np.int64)])
  out = metrics.classification_metrics(padded_probs, padded_labels, 4.0, 40.0, mask=mask)
  assert out == metrics.classification_metrics(probs, labels, 4.0, 40)


def test_classification_metrics_reject_a_count_that_is_not_the_row_count():
  probs, labels = _random_case(10, 3, seed=0)
  with pytest.raises(ValueError, match=r"count must equal the number of unpadded rows \(10\), got count=12"):
    metrics.classification_metrics(probs, labels, 1.0, 12)


# ----------------------------------------------------------------- masked sums (device)
def _batch(seed, b=8, c=4, valid=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, c)).astype(np.float32)
  labels = rng.integers(0, c, b).astype(np.int32)
  mask = np.arange(b) < valid
  loss = -jax.nn.log_softmax(logits)[np.arange(b), labels]
  return np.array(loss), logits, labels, mask


def test_masked_sums_exclude_padding_rows():
  loss, logits, labels, mask = _batch(0)
  out = jax.jit(metrics.masked_sums)(loss, logits, labels, mask)
  assert float(out["loss_sum"]) == pytest.approx(float(loss[mask].sum()), rel=TOL)
  assert float(out["correct"]) == float((logits.argmax(1) == labels)[mask].sum())
  assert float(out["count"]) == 5.0
  assert all(v.dtype == jnp.float32 and v.shape == () for v in out.values())


def test_masked_sums_ignore_non_finite_loss_on_padding_rows():
  loss, logits, labels, mask = _batch(1)
  loss[~mask] = np.nan
  assert np.isfinite(float(metrics.masked_sums(loss, logits, labels, mask)["loss_sum"]))


def test_accumulated_sums_give_sklearn_log_loss_and_accuracy():
  batches = [_batch(s, valid=v) for s, v in [(0, 8), (1, 8), (2, 3)]]
  sums = metrics.empty_sums()
  for loss, logits, labels, mask in batches:
    sums = jax.jit(metrics.add_sums)(sums, metrics.masked_sums(loss, logits, labels, mask))
  logits = np.concatenate([b[1][b[3]] for b in batches])
  labels = np.concatenate([b[2][b[3]] for b in batches])
  probs = _softmax(logits.astype(np.float64))
  assert float(sums["count"]) == 19.0
  assert float(sums["loss_sum"]) / 19 == pytest.approx(log_loss(labels, probs, labels=range(4)), rel=TOL)
  assert float(sums["correct"]) / 19 == pytest.approx(accuracy_score(labels, logits.argmax(1)), abs=TOL)


def test_metrics_module_imports_neither_torch_nor_optuna_nor_sklearn():
  source = pathlib.Path(metrics.__file__).read_text()
  for name in ("torch", "optuna", "sklearn"):
    assert f"import {name}" not in source and f"from {name}" not in source

