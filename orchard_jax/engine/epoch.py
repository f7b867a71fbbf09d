"""One pass over a loader: ``train_epoch`` and ``evaluate``.

Both feed padded, masked, prefetched device batches from
:func:`orchard_jax.data.device_batches` to the jitted steps, accumulate the
metrics on the device, and fetch them once, at the end of the epoch: there is
exactly one host sync per epoch, and the padded last batch neither recompiles
nor counts. A state replicated on a multi-device mesh
(:mod:`orchard_jax.core.sharding`) gets its batches split over that mesh; a
state on one device gets them committed to that device, as its own arrays
are (an array the user wrote into it uncommitted is committed first): a
jitted step compiles again for an argument whose commitment changed, so each
step compiles once per structure and batch shape, at its first batch.

Bad data raise :class:`~orchard_jax.errors.DataError`, never a
``ValueError`` or ``RuntimeError`` (the types a failed validation may be, see
:mod:`orchard_jax.engine.loop`), so no fallback metric ever hides them:

* what the adapter checks on the host before a batch crosses to the device
  (labels, dtypes, shapes, a loader that raises; see
  :func:`orchard_jax.data.device_batches`), named ``training`` or
  ``validation``;
* a per-sample input shape other than the state's (checked on the first
  batch's static shape, before compiling);
* an empty loader: ``"the training loader yielded no batch at epoch 1"``
  (the reference trains on nothing with loss 0.0, or gives NaN metrics; see
  ``docs/differences.md``);
* training rows with a NaN or Inf input, counted inside ``train_step`` and
  read at the epoch's one host sync, before the divergence check.

Non-finite validation logits are a failed validation instead (a
``ValueError``, as the reference's scikit-learn metrics raise on NaN): the
loop's fallback and three-strike rule apply, and a run whose every
validation failed ends with :class:`~orchard_jax.errors.ValidationFailedError`
(see :mod:`orchard_jax.engine.loop`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from orchard_jax.core.batches import IndexedBatch
from orchard_jax.core.sharding import batch_sharding
from orchard_jax.core.metrics import SUM_KEYS, classification_metrics
from orchard_jax.core.state import TrainState
from orchard_jax.core.steps import eval_step, train_step
from orchard_jax.data.adapter import Where, device_batches
from orchard_jax.engine import executables
from orchard_jax.engine.loop import diverged
from orchard_jax.errors import DataError, EmptyLoaderError, NonFiniteInputError

logger = logging.getLogger(__name__)


_GROUP = 16  # batches whose sums one _stack call packs, at most


@jax.jit
def _stack(per_batch: list[dict[str, jax.Array]]) -> jax.Array:
  """``[len(per_batch), len(SUM_KEYS)]``: a group of batches' sums in one array."""
  return jnp.stack([jnp.stack([jnp.asarray(m[key], jnp.float32) for key in SUM_KEYS])
                    for m in per_batch])


def _packed(per_batch: list[dict[str, jax.Array]]) -> list[jax.Array]:
  """The batches' sums packed into a few arrays, still on the device.

  Fetching three scalars per batch costs a transfer each, and adding them on
  the device one more dispatch per batch; packing groups of a power-of-two
  size (at most :data:`_GROUP`) costs a few dispatches per epoch and compiles
  at most five small programs, whatever the epoch's length.
  """
  packed, start = [], 0
  while start < len(per_batch):
    size = min(_GROUP, 1 << ((len(per_batch) - start).bit_length() - 1))
    packed.append(_stack(per_batch[start:start + size]))
    start += size
  return packed


def _sums(packed: list[np.ndarray]) -> dict[str, float]:
  """The epoch's sums, in float64 on the host, of the batches' fetched float32 sums."""
  totals = np.concatenate(packed).astype(np.float64).sum(axis=0)
  return {key: float(total) for key, total in zip(SUM_KEYS, totals)}


def _placement(state: TrainState) -> jax.sharding.Sharding:
  """Where ``state``'s batches go: split over its mesh, or on its one device."""
  sharding = batch_sharding(state)
  if sharding is not None:
    return sharding
  return jax.sharding.SingleDeviceSharding(next(iter(state.step.devices())))


def _committed(state: TrainState) -> TrainState:
  """``state`` with every array committed where the state is (a copy of those that are not).

  A jitted step compiles again when an argument's commitment changes, and a
  step's outputs are committed when one of its inputs is: a state holding an
  uncommitted array (one made by ``jnp`` or ``jax.device_put(x)`` and
  written into it, e.g. with :func:`orchard_jax.set_hyperparams`) would
  compile the step at its first batch and again at the second. Such arrays
  are put where the state's committed arrays are (replicated over its mesh,
  or on its device); the states :func:`orchard_jax.create_train_state`
  builds and the steps return are committed already, and come back as they are.
  """
  leaves = jax.tree.leaves(state)
  loose = [not getattr(leaf, "committed", True) for leaf in leaves]
  if not any(loose):
    return state
  placed = next((leaf.sharding for leaf, l in zip(leaves, loose) if not l), None)
  if isinstance(placed, NamedSharding):
    target = NamedSharding(placed.mesh, PartitionSpec())  # a state's arrays are replicated
  else:
    device = next(iter((placed.device_set if placed is not None else state.step.devices())))
    target = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.unflatten(jax.tree.structure(state), [
      jax.device_put(leaf, target, may_alias=False) if l else leaf
      for leaf, l in zip(leaves, loose)])


