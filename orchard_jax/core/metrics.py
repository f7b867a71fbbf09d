"""Validation metrics with the reference's definitions.

Two halves, used by the epoch functions:

* On device, inside the jitted steps: :func:`masked_sums` turns one padded
  batch into float32 sums ``{"loss_sum", "correct", "count"}`` that exclude
  padding rows. The epoch functions fetch every batch's sums once and add
  them on the host in float64; :func:`empty_sums` and :func:`add_sums`
  accumulate them on the device instead, for loops of your own (CLU-style
  ``empty`` / ``merge``, as plain functions on a dict pytree).
* On the host, once per epoch, from arrays fetched in one transfer:
  :func:`classification_metrics` returns ``loss``, ``accuracy``, ``auc`` and
  ``f1`` exactly as the reference's default classification validator
  (``torch`` + ``sklearn.metrics``) defines them, with numpy only:

  - ``loss``: mean per-sample cross-entropy, ``loss_sum / count``;
  - ``accuracy``: fraction of rows whose ``argmax(probs)`` equals the label;
  - ``auc``: :func:`roc_auc` (binary: column 1; multiclass: one-vs-rest macro);
  - ``f1``: :func:`macro_f1` (``f1_score(average="macro", zero_division=0)``).

  An empty validation set gives NaN for all four.

This module is part of the pure core: it imports numpy and jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

METRIC_KEYS = ("loss", "accuracy", "auc", "f1")
SUM_KEYS = ("loss_sum", "correct", "count")


# --------------------------------------------------------------------------- #
# On device: masked per-batch sums.
# --------------------------------------------------------------------------- #
def masked_sums(loss_per_sample_B: jax.Array, logits_BxC: jax.Array, labels_B: jax.Array,
                mask_B: jax.Array) -> dict[str, jax.Array]:
  """Float32 sums over the unpadded rows of one batch; jit-safe.

  Args:
    loss_per_sample_B: per-sample loss, shape ``[B]`` (any float dtype).
    logits_BxC: logits (or probabilities), shape ``[B, C]``; the prediction is
      their argmax, as ``torch.max(outputs, 1)`` in the reference.
    labels_B: integer class ids, shape ``[B]``.
    mask_B: boolean, shape ``[B]``; False on padding rows.

  Returns:
    ``{"loss_sum": sum of the loss, "correct": number of right predictions,
    "count": number of rows}``, each a float32 scalar over the rows where
    ``mask_B`` is True. Padding rows are excluded with ``jnp.where``, so a
    NaN or Inf in a padding row does not leak into the sums.
  """
  mask_B = mask_B.astype(jnp.bool_)
  loss_sum = jnp.where(mask_B, loss_per_sample_B.astype(jnp.float32), 0.0).sum()
  hit_B = (jnp.argmax(logits_BxC, axis=-1) == labels_B) & mask_B
  return {"loss_sum": loss_sum, "correct": hit_B.sum(dtype=jnp.float32),
          "count": mask_B.sum(dtype=jnp.float32)}


def empty_sums() -> dict[str, jax.Array]:
  """The identity of :func:`add_sums`: every sum a float32 zero."""
  return {key: jnp.zeros((), jnp.float32) for key in SUM_KEYS}


def add_sums(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Merges two sum dicts key by key; jit-safe."""
  return jax.tree.map(jnp.add, a, b)


# --------------------------------------------------------------------------- #
# On the host: epoch metrics (numpy, float64).
# --------------------------------------------------------------------------- #
def _check_labels(labels: np.ndarray, n: int, num_classes: int | None, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != n:
    raise ValueError(f"{name} must have shape ({n},), got {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}")
  labels = labels.astype(np.int64)
  if num_classes is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    raise ValueError(f"{name} must be in [0, {num_classes}), got {bad[:10].tolist()}")
  return labels


def _check_probs(probs: np.ndarray) -> np.ndarray:
  probs = np.asarray(probs)
  if probs.ndim != 2:
    raise ValueError(f"probs must have shape [N, C], got {probs.shape}")
  return probs.astype(np.float64)


def _average_ranks(x_NxK: np.ndarray) -> np.ndarray:
  """1-based ranks of each column of ``x_NxK``; tied values share their mean rank."""
  n = x_NxK.shape[0]
  order = np.argsort(x_NxK, axis=0, kind="stable")
  sorted_x = np.take_along_axis(x_NxK, order, axis=0)
  idx = np.broadcast_to(np.arange(n)[:, None], x_NxK.shape)
  starts_group = np.ones(x_NxK.shape, bool)
  starts_group[1:] = sorted_x[1:] != sorted_x[:-1]
  ends_group = np.ones(x_NxK.shape, bool)
  ends_group[:-1] = starts_group[1:]
  first = np.maximum.accumulate(np.where(starts_group, idx, 0), axis=0)
  last = np.minimum.accumulate(np.where(ends_group, idx, n - 1)[::-1], axis=0)[::-1]
  ranks = np.empty(x_NxK.shape, np.float64)
  np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=0)
  return ranks


def _one_vs_rest_auc(scores_NxK: np.ndarray, positive_N: np.ndarray) -> np.ndarray:
  """Mann-Whitney AUC of column k, positives being the rows with ``positive_N == k``."""
  n, k = scores_NxK.shape
  ranks_NxK = _average_ranks(scores_NxK)
  n_pos = np.bincount(positive_N, minlength=k).astype(np.float64)
  rank_sum = np.bincount(positive_N, weights=ranks_NxK[np.arange(n), positive_N], minlength=k)
  return (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * (n - n_pos))


