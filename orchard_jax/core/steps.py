"""The pure, jitted training and evaluation steps.

``train_step(state, batch) -> (state, metrics)`` and
``eval_step(state, batch) -> outputs`` are functions of their inputs only.
Each is compiled once per (model, optimizer structure, criterion, precision,
augmentation structure, batch shape), because everything else a trial varies
(augmentation strengths included) is an array in the state. ``train_step``
donates its state and augments its batch when the state's spec says so; the
evaluation step never augments. Nothing here forces a host sync: metrics are
on-device sums that the epoch loop fetches once per epoch.

A batch is ``{"image": [B, ...], "label": int [B], "mask": bool [B]}``,
or an :class:`~orchard_jax.core.batches.IndexedBatch` (a row of a chunk of
device-resident images), which the step gathers inside its own program.
Padding rows (mask False) count nowhere: not in the loss, not in the
metrics, not in BatchNorm statistics of models that accept a mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from orchard_jax.core import losses
from orchard_jax.core.augment import augment
from orchard_jax.core.batches import Batch, materialize
from orchard_jax.core.metrics import masked_sums
from orchard_jax.core.precision import all_finite, select_tree
from orchard_jax.core.state import StepSpec, TrainState

def check_batch(spec: StepSpec, batch: dict[str, jax.Array]) -> None:
  """Raises ``ValueError`` if the batch's structure disagrees with the spec.

  Runs at trace time (shapes are static), so it costs nothing per step.
  """
  missing = {"image", "label", "mask"} - set(batch)
  if missing:
    raise ValueError(f"batch is missing key(s) {sorted(missing)}; a batch has 'image', 'label' and 'mask'")
  image, label, mask = batch["image"], batch["label"], batch["mask"]
  if tuple(image.shape[1:]) != spec.input_shape:
    raise ValueError(f"batch image shape {tuple(image.shape)} does not match the model's input shape "
                     f"(B, {', '.join(map(str, spec.input_shape))})")
  if label.shape != image.shape[:1] or mask.shape != image.shape[:1]:
    raise ValueError(f"label and mask must have shape ({image.shape[0]},), got label {label.shape}, "
                     f"mask {mask.shape}")
  if not jnp.issubdtype(label.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {label.dtype}")
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"images must be floating point, got dtype {image.dtype}")


def _check_mixup_hparams(spec: StepSpec, hparams) -> None:
  """Raises ``ValueError`` if the MixUp hyperparameters disagree with ``spec.mixup`` (at trace time)."""
  given = (hparams.mixup_alpha is not None, hparams.mixup_on is not None)
  if spec.mixup and not all(given):
    raise ValueError("spec.mixup is True but hparams.mixup_alpha or mixup_on is None; build the "
                     "state with create_train_state(..., mixup_alpha > 0)")
  if not spec.mixup and any(given):
    raise ValueError("this state was built with mixup_alpha=0, so its training step has no MixUp "
                     "and cannot use hparams.mixup_alpha or mixup_on; build the state with "
                     "create_train_state(..., mixup_alpha > 0) to train with MixUp")


def _check_augment_hparams(spec: StepSpec, hparams) -> None:
  """Raises ``ValueError`` if ``hparams.augment`` disagrees with ``spec.augment`` (at trace time)."""
  if (spec.augment is None) != (hparams.augment is None):
    raise ValueError("spec.augment and hparams.augment must both be set or both None; build the "
                     "state with create_train_state(..., augmentation=...)")


# The augmentation's key is the step's key folded with this tag: the MixUp and dropout keys
# (the step key's split in two) stay those of a state without augmentation.
AUGMENT_STREAM = 0x61756700


def _criterion(spec: StepSpec, hparams, logits_BxC, labels_B, mask_B):
  if spec.criterion == "focal":
    return losses.focal_loss(logits_BxC, labels_B, mask_B, hparams.class_weights, hparams.focal_gamma)
  return losses.cross_entropy(logits_BxC, labels_B, mask_B, hparams.class_weights,
                              hparams.label_smoothing)


def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
  spec, hp, policy = state.spec, state.hparams, state.spec.policy
  batch = materialize(batch)
  check_batch(spec, batch)
  _check_mixup_hparams(spec, hp)
  _check_augment_hparams(spec, hp)
  labels_B, mask_B = batch["label"].astype(jnp.int32), batch["mask"]
  step_key = jax.random.fold_in(state.rng, state.step)
  mix_key, dropout_key = jax.random.split(step_key)
  inputs = batch["image"]
  if spec.augment is not None:  # on the gathered batch, before MixUp, as the reference's loader
    inputs = augment(jax.random.fold_in(step_key, AUGMENT_STREAM), inputs, hp.augment,
                     spec.augment)
  if spec.mixup:
    inputs, labels_perm_B, lam = losses.mixup(mix_key, inputs, labels_B, mask_B,
                                              hp.mixup_alpha, hp.mixup_on)

  def loss_fn(params):
    logits, model_state = spec.model.apply(
        policy.cast_to_compute(params), state.model_state, policy.cast_to_compute(inputs),
        train=True, rng=dropout_key, mask=mask_B)
    logits = policy.cast_to_output(logits)
    loss = _criterion(spec, hp, logits, labels_B, mask_B)
    if spec.mixup:
      loss = lam * loss + (1.0 - lam) * _criterion(spec, hp, logits, labels_perm_B, mask_B)
    return state.loss_scale.scale_value(loss), (loss, logits, model_state)

  grads, (loss, logits, model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = state.loss_scale.unscale(grads)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if state.loss_scale.dynamic:  # float16: skip the update when gradients overflowed
    finite = all_finite(grads)
    params, opt_state, model_state = select_tree(
        finite, (params, opt_state, model_state), (state.params, state.opt_state, state.model_state))
    loss_scale = state.loss_scale.adjust(finite)
  else:
    loss_scale = state.loss_scale
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state=model_state, loss_scale=loss_scale)
  # The batch's mean loss counts once per unpadded sample: epoch means are sample-weighted.
  return new_state, masked_sums(jnp.broadcast_to(loss, labels_B.shape), logits, labels_B, mask_B)


def eval_logits(state: TrainState, images: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Evaluation-mode float32 logits ``[N, C]`` of ``images`` under the state's dtype policy."""
  policy = state.spec.policy
  logits, _ = state.spec.model.apply(policy.cast_to_compute(state.params), state.model_state,
                                     policy.cast_to_compute(images), train=False, rng=state.rng,
                                     mask=mask)
  return policy.cast_to_output(logits).astype(jnp.float32)


