"""From torch DataLoaders (or any iterable of batches) to device batches.

:func:`device_batches` turns an iterable of ``(inputs, labels)`` batches into
the batch format of ``orchard_jax.core.steps``::

  {"image": float32 [B, ...], "label": int32 [B], "mask": bool [B]}

with ``B`` the loader's full batch size and ``mask`` False on padding rows.
Conversion, checks and ``jax.device_put`` run on a background thread a few
batches ahead of the consumer. :func:`make_loader` builds a DataLoader that is
safe to use next to JAX (seeded shuffling, "spawn" workers).

torch is imported only where needed: a loader of numpy arrays never imports it.
"""

from __future__ import annotations

import multiprocessing
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from orchard_jax.core.sharding import check_batch_size
from orchard_jax.core.state import default_device
from orchard_jax.data import gather, resident
from orchard_jax.errors import DataError, LoaderError

LAYOUTS = ("NCHW", "NHWC")
ROLES = (None, "training", "validation")
THREAD_NAME = "orchard_jax-prefetch"
_JOIN_TIMEOUT_S = 5.0
_POLL_S = 0.05
_DONE = object()


def _default_start_method() -> str:
  """The start method a DataLoader without ``multiprocessing_context`` uses."""
  return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def _torch_dataloader_type() -> type | None:
  data = sys.modules.get("torch.utils.data")
  return None if data is None else data.DataLoader


def _check_workers(loader: Any) -> None:
  dataloader = _torch_dataloader_type()
  if dataloader is None or not isinstance(loader, dataloader) or loader.num_workers == 0:
    return
  if loader.multiprocessing_context is None and _default_start_method() == "fork":
    raise ValueError(
        f"DataLoader has num_workers={loader.num_workers} and no multiprocessing_context, so its "
        "workers would be forked from a process where JAX already runs threads, which can "
        "deadlock. Pass multiprocessing_context=\"spawn\" (or \"forkserver\") to the DataLoader, "
        "use num_workers=0, or build it with orchard_jax.data.make_loader(...).")


def _full_batch_size(loader: Any) -> int | None:
  dataloader = _torch_dataloader_type()
  if dataloader is not None and isinstance(loader, dataloader) and loader.batch_size is not None:
    return int(loader.batch_size)
  return None


class Where(NamedTuple):
  """Where a bad value was found, for the one-line messages of :class:`DataError`."""
  role: str | None          # "training", "validation" or None
  batch: int | None         # 0-based batch index; None: the whole dataset
  epoch: int | None

  def data(self, what: str) -> str:
    """``'validation labels'`` (or ``'labels'`` without a role)."""
    return what if self.role is None else f"{self.role} {what}"

  @property
  def at(self) -> str:
    """``'in batch 3 (epoch 2)'``, ``'in batch 3'``, ``'in the dataset'``."""
    place = "in the dataset" if self.batch is None else f"in batch {self.batch}"
    return place if self.epoch is None else f"{place} (epoch {self.epoch})"

  @property
  def loader(self) -> str:
    return "the loader" if self.role is None else f"{self.role} loader"


def loader_error(e: BaseException, where: Where) -> BaseException:
  """What an exception raised by iterating the user's loader becomes.

  A :class:`LoaderError` naming the loader, the original type and message
  and the batch being read (raise it ``from e``); a ``DataError`` or an
  exception that is not an ``Exception`` (``KeyboardInterrupt``) stays as is.
  """
  if isinstance(e, DataError) or not isinstance(e, Exception):
    return e
  return LoaderError(f"{where.loader} raised {type(e).__name__}: {e} while reading "
                     f"{where.at.removeprefix('in ')}")


def _values(bad: np.ndarray) -> str:
  shown = ", ".join(str(v) for v in bad[:10].tolist())
  return shown + (f" (and {bad.size - 10} more)" if bad.size > 10 else "")