def _binary_auc(scores_N: np.ndarray, positive_N: np.ndarray) -> float:
  n_pos = int(positive_N.sum())
  n_neg = positive_N.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = _average_ranks(scores_N[:, None])[:, 0]
  return float((ranks[positive_N].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(probs: np.ndarray, labels: np.ndarray) -> float:
  """ROC-AUC from softmax probabilities, as the reference's ``compute_auc``.

  Computed in float64 in the Mann-Whitney form (average ranks for tied
  scores), which equals the trapezoidal area of ``sklearn.metrics.roc_auc_score``:

  * ``C == 2``: binary AUC of ``probs[:, 1]`` (class 1 is positive);
  * ``C > 2``: one-vs-rest AUC per class, unweighted (macro) mean.

  Returns NaN where the reference's ``roc_auc_score`` call raises (or, in
  recent scikit-learn, warns and returns NaN) and it reports NaN: ``C < 2``; fewer than 2 rows; binary with one class only;
  multiclass with any class absent from ``labels`` (scikit-learn: "Number of
  classes in y_true not equal to the number of columns in 'y_score'");
  multiclass rows that do not sum to 1 (``np.allclose``); non-finite scores.

  Args:
    probs: ``[N, C]`` class probabilities.
    labels: ``[N]`` integer class ids in ``[0, C)``.

  Raises:
    ValueError: on malformed shapes, non-integer labels, labels outside ``[0, C)``.
  """
  probs = _check_probs(probs)
  n, num_classes = probs.shape
  labels = _check_labels(labels, n, num_classes, "labels")
  if num_classes < 2 or n < 2 or not np.all(np.isfinite(probs)):
    return float("nan")
  if num_classes == 2:
    return _binary_auc(probs[:, 1], labels == 1)
  if np.bincount(labels, minlength=num_classes).min() == 0:
    return float("nan")
  if not np.allclose(1.0, probs.sum(axis=1)):
    return float("nan")
  return float(_one_vs_rest_auc(probs, labels).mean())


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
  """Macro F1 exactly as ``f1_score(labels, preds, average="macro", zero_division=0)``.

  As scikit-learn does, the mean runs over the classes present in
  ``labels ∪ preds`` (not over all C classes); per class
  ``F1 = 2 TP / (2 TP + FP + FN)``, which is never 0/0 for a present class.
  NaN for empty inputs (scikit-learn raises there; the reference never
  reaches it, it stops earlier on an empty validation set).

  Args:
    preds: ``[N]`` predicted class ids.
    labels: ``[N]`` true class ids.
  """
  labels = np.asarray(labels)
  labels = _check_labels(labels, labels.shape[0] if labels.ndim else -1, None, "labels")
  preds = _check_labels(preds, labels.shape[0], None, "preds")
  if labels.size == 0:
    return float("nan")
  present = np.union1d(labels, preds)
  true_k = np.searchsorted(present, labels)
  pred_k = np.searchsorted(present, preds)
  k = present.size
  tp = np.bincount(true_k[labels == preds], minlength=k).astype(np.float64)
  support = np.bincount(true_k, minlength=k) + np.bincount(pred_k, minlength=k)
  return float(np.mean(2.0 * tp / support))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, loss_sum: float, count: float,
                           *, mask: np.ndarray | None = None) -> dict[str, float]:
  """The reference's default validation metrics for one epoch.

  Args:
    probs: ``[N, C]`` softmax probabilities of the validation rows.
    labels: ``[N]`` integer class ids.
    loss_sum: sum of the per-sample cross-entropy over the (unpadded) rows,
      e.g. the epoch's accumulated :func:`masked_sums` ``"loss_sum"``.
    count: number of unpadded rows, e.g. the accumulated ``"count"``; must
      equal the number of rows kept (a float such as ``1234.0`` is accepted).
    mask: optional ``[N]`` booleans; rows where it is False (padding) are
      dropped first, so padded, concatenated eval outputs can be passed as is.

  Returns:
    ``{"loss": loss_sum / count, "accuracy", "auc", "f1"}`` as Python floats;
    all NaN when there are no rows. Predictions are ``argmax(probs, axis=1)``.

  Raises:
    ValueError: on malformed shapes, or if ``count`` is not the number of rows.
  """
  probs = np.asarray(probs)
  labels = np.asarray(labels)
  if mask is not None:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != labels.shape[:1] or mask.ndim != 1:
      raise ValueError(f"mask must have shape ({labels.shape[0]},), got {mask.shape}")
    probs, labels = probs[mask], labels[mask]
  probs = _check_probs(probs)
  labels = _check_labels(labels, probs.shape[0], probs.shape[1], "labels")
  n = labels.shape[0]
  if float(count) != n:
    raise ValueError(f"count must equal the number of unpadded rows ({n}), got count={count}")
  if n == 0:
    return {key: float("nan") for key in METRIC_KEYS}
  preds = probs.argmax(axis=1)
  return {"loss": float(loss_sum) / n, "accuracy": float(np.mean(preds == labels)),
          "auc": roc_auc(probs, labels), "f1": macro_f1(preds, labels)}
