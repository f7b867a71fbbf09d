"""Losses with the reference's exact definitions, masked for padded batches.

Every loss takes ``logits_BxC`` (any float dtype; computed in float32), integer
``labels_B`` and a boolean ``mask_B`` (False on padding rows), plus the
per-trial scalars as arrays, so that changing them never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CRITERIA = ("cross_entropy", "focal")


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array,
                  class_weights_C: jax.Array, label_smoothing: jax.Array) -> jax.Array:
  """``torch.nn.CrossEntropyLoss(weight, label_smoothing)`` with mean reduction.

  Torch's weighted mean divides by the summed weight of the targets, and its
  smoothing term, ``eps / C * sum_c w_c * -log p_c``, is normalised the same
  way::

    loss = sum_i [(1 - eps) w_yi nll_i + eps / C sum_c w_c (-log p_ic)] / sum_i w_yi

  Padded rows (``mask`` False) contribute to neither sum. Returns a float32
  scalar (0 for an all-padding batch).
  """
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  num_classes = logp_BxC.shape[-1]
  w_B = class_weights_C[labels_B] * mask_B
  nll_B = -jnp.take_along_axis(logp_BxC, labels_B[:, None], axis=-1)[:, 0]
  smooth_B = -(logp_BxC * class_weights_C).sum(-1) * mask_B
  total = (1.0 - label_smoothing) * (w_B * nll_B).sum() + label_smoothing / num_classes * smooth_B.sum()
  return total / jnp.maximum(w_B.sum(), jnp.finfo(jnp.float32).tiny)


def per_sample_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array,
                             class_weights_C: jax.Array | None = None) -> jax.Array:
  """``-w_y log softmax(logits)_y`` per row (float32), no smoothing, no reduction."""
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  nll_B = -jnp.take_along_axis(logp_BxC, labels_B[:, None], axis=-1)[:, 0]
  if class_weights_C is not None:
    nll_B = nll_B * class_weights_C[labels_B]
  return nll_B


def focal_loss(logits_BxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array,
               class_weights_C: jax.Array, gamma: jax.Array, alpha: float = 1.0) -> jax.Array:
  """The reference's focal loss: ``mean(alpha * (1 - pt)^gamma * ce)``.

  ``ce`` is the per-sample cross-entropy with class weights (no smoothing)
  and ``pt = exp(-ce)``; the mean is over the unpadded rows.
  """
  ce_B = per_sample_cross_entropy(logits_BxC, labels_B, class_weights_C)
  pt_B = jnp.exp(-ce_B)
  focal_B = alpha * (1.0 - pt_B) ** gamma * ce_B
  return (focal_B * mask_B).sum() / jnp.maximum(mask_B.sum(), 1)


def compute_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """``N / (num_classes * count_c)`` per class, 1.0 for classes absent from ``labels``.

  Host-side (numpy), computed once per trial from the training labels.
  """
  labels = np.asarray(labels).reshape(-1)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got num_classes={num_classes}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    raise ValueError(f"labels must be in [0, {num_classes}), got {sorted(set(bad.tolist()))[:5]}")
  counts = np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.float64)
  weights = np.ones(num_classes, np.float64)
  present = counts > 0
  weights[present] = labels.size / (num_classes * counts[present])
  return weights.astype(np.float32)


def masked_permutation(key: jax.Array, mask_B: jax.Array) -> jax.Array:
  """A random permutation that maps unpadded rows onto unpadded rows.

  Padding rows are left where they are relative to each other, so MixUp never
  blends a real sample with a padding row.
  """
  batch = mask_B.shape[0]
  u_B = jnp.where(mask_B, jax.random.uniform(key, (batch,)), 2.0)
  shuffled_valid_first = jnp.argsort(u_B)  # valid rows in random order, then padding
  idx = jnp.arange(batch)
  valid_first = jnp.argsort(jnp.where(mask_B, idx, batch + idx))  # valid rows in order, then padding
  return jnp.zeros(batch, jnp.int32).at[valid_first].set(shuffled_valid_first.astype(jnp.int32))


def mixup(key: jax.Array, inputs: jax.Array, labels_B: jax.Array, mask_B: jax.Array,
          alpha: jax.Array, enabled: jax.Array):
  """MixUp as in the reference, switched by arrays so it never recompiles.

  ``lam ~ Beta(alpha, alpha)``, ``x' = lam x + (1 - lam) x[perm]``. When
  ``enabled`` is false or ``alpha <= 0``, ``lam`` is exactly 1 and the inputs
  pass through unchanged.

  Returns:
    ``(mixed_inputs, labels_perm_B, lam)``; the loss is
    ``lam * L(labels) + (1 - lam) * L(labels_perm)``.
  """
  key_lam, key_perm = jax.random.split(key)
  on = jnp.logical_and(enabled, alpha > 0)
  safe_alpha = jnp.where(on, alpha, 1.0)
  # Beta(a, a) = G1 / (G1 + G2) with G ~ Gamma(a): one vectorised log-gamma draw, which
  # compiles faster than jax.random.beta's two and stays finite for tiny alpha.
  log_g = jax.random.loggamma(key_lam, jnp.stack([safe_alpha, safe_alpha]))
  lam = jnp.where(on, jax.nn.sigmoid(log_g[0] - log_g[1]), 1.0).astype(jnp.float32)
  perm_B = masked_permutation(key_perm, mask_B)
  mixed = lam.astype(inputs.dtype) * inputs + (1 - lam).astype(inputs.dtype) * inputs[perm_B]
  mixed = jnp.where(on, mixed, inputs)
  return mixed, labels_B[perm_B], lam