def _to_numpy(x: Any, name: str, where: Where) -> np.ndarray:
  """A numpy view of ``x`` when possible (torch CPU tensors share memory)."""
  torch = sys.modules.get("torch")
  if torch is not None and isinstance(x, torch.Tensor):
    x = x.detach()
    if x.device.type != "cpu":
      x = x.cpu()
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16
      x = x.float()
    return x.numpy()
  if isinstance(x, (list, tuple)) and x and all(hasattr(e, "shape") for e in x):
    return np.stack([_to_numpy(e, name, where) for e in x])
  try:
    return np.asarray(x)
  except (ValueError, TypeError) as e:
    raise DataError(f"{where.data(name)} cannot be converted to a numeric array "
                    f"({type(x).__name__}) {where.at}: {e}") from e


def _convert_images(x: np.ndarray, layout: str, where: Where) -> np.ndarray:
  if x.dtype.kind not in "biuf":
    raise DataError(f"{where.data('inputs')} must be numeric, got dtype {x.dtype} {where.at}")
  if x.ndim == 4 and layout == "NCHW":
    x = x.transpose(0, 2, 3, 1)
  elif x.ndim == 3:
    x = x[..., None]
  elif x.ndim not in (2, 4):
    raise DataError(f"{where.data('inputs')} must have 2 ([B, F]), 3 ([B, H, W]) or 4 dimensions "
                    f"([B, C, H, W] or [B, H, W, C]), got shape {x.shape} {where.at}")
  return np.ascontiguousarray(x, dtype=np.float32)  # one pass: transpose and cast, or no copy


def _convert_labels(y: np.ndarray, n: int, num_classes: int, where: Where) -> np.ndarray:
  labels = where.data("labels")
  if y.dtype.kind not in "iu":
    raise DataError(f"{labels} must be integer class ids, got dtype {y.dtype} {where.at}")
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise DataError(f"{labels} must have shape [B] or [B, 1] (class ids), got {y.shape} "
                    f"{where.at}; one-hot or multi-label targets are not supported")
  if y.shape[0] != n:
    raise DataError(f"{where.data('batch')} has {n} inputs but {y.shape[0]} labels {where.at}")
  if n and (y.min() < 0 or y.max() >= num_classes):  # on the host, before the transfer
    bad = np.unique(y[(y < 0) | (y >= num_classes)])
    raise DataError(f"{labels} must be in [0, {num_classes}), got {_values(bad)} {where.at}")
  return y.astype(np.int32)


def _host_batch(batch: Any, num_classes: int, layout: str, full: int | None,
                sample_shape: tuple | None, where: Where) -> tuple[dict[str, np.ndarray], tuple]:
  """Converts one ``(inputs, labels)`` batch; returns it padded and its raw per-sample shape."""
  if not isinstance(batch, (list, tuple)) or len(batch) != 2:
    got = type(batch).__name__ + (f" of length {len(batch)}"
                                  if isinstance(batch, (list, tuple)) else "")
    raise DataError(f"{where.data('batches')} must be (inputs, labels) pairs, got {got} "
                    f"{where.at}")
  x = _to_numpy(batch[0], "inputs", where)
  y = _to_numpy(batch[1], "labels", where)
  if x.ndim == 0 or x.shape[0] == 0:
    raise DataError(f"{where.data('batch')} is empty (inputs of shape {x.shape}) {where.at}")
  if sample_shape is not None and x.shape[1:] != sample_shape:
    raise DataError(f"{where.data('inputs')} have per-sample shape {x.shape[1:]} {where.at}, "
                    f"but the first batch's was {sample_shape}")
  n = x.shape[0]
  if full is not None and n > full:
    raise DataError(f"{where.data('batch')} has {n} samples {where.at}, more than the full "
                    f"batch size B={full}")
  image = _convert_images(x, layout, where)
  label = _convert_labels(y, n, num_classes, where)
  full = n if full is None else full
  mask = np.arange(full) < n
  if n < full:
    image = np.concatenate([image, np.zeros((full - n,) + image.shape[1:], np.float32)])
    label = np.concatenate([label, np.zeros(full - n, np.int32)])
  return {"image": image, "label": label, "mask": mask}, x.shape[1:]


