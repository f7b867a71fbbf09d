"""The test report: its metrics equal scikit-learn's on the same predictions, its TTA
evaluation is core/tta.py's ensemble in one jitted program, and its files."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from orchard_jax import MLP, create_train_state
from orchard_jax.core.tta import TTASpec, tta_probabilities
from orchard_jax.engine.predictions import predictions, tta_eval_step
from orchard_jax.study.report import (REPORT_JSON, REPORT_TEXT, class_figures, evaluate_run,
                                      report_entry)

CLASSES = 4
PNG = b"\x89PNG\r\n\x1a\n"


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % CLASSES
  x = rng.uniform(0.0, 1.0, (n, 8, 8, 1)).astype(np.float32)
  for c in range(CLASSES):
    x[labels == c, 2 * c:2 * c + 2] += 0.8
  return x, labels


X, Y = images(70, 0)
LOADER = [(X[i:i + 32], Y[i:i + 32]) for i in range(0, 70, 32)]  # 32, 32, 6: a padded last batch


@pytest.fixture(scope="module")
def state():
  return create_train_state(MLP(num_classes=CLASSES, hidden=(32,)), input_shape=(8, 8, 1),
                            num_classes=CLASSES, seed=3)


@pytest.fixture(scope="module")
def plain(state):
  return predictions(state, LOADER, layout="NHWC")


def test_the_report_metrics_equal_scikit_learns_on_the_same_predictions(plain):
  probs, labels = plain.probs, plain.labels
  assert probs.shape == (70, CLASSES) and labels.tolist() == Y.tolist()
  entry, preds = report_entry(plain, CLASSES), probs.argmax(axis=1)
  assert len(set(preds.tolist())) > 1, "a model that predicts one class tests little"
  assert entry["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-12)
  assert entry["f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro",
                                                   zero_division=0), abs=1e-12)
  assert entry["auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr",
                                                         average="macro"), abs=1e-12)
  assert entry["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=range(CLASSES)),
                                        rel=1e-5)
  precision, recall, _, support = skm.precision_recall_fscore_support(
      labels, preds, labels=range(CLASSES), zero_division=0)
  np.testing.assert_allclose(entry["precision"], precision, atol=1e-12)
  np.testing.assert_allclose(entry["recall"], recall, atol=1e-12)
  assert entry["support"] == support.tolist()
  assert entry["confusion_matrix"] == skm.confusion_matrix(labels, preds,
                                                           labels=range(CLASSES)).tolist()


def test_a_class_never_predicted_has_precision_zero_as_scikit_learns_zero_division():
  probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.9, 0.0]])
  labels = np.array([0, 2, 1])
  figures = class_figures(probs, labels, 3)
  precision, recall, _, _ = skm.precision_recall_fscore_support(labels, probs.argmax(1),
                                                                labels=range(3), zero_division=0)
  assert figures["precision"] == precision.tolist() and figures["recall"] == recall.tolist()


def test_tta_evaluation_is_the_ensemble_of_core_tta_in_one_program_per_batch_shape(state, plain):
  spec = TTASpec(anatomical=False, texture_based=False, resolution=8)
  before = tta_eval_step._cache_size()  # pylint: disable=protected-access
  with_tta = predictions(state, LOADER, layout="NHWC", tta=spec)
  assert tta_eval_step._cache_size() == before + 1  # pylint: disable=protected-access

  def logits_fn(x):
    logits, _ = state.spec.model.apply(state.params, state.model_state, x, train=False,
                                       rng=jax.random.key(0))
    return logits

  expected = np.asarray(tta_probabilities(logits_fn, X, spec), np.float64)
  np.testing.assert_allclose(with_tta.probs, expected / expected.sum(1, keepdims=True),
                             atol=2e-6)
  assert not np.allclose(with_tta.probs, plain.probs, atol=1e-3)  # the views changed something
  nll = -np.log(expected[np.arange(70), Y]).mean()
  assert with_tta.metrics["loss"] == pytest.approx(nll, rel=1e-4)


def test_evaluate_run_writes_the_json_the_summary_and_the_confusion_matrices(state, tmp_path):
  spec = TTASpec(anatomical=True, texture_based=False, resolution=8)
  report = evaluate_run(state, LOADER, tmp_path, layout="NHWC", tta=spec, dataset="toy",
                        model="ckpt", classes=["a", "b", "c", "d"])
  stored = json.loads((tmp_path / REPORT_JSON).read_text())
  assert stored == json.loads(json.dumps(report))
  assert stored["rows"] == 70 and stored["classes"] == ["a", "b", "c", "d"]
  assert stored["tta"]["anatomical"] is True and stored["with_tta"]["accuracy"] >= 0
  text = (tmp_path / REPORT_TEXT).read_text()
  assert "without TTA" in text and "with TTA" in text and text.count("\n") < 20
  for name in ("confusion_matrix.png", "confusion_matrix_tta.png"):
    assert (tmp_path / name).read_bytes().startswith(PNG)


def test_without_tta_or_plots_there_is_one_evaluation_and_no_png(state, tmp_path):
  report = evaluate_run(state, LOADER, tmp_path, layout="NHWC", plots=False)
  assert report["with_tta"] is None and report["tta"] is None
  assert "TTA off" in (tmp_path / REPORT_TEXT).read_text()
  assert not list(tmp_path.glob("*.png"))
