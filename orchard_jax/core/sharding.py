"""Data parallelism over local devices: a 1-D mesh, replicated state, sharded batches.

A trial runs on several devices by placing its :class:`TrainState` replicated
on a mesh (:func:`replicate_state`) and feeding batches sharded along the
mesh's ``"data"`` axis. The jitted steps are unchanged: XLA's partitioner
turns the batch reductions (loss, metric sums, BatchNorm statistics) into
cross-device all-reduces, so masked, padded batches stay exact. The epoch
functions read the mesh from the state (:func:`batch_sharding`), so nothing
else needs to be passed around.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def select_devices(devices: int | Sequence[Any] | None = None) -> list[Any]:
  """The local devices a trial uses.

  Args:
    devices: ``None`` for all local devices, an int ``n`` for the first ``n``,
      or a sequence of devices (or of their ids).
  """
  local = jax.local_devices()
  if devices is None:
    return local
  if isinstance(devices, int) and not isinstance(devices, bool):
    if not 1 <= devices <= len(local):
      raise ValueError(f"devices must be in [1, {len(local)}] (the local device count), "
                       f"got devices={devices}")
    return local[:devices]
  by_id = {d.id: d for d in local}
  chosen = []
  for d in devices:
    device = by_id.get(d) if isinstance(d, int) else d
    if device is None or device not in local:
      raise ValueError(f"device {d!r} is not a local device; local device ids: {sorted(by_id)}")
    chosen.append(device)
  if not chosen or len(set(chosen)) != len(chosen):
    raise ValueError(f"devices must be a non-empty list of distinct devices, got {list(devices)!r}")
  return chosen


def data_mesh(devices: int | Sequence[Any] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"data"`` over :func:`select_devices`'s choice."""
  return Mesh(np.asarray(select_devices(devices)), (DATA_AXIS,))


def check_batch_size(batch_size: int, num_devices: int) -> None:
  """Raises ``ValueError`` unless ``batch_size`` splits evenly over the devices."""
  if batch_size % num_devices:
    lower = batch_size - batch_size % num_devices
    options = ", ".join(str(b) for b in (lower, lower + num_devices) if b > 0)
    raise ValueError(f"batch size {batch_size} is not divisible by the {num_devices} devices of "
                     f"the mesh; use a multiple of {num_devices} (e.g. {options})")


def replicate_state(state, mesh: Mesh):
  """``state`` with every array replicated on ``mesh``."""
  return jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


def batch_sharding(state) -> NamedSharding | None:
  """How to place batches for ``state``: split over its mesh, or None on one device."""
  sharding = getattr(state.step, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return NamedSharding(sharding.mesh, PartitionSpec(DATA_AXIS))
  return None