def _produce(loader: Iterable, out: queue.Queue, stop: threading.Event, num_classes: int,
             layout: str, full: int | None, epoch: int | None, sharding: Any,
             role: str | None) -> None:
  """Thread body: read, convert, check, ``device_put``; ends with ``_DONE`` or an exception."""

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        pass
    return False

  sample_shape = None
  batch_index = 0
  try:
    iterator = None
    while not stop.is_set():
      where = Where(role, batch_index, epoch)
      try:
        if iterator is None:
          iterator = gather.batches(loader)  # iter(loader): the loader's own code runs
        batch = next(iterator)
      except StopIteration:
        break
      except BaseException as e:
        raise loader_error(e, where) from e
      host, sample_shape = _host_batch(batch, num_classes, layout, full, sample_shape, where)
      full = host["mask"].shape[0]
      check_batch_size(full, len(sharding.device_set))
      if not put(jax.device_put(host, sharding)):  # committed to the sharding
        return
      batch_index += 1
    put(_DONE)
  except BaseException as e:  # handed to the consumer, which re-raises it
    put(e)


def _consume(loader: Iterable, num_classes: int, layout: str, prefetch: int,
             full: int | None, epoch: int | None, sharding: Any,
             role: str | None) -> Iterator[dict[str, jax.Array]]:
  out: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()
  thread = threading.Thread(target=_produce, name=THREAD_NAME, daemon=True,
                            args=(loader, out, stop, num_classes, layout, full, epoch, sharding,
                                  role))
  thread.start()
  try:
    while True:
      try:
        item = out.get(timeout=_POLL_S)
      except queue.Empty:
        if not thread.is_alive() and out.empty():
          raise RuntimeError("orchard_jax: the prefetch thread ended without a result") from None
        continue
      if item is _DONE:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join(timeout=_JOIN_TIMEOUT_S)