def _batches(state: TrainState, loader: Iterable, epoch: int | None, layout: str, role: str):
  # Device-resident images come as IndexedBatch rows, gathered inside the step. Every batch
  # is committed where the state is, so the step's arguments keep one placement.
  return contextlib.closing(device_batches(loader, num_classes=state.spec.num_classes,
                                           layout=layout, epoch=epoch,
                                           sharding=_placement(state), indexed=True,
                                           role=role))


def _at(epoch: int | None) -> str:
  return "" if epoch is None else f" at epoch {epoch}"


def _check_input_shape(state: TrainState, batch, role: str, epoch: int | None) -> None:
  """Raises ``DataError`` if the batch's per-sample shape is not the state's (static: no sync)."""
  images = batch.images if isinstance(batch, IndexedBatch) else batch["image"]
  shape, expected = tuple(images.shape[1:]), tuple(state.spec.input_shape)
  if shape != expected:
    raise DataError(f"{role} inputs have per-sample shape {shape} (channels last) "
                    f"{Where(role, 0, epoch).at}, but the model's input shape is {expected}")


def _compiled(step_fn, name: str, state: TrainState, batch):
  """The epoch's one executable: every batch of an epoch has the first one's shapes."""
  return executables.compiled(step_fn, (state, batch), name=name, model=state.spec.model)


def compile_steps(state: TrainState, train_loader: Iterable, val_loader: Iterable | None = None,
                  *, layout: str = "NCHW") -> None:
  """Compiles (or loads) every program an epoch of ``state`` runs, without training ``state``.

  Takes the first batch of each loader as :func:`train_epoch` and
  :func:`evaluate` do, gets the same programs (see
  :mod:`orchard_jax.engine.executables`) and runs each once, with the packing
  of an epoch's sums for ``len(loader)`` batches. Later epochs of states of
  the same structure then compile nothing. ``state`` is donated to the
  training step: do not use it afterwards. For compiling ahead on a thread
  (:mod:`orchard_jax.study.ahead`).
  """
  state = _committed(state)
  for loader, step_fn, name, role in ((train_loader, train_step, "train_step", "training"),
                                      (val_loader, eval_step, "eval_step", "validation")):
    if loader is None:
      continue
    with _batches(state, loader, None, layout, role) as batches:
      batch = next(batches, None)
    if batch is None:
      continue
    _check_input_shape(state, batch, role, None)
    out = _compiled(step_fn, name, state, batch)(state, batch)
    if name == "train_step":
      state, sums = out  # as train_epoch collects them
    else:
      sums = {key: out[key] for key in SUM_KEYS}  # as evaluate does
    try:
      count = max(len(loader), 1)
    except TypeError:
      count = 1
    jax.block_until_ready(_packed([sums] * count))


def nonfinite_input_rows(state: TrainState, loader: Iterable, epoch: int | None, layout: str,
                         role: str) -> int:
  """Unpadded rows of ``loader``'s inputs that hold a NaN or Inf (0 for a loader that cannot
  be iterated again).

  A second pass over the loader, on the host, run only once an epoch's result is already
  non-finite: telling bad data from divergence costs the steps nothing.
  """
  count, finite_rows = 0, {}  # device-resident images: checked once, on the host
  with _batches(state, loader, epoch, layout, role) as batches:
    for batch in batches:
      if isinstance(batch, IndexedBatch):
        if id(batch.images) not in finite_rows:
          images = np.asarray(jax.device_get(batch.images))
          finite_rows[id(batch.images)] = np.isfinite(images.reshape(len(images), -1)).all(1)
        index, size, row = jax.device_get((batch.index, batch.count, batch.row))
        finite = finite_rows[id(batch.images)][index[row]]
        mask = np.arange(len(finite)) < size[row]
      else:
        image, mask = jax.device_get((batch["image"], batch["mask"]))
        finite = np.isfinite(np.asarray(image).reshape(len(image), -1)).all(axis=1)
      count += int((~finite & np.asarray(mask, bool)).sum())
  return count


