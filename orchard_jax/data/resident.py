"""Device-resident inputs for TensorDataset loaders: the images cross to the device once.

For a loader that :func:`orchard_jax.data.gather.gathers` reads (a
single-process DataLoader over a ``TensorDataset``, possibly behind
``Subset``s, with the default collate), the whole image tensor is converted
(float32, NHWC) and put on the device once, and kept there while the tensor
lives and is not modified in place (torch's version counter is checked each
epoch). Indices and labels cross to the device :data:`CHUNK` batches at a
time; each batch is then one gather on the device instead of a per-batch
conversion and copy of the images. With ``indexed=True`` a batch is an
:class:`~orchard_jax.core.batches.IndexedBatch`, which ``train_step`` and
``eval_step`` gather inside their own program (one dispatch per step);
otherwise one compiled gather makes its dict. Batches, their order and the
checks on their labels are the same as on the per-batch path.

Only datasets whose converted images take at most :data:`MAX_BYTES` are kept
on a device, and only for batches on one device (not for a batch sharding
over several devices). Every array of a batch is committed to that device,
as the trial's state is: a step sees one placement and compiles once.

A loader of in-memory numpy arrays that serves its epochs' orders itself
(:func:`serves_epochs`; the command line's
:class:`~orchard_jax.study.sources.ArrayLoader`) is kept resident too, for a
trial's own passes (:func:`batches`) and a cohort's members each reading their
own epoch's order (:func:`member_batches`). It has four members:
``resident_arrays()``, its ``(images, labels)`` (images ``[N, ...]`` as its
batches hold them, integer labels ``[N]``), which must not be modified in
place while it is read; ``batch_size``; ``position``, where its shuffling
is (read and written: a member's own position is restored before and saved
after each of its draws); and ``epoch_indices()``, the index arrays of the
batches the next ``iter(loader)`` yields, advancing ``position`` as that
does.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Callable

import jax
import numpy as np

from orchard_jax.core.batches import IndexedBatch, materialize
from orchard_jax.core.state import default_device
from orchard_jax.data import gather
from orchard_jax.errors import DataError

__all__ = ["CHUNK", "MAX_BYTES", "batches", "fits", "member_batches",
           "serves_epochs"]

MAX_BYTES = 512 * 2**20  # float32 NHWC images kept on the device, at most
CHUNK = 64  # batches whose indices are read, checked and copied to the device together

_lock = threading.Lock()
_resident: dict[tuple, tuple[Any, jax.Array]] = {}  # (id, layout, device) -> (version, images)


def fits(loader: Any) -> bool:
  """Whether ``loader``'s images are read from a device-resident copy: it :func:`serves_epochs`
  or :func:`orchard_jax.data.gather.gathers` reads it, and its images take at most
  :data:`MAX_BYTES` as float32."""
  if serves_epochs(loader):
    images = loader.resident_arrays()[0]
    return images.ndim >= 2 and images.size * 4 <= MAX_BYTES
  if not gather.gathers(loader):
    return False
  (images, _), _ = gather.tensor_source(loader.dataset)
  return images.dim() >= 2 and images.numel() * 4 <= MAX_BYTES


def serves_epochs(loader: Any) -> bool:
  """Whether ``loader`` is a loader of in-memory arrays that serves its epochs' orders (see the
  module docstring)."""
  return all(callable(getattr(loader, name, None)) for name in ("resident_arrays", "epoch_indices"))


def _device_images(images: Any, layout: str, convert: Callable[[np.ndarray, str, Any], np.ndarray],
                   where: Any, device: Any) -> jax.Array:
  key, version = (id(images), layout, device), getattr(images, "_version", None)  # numpy: None
  with _lock:
    hit = _resident.get(key)
    if hit is not None and hit[0] == version:
      return hit[1]
  host = images
  if not isinstance(images, np.ndarray):
    host = images.detach()
    host = (host.float() if host.dtype == sys.modules["torch"].bfloat16 else host).numpy()
  value = convert(host, layout, where)  # checked once, when made resident
  value = jax.device_put(np.concatenate([value, np.zeros((1,) + value.shape[1:], value.dtype)]),
                         device)
  with _lock:
    if key not in _resident:
      weakref.finalize(images, _resident.pop, key, None)
    _resident[key] = (version, value)
  return value


_assemble = jax.jit(materialize)


_rows: dict[Any, tuple[jax.Array, ...]] = {}  # device -> its row ids


def _row_ids(device: Any) -> tuple[jax.Array, ...]:
  """``0 .. CHUNK - 1`` as scalars on ``device``, made once: a batch's row costs no transfer."""
  rows = _rows.get(device)
  if rows is None:
    rows = _rows[device] = tuple(jax.device_put(np.int32(r), device) for r in range(CHUNK))
  return rows


def _read(sampler: Iterator, first: int, where: Callable, loader_error: Callable) -> list:
  """Up to :data:`CHUNK` index lists; an error names the batch it was reading."""
  rows = []
  while len(rows) < CHUNK:
    try:
      rows.append(next(sampler))
    except StopIteration:
      break
    except BaseException as e:
      raise loader_error(e, where(first + len(rows))) from e
  return rows


def _dataset(loader: Any, layout: str, convert_images: Callable, where: Any, device: Any):
  """``(device images, host labels, class ids, Subset index maps)`` of ``loader``'s dataset
  (a ``TensorDataset`` behind ``Subset`` s, or the arrays of a loader that
  :func:`serves_epochs`)."""
  if serves_epochs(loader):
    images, host_labels = loader.resident_arrays()
    chain = []
  else:
    torch = sys.modules["torch"]
    (images, labels), chain = gather.tensor_source(loader.dataset)
    labels = labels.detach()
    host_labels = (labels.float() if labels.dtype == torch.bfloat16 else labels).numpy()
  device_images = _device_images(images, layout, convert_images, where, device)
  class_ids = host_labels[:, 0] if host_labels.ndim == 2 and host_labels.shape[1] == 1 \
      else host_labels
  return device_images, host_labels, class_ids, [np.asarray(m) for m in chain]