def device_batches(loader: Iterable, *, num_classes: int, layout: str = "NCHW", prefetch: int = 2,
                   epoch: int | None = None, sharding: Any = None,
                   indexed: bool = False, role: str | None = None
                   ) -> Iterator[dict[str, jax.Array]]:
  """Iterates ``loader`` as padded, checked device batches, prefetched on a thread.

  Args:
    loader: any iterable of ``(inputs, labels)`` pairs (tuples or lists, as a
      ``torch.utils.data.DataLoader`` yields them) of torch tensors, numpy
      arrays or nested lists of numbers. Torch CPU tensors are read through
      ``Tensor.numpy()`` (shared memory) and numpy inputs through
      ``np.asarray``; the only copy is the float32 cast / layout change. A
      single-process DataLoader over a ``TensorDataset`` (or ``Subset`` of
      one) with the default collate is read with one gather per batch
      instead of per-sample indexing and stacking: the same batches in the
      same order (see :mod:`orchard_jax.data.gather`); unless ``sharding``
      spans several devices, its images are moved to the device once and
      gathered there, without the prefetch thread
      (:mod:`orchard_jax.data.resident`).
    num_classes: labels must lie in ``[0, num_classes)``.
    layout: ``"NCHW"`` (torch's convention, the default) transposes 4-D inputs
      to NHWC; ``"NHWC"`` leaves them. 3-D inputs ``[B, H, W]`` get a channel
      axis ``[B, H, W, 1]``; 2-D ``[B, F]`` stay. Images are cast to float32
      *without rescaling*: uint8 pixels stay in [0, 255], so normalise in the
      dataset's transforms, as torch users do.
    prefetch: how many converted batches may wait on the device (>= 1).
    epoch: only used in error messages.
    sharding: where batches go (``jax.device_put``'s second argument: a
      device or a sharding); a ``NamedSharding`` over a multi-device mesh
      splits each batch along its first axis (see
      :mod:`orchard_jax.core.sharding`). None: the default device
      (:func:`orchard_jax.core.state.default_device`). Every array of every
      batch is committed to it, as the states of
      :func:`orchard_jax.create_train_state` are, so a step sees one
      placement from its first batch to its last and compiles once.
    indexed: for a loader whose images are device-resident, yield
      :class:`~orchard_jax.core.batches.IndexedBatch` rows instead of dicts;
      ``train_step`` and ``eval_step`` gather them inside their program
      (``orchard_jax.core.batches.materialize`` gives the dict). Other
      loaders yield dicts either way.
    role: ``"training"`` or ``"validation"``: what the loader is, named in
      error messages (``"validation labels must be in [0, 10), got 12 in
      batch 3 (epoch 2)"``); None names neither.

  Yields:
    ``{"image": float32 [B, ...], "label": int32 [B], "mask": bool [B]}``
    (or, with ``indexed``, an ``IndexedBatch`` that materializes to it).
    ``B`` is ``loader.batch_size`` for a DataLoader that has one, else the
    first batch's size. Shorter batches (the last one) are padded to ``B``
    with zeros and label 0, ``mask`` False on the padding rows, so they are
    neither dropped nor recompiled for.

  Raises:
    ValueError: at call time for bad arguments, or a DataLoader with
      ``num_workers > 0`` that would fork (the platform default start method
      is "fork" and it has no ``multiprocessing_context``); while iterating,
      a ``B`` that the sharding's devices do not divide.
    orchard_jax.errors.DataError: while iterating, bad data, named with the
      batch index (0-based) and epoch: labels outside ``[0, num_classes)``
      (checked on the host, before the transfer), non-integer labels, labels
      not of shape [B] or [B, 1], non-numeric inputs, a per-sample input
      shape different from the first batch's, a batch larger than ``B``, an
      empty batch, a batch that is not a pair.
    orchard_jax.errors.LoaderError: (a ``DataError``) the loader itself
      raised while it was iterated: ``"validation loader raised KeyError:
      'label' while reading batch 3 (epoch 2)"``, chained to the original
      exception (``__cause__``). ``KeyboardInterrupt`` and other exceptions
      that are not ``Exception`` pass unchanged.

  Errors raised on the thread are re-raised in the consumer. Closing the
  generator (``.close()``, or leaving ``with contextlib.closing(...)``) stops
  and joins the thread. NaN/Inf inputs are not checked here (a per-batch
  host cost): ``train_step`` counts the rows that hold them on the device.
  The loader must not modify an array after yielding it (it may still be
  waiting in the prefetch queue).
  """
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be an int >= 1, got num_classes={num_classes!r}")
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got layout={layout!r}")
  if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
    raise ValueError(f"prefetch must be an int >= 1, got prefetch={prefetch!r}")
  if role not in ROLES:
    raise ValueError(f"role must be one of {ROLES}, got role={role!r}")
  _check_workers(loader)
  full = _full_batch_size(loader)
  sharding = _sharding(sharding)
  if full is not None:
    check_batch_size(full, len(sharding.device_set))
  if len(sharding.device_set) == 1 and resident.fits(loader):
    # The images are on the device already and each batch is one asynchronous
    # gather: a prefetch thread would only compete with the step for the GIL.
    return resident.batches(loader, num_classes=num_classes, layout=layout,
                            convert_images=_convert_images, convert_labels=_convert_labels,
                            where=lambda batch: Where(role, batch, epoch),
                            loader_error=loader_error, indexed=indexed,
                            device=next(iter(sharding.device_set)))
  return _consume(loader, num_classes, layout, prefetch, full, epoch, sharding, role)


def _sharding(sharding: Any) -> jax.sharding.Sharding:
  """``device_batches``'s ``sharding`` argument as a sharding (None: the default device)."""
  if sharding is None:
    sharding = default_device()
  if isinstance(sharding, jax.Device):
    return jax.sharding.SingleDeviceSharding(sharding)
  if not isinstance(sharding, jax.sharding.Sharding):
    raise ValueError(f"sharding must be None, a jax.Device or a jax.sharding.Sharding, got "
                     f"sharding={sharding!r}")
  return sharding


def make_loader(dataset: Any, batch_size: int, *, shuffle: bool, num_workers: int = 0,
                seed: int = 42, **kwargs: Any):
  """A ``torch.utils.data.DataLoader`` that is safe to use with JAX.

  Shuffling draws from a ``torch.Generator`` seeded with ``seed`` (which also
  seeds the workers), so the order is reproducible without touching torch's
  global RNG. With ``num_workers > 0`` the workers are started with "spawn"
  unless ``multiprocessing_context`` is given. Other keyword arguments go to
  the DataLoader unchanged.
  """
  import torch  # pylint: disable=import-outside-toplevel

  if num_workers > 0:
    kwargs.setdefault("multiprocessing_context", "spawn")
  generator = torch.Generator().manual_seed(seed)
  return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                     num_workers=num_workers, generator=generator, **kwargs)
