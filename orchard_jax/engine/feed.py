"""What a pass feeds its steps: device batches placed where the state is, and their checks.

Every batch of a pass is committed where the state is (split over its mesh, or on its one
device), as the state's own arrays are (:func:`committed`): a jitted step compiles again for an
argument whose commitment changed. The first batch's per-sample shape is checked against the
state's before compiling (:func:`check_input_shape`); the rows of a loader with NaN or Inf
inputs are counted on the host (:func:`nonfinite_input_rows`), only once a pass's result is
already non-finite.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from orchard_jax.core.batches import IndexedBatch
from orchard_jax.core.sharding import batch_sharding
from orchard_jax.core.state import TrainState
from orchard_jax.data.adapter import Where, device_batches
from orchard_jax.engine import executables
from orchard_jax.errors import DataError

__all__ = ["at_epoch", "batches", "check_input_shape", "committed", "compiled",
           "nonfinite_input_rows"]


def _placement(state: TrainState) -> jax.sharding.Sharding:
  """Where ``state``'s batches go: split over its mesh, or on its one device."""
  sharding = batch_sharding(state)
  if sharding is not None:
    return sharding
  return jax.sharding.SingleDeviceSharding(next(iter(state.step.devices())))


def committed(state: TrainState) -> TrainState:
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


def batches(state: TrainState, loader: Iterable, epoch: int | None, layout: str, role: str,
            sharding: jax.sharding.Sharding | None = None):
  """``loader``'s device batches (a closing iterator), placed where ``state`` is (or by
  ``sharding``: a cohort's, whole on every device).

  Device-resident images come as IndexedBatch rows, gathered inside the step. Every batch
  is committed where the state is, so the step's arguments keep one placement.
  """
  placement = _placement(state) if sharding is None else sharding
  return contextlib.closing(device_batches(loader, num_classes=state.spec.num_classes,
                                           layout=layout, epoch=epoch, sharding=placement,
                                           indexed=True, role=role))


def at_epoch(epoch: int | None) -> str:
  """`` at epoch 3`` (empty without an epoch), for messages."""
  return "" if epoch is None else f" at epoch {epoch}"


def check_input_shape(state: TrainState, batch, role: str, epoch: int | None) -> None:
  """Raises ``DataError`` if the batch's per-sample shape is not the state's (static: no sync)."""
  images = batch.images if isinstance(batch, IndexedBatch) else batch["image"]
  shape, expected = tuple(images.shape[1:]), tuple(state.spec.input_shape)
  if shape != expected:
    raise DataError(f"{role} inputs have per-sample shape {shape} (channels last) "
                    f"{Where(role, 0, epoch).at}, but the model's input shape is {expected}")


def compiled(step_fn, name: str, state: TrainState, batch):
  """A pass's one executable of ``step_fn`` (every batch of a pass has the first one's
  shapes), from :func:`orchard_jax.engine.executables.compiled`."""
  return executables.compiled(step_fn, (state, batch), name=name, model=state.spec.model)


def nonfinite_input_rows(state: TrainState, loader: Iterable, epoch: int | None, layout: str,
                         role: str) -> int:
  """Unpadded rows of ``loader``'s inputs that hold a NaN or Inf (0 for a loader that cannot
  be iterated again).

  A second pass over the loader, on the host, run only once an epoch's result is already
  non-finite: telling bad data from divergence costs the steps nothing.
  """
  count, finite_rows = 0, {}  # device-resident images: checked once, on the host
  with batches(state, loader, epoch, layout, role) as stream:
    for batch in stream:
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