def train_epoch(state: TrainState, loader: Iterable, *, epoch: int | None = None,
                layout: str = "NCHW") -> tuple[TrainState, float]:
  """Runs ``train_step`` over every batch of ``loader``.

  Args:
    state: the trial's state; donated batch by batch (do not reuse it).
    loader: a torch DataLoader or any iterable of ``(inputs, labels)``.
    epoch: the 1-indexed epoch, used in messages.
    layout: ``"NCHW"`` (torch's convention) or ``"NHWC"`` for 4-D inputs.

  Returns:
    ``(state, loss)``: the new state and the epoch's sample-weighted mean
    training loss.

  Raises:
    orchard_jax.errors.DataError: bad data (see the module docstring), among
      them ``EmptyLoaderError`` (``"the training loader yielded no batch at
      epoch 1"``; the reference returns 0.0 with a warning) and
      ``NonFiniteInputError`` (``"training inputs: 3 rows with NaN or Inf at
      epoch 1; fix the data (this is not divergence)"``), which comes before
      the divergence check.
    RuntimeError: ``"Training diverged: loss=… at epoch …"`` if the loss is
      NaN or Inf with finite inputs (checked at the epoch's one host sync,
      not per step).
  """
  state, per_batch, step = _committed(state), [], None
  with _batches(state, loader, epoch, layout, "training") as batches:
    for batch in batches:
      if step is None:
        _check_input_shape(state, batch, "training", epoch)
        step = _compiled(train_step, "train_step", state, batch)
      state, metrics = step(state, batch)
      per_batch.append(metrics)
  if not per_batch:
    raise EmptyLoaderError(f"the training loader yielded no batch{_at(epoch)}")
  sums = _sums(jax.device_get(_packed(per_batch)))  # the epoch's one host sync
  loss = sums["loss_sum"] / max(sums["count"], 1.0)
  divergence = diverged(loss, epoch)
  if divergence is not None:
    bad = nonfinite_input_rows(state, loader, epoch, layout, "training")
    if bad:
      raise NonFiniteInputError(f"training inputs: {bad} row{'s' if bad != 1 else ''} with NaN "
                                f"or Inf{_at(epoch)}; fix the data (this is not divergence)")
    raise divergence
  return state, loss


def evaluate(state: TrainState, loader: Iterable, *, epoch: int | None = None,
             layout: str = "NCHW") -> dict[str, float]:
  """Evaluation-mode pass over ``loader`` with the reference's metrics.

  Returns:
    ``{"loss", "accuracy", "auc", "f1"}``: mean per-sample cross-entropy,
    accuracy, ROC-AUC from softmax probabilities (binary: class 1;
    multiclass: one-vs-rest macro; NaN when undefined) and macro F1 with
    zero_division 0. Padded rows never count.

  Raises:
    ValueError: ``"5 of 48 validation rows have non-finite logits"``: a
      failed validation, as the reference's metrics raise on NaN (the epoch
      loop then uses the fallback metrics); the message adds how many of
      the rows have NaN or Inf inputs, when some have.
    orchard_jax.errors.DataError: bad data (see the module docstring),
      among them ``EmptyLoaderError`` (``"the validation loader yielded no
      batch at epoch 2"``; the reference gives NaN for all four metrics).
  """
  state, per_batch, logits, labels, masks, step = _committed(state), [], [], [], [], None
  with _batches(state, loader, epoch, layout, "validation") as batches:
    for batch in batches:
      if step is None:
        _check_input_shape(state, batch, "validation", epoch)
        step = _compiled(eval_step, "eval_step", state, batch)
      out = step(state, batch)
      per_batch.append({key: out[key] for key in SUM_KEYS})
      logits.append(out["logits"])
      labels.append(out["label"])
      masks.append(out["mask"])
  if not per_batch:
    raise EmptyLoaderError(f"the validation loader yielded no batch{_at(epoch)}")
  packed, logits, labels, masks = jax.device_get((_packed(per_batch), logits, labels,
                                                  masks))  # the pass's one host sync
  sums = _sums(packed)
  logits, mask = np.concatenate(logits).astype(np.float64), np.concatenate(masks)
  nonfinite = nonfinite_rows(logits, mask)
  if nonfinite:
    inputs = nonfinite_input_rows(state, loader, epoch, layout, "validation")
    raise ValueError(f"{nonfinite} of {int(sums['count'])} validation rows have non-finite logits"
                     + (f" ({inputs} have NaN or Inf inputs)" if inputs else ""))
  return logits_metrics(logits, np.concatenate(labels), mask, sums["loss_sum"], sums["count"])


def nonfinite_rows(logits: np.ndarray, mask: np.ndarray) -> int:
  """Unpadded rows of ``[N, C]`` host ``logits`` that hold a NaN or Inf."""
  return int((mask & ~np.isfinite(logits).all(axis=1)).sum())


def logits_metrics(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray, loss_sum: float,
                   count: float) -> dict[str, float]:
  """The validation metrics of finite float64 ``[N, C]`` host logits (softmax, then
  :func:`~orchard_jax.core.metrics.classification_metrics`)."""
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  return classification_metrics(probs, labels, loss_sum, count, mask=mask)