def _chunk(rows: list, first: int, full: int, data: tuple, num_classes: int,
           convert_labels: Callable, where: Callable) -> tuple[np.ndarray, ...]:
  """Host ``(index, ids, counts)`` of up to :data:`CHUNK` index lists, checked (a bad label or
  batch size raises, naming its batch)."""
  _, host_labels, class_ids, chain = data
  index, counts = np.full((CHUNK, full), len(class_ids), np.int64), np.zeros(CHUNK, np.int32)
  for r, row in enumerate(rows):
    if not 0 < len(row) <= full:
      at = where(first + r)
      raise DataError(f"{at.data('batch')} has {len(row)} samples {at.at}; a batch needs "
                      f"between 1 and the full batch size B={full}")
    index[r, :len(row)], counts[r] = row, len(row)
  valid = np.arange(full) < counts[:, None]
  flat = index[valid]
  for mapping in chain:  # outermost Subset first
    flat = mapping[flat]
  index[valid] = flat
  # Dtype and shape errors are the dataset's: reported at the chunk's first batch.
  convert_labels(host_labels[index[0, :counts[0]]], int(counts[0]), num_classes, where(first))
  ids = np.where(valid, class_ids[np.where(valid, index, 0)], 0)
  bad = (ids < 0) | (ids >= num_classes)
  if bad.any():
    r = int(np.argmax(bad.any(axis=1)))
    convert_labels(host_labels[index[r, :counts[r]]], int(counts[r]), num_classes,
                   where(first + r))  # raises, naming the batch
  return index.astype(np.int32), ids.astype(np.int32), counts


def batches(loader: Any, *, num_classes: int, layout: str,
            convert_images: Callable, convert_labels: Callable, where: Callable[[int | None], Any],
            loader_error: Callable, indexed: bool = False, device: Any = None
            ) -> Iterator[dict[str, jax.Array] | IndexedBatch]:
  """The device batches of ``loader`` (see the module docstring); ``fits(loader)`` must hold.

  Index lists are read from the loader's sampler :data:`CHUNK` batches at a
  time, checked together on the host (with the per-batch path's messages,
  naming the first bad batch) and copied to the device in one transfer. Each
  batch is then an :class:`IndexedBatch` (``indexed=True``) or the dict that
  one asynchronous gather makes of it. ``where(batch_index)`` (None: the
  whole dataset) places a bad value for the converters' messages;
  ``loader_error(exc, where)`` is what an exception raised by the sampler
  becomes. Every array of a batch is committed to ``device`` (None: the
  default device).
  """
  if device is None:
    device = default_device()
  data = _dataset(loader, layout, convert_images, where(None), device)
  row_ids = _row_ids(device)
  try:
    sampler = iter(loader.epoch_indices()) if serves_epochs(loader) else gather.epoch_sampler(loader)
  except BaseException as e:
    raise loader_error(e, where(0)) from e
  full, first = loader.batch_size, 0
  while rows := _read(sampler, first, where, loader_error):
    full = full or len(rows[0]) or 1
    chunk = jax.device_put(_chunk(rows, first, full, data, num_classes, convert_labels, where),
                           device)
    for row in row_ids[:len(rows)]:
      batch = IndexedBatch(data[0], *chunk, row)
      yield batch if indexed else _assemble(batch)
    first += len(rows)


def member_batches(loader: Any, orders: list, *, num_classes: int, layout: str,
                   convert_images: Callable, convert_labels: Callable, wheres: list,
                   stacked: bool, device: Any) -> Iterator[IndexedBatch | tuple]:
  """One pass in which member ``i`` of a cohort reads its own batches, ``orders[i]`` (its epoch's
  index lists, all of one length; None for a free slot), of ``loader``'s dataset
  (:func:`fits` must hold).

  ``stacked``: each step's batch is one :class:`IndexedBatch` whose ``index``, ``label`` and
  ``count`` have a leading member axis (a free slot reads the first member's rows), for the
  vmapped step; else a tuple of each member's own solo batch (None for a free slot): an
  :class:`IndexedBatch` where the solo run reads one (:func:`fits`), else the dict it reads,
  gathered from the resident images, so that each member's solo program steps it. Checks and
  messages are :func:`batches`'s, ``wheres[i]`` placing member ``i``'s.
  """
  live = [i for i, order in enumerate(orders) if order is not None]
  data = _dataset(loader, layout, convert_images, wheres[live[0]](None), device)
  row_ids, count = _row_ids(device), len(orders[live[0]])
  full = loader.batch_size or max(len(orders[live[0]][0]) if count else 1, 1)
  for first in range(0, count, CHUNK):
    chunks = {i: _chunk(orders[i][first:first + CHUNK], first, full, data, num_classes,
                        convert_labels, wheres[i]) for i in live}
    rows = row_ids[:min(CHUNK, count - first)]
    if stacked:
      every = [chunks.get(i, chunks[live[0]]) for i in range(len(orders))]
      chunk = jax.device_put(tuple(np.stack(arrays) for arrays in zip(*every)), device)
      for row in rows:
        yield IndexedBatch(data[0], *chunk, row)
    else:
      own, indexed = {i: jax.device_put(c, device) for i, c in chunks.items()}, fits(loader)
      for row in rows:
        yield tuple(None if i not in own else IndexedBatch(data[0], *own[i], row) if indexed
                    else _assemble(IndexedBatch(data[0], *own[i], row))
                    for i in range(len(orders)))