def eval_outputs(logits_BxC: jax.Array, labels_B: jax.Array,
                 mask_B: jax.Array) -> dict[str, jax.Array]:
  """An evaluation step's outputs (see :data:`eval_step`) from a batch's logits."""
  loss_B = losses.per_sample_cross_entropy(logits_BxC, labels_B)
  return {"logits": logits_BxC, "loss": jnp.where(mask_B, loss_B, 0.0), "label": labels_B,
          "mask": mask_B, **masked_sums(loss_B, logits_BxC, labels_B, mask_B)}


def _eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
  batch = materialize(batch)
  check_batch(state.spec, batch)
  labels_B, mask_B = batch["label"].astype(jnp.int32), batch["mask"]
  return eval_outputs(eval_logits(state, batch["image"], mask_B), labels_B, mask_B)


train_step = jax.jit(_train_step, donate_argnums=0)
train_step.__doc__ = """One optimizer step on one (possibly padded) batch; the state is donated.

Returns the new state and on-device metrics ``{"loss_sum", "correct",
"count"}`` (float32 scalars; ``loss_sum`` is the batch's mean loss times its
unpadded sample count, so epoch means are sample-weighted).
"""

eval_step = jax.jit(_eval_step)
eval_step.__doc__ = """Evaluation-mode forward pass on one (possibly padded) batch.

Returns ``{"logits": float32 [B, C], "loss": per-sample cross-entropy [B]
(0 on padding), "label": int32 [B], "mask": bool [B], "loss_sum", "correct",
"count"}`` (sums over unpadded rows; the batch's labels and mask are returned
so that a caller never needs the batch itself, which an ``IndexedBatch``
only describes).
"""
