"""What a cohort's members read: which data they share, and each member's own epoch order.

Trials train in one cohort only when they read the same data
(:func:`data_identity`, part of :func:`~orchard_jax.engine.member.cohort_key`),
so bad data fails exactly the trials that would fail on it alone.

A member reads its own epoch's order, the one its solo run reads at that
epoch, when its training loader can serve it (:func:`own_orders`; images
resident on one device): a single-process torch DataLoader over a
``TensorDataset``, shuffled by its ``generator`` or not at all, or a loader
of in-memory arrays that serves its epochs' orders (the command line's
:class:`~orchard_jax.study.sources.ArrayLoader`; see
:mod:`orchard_jax.data.resident`). Each member keeps its own position in that
shuffling (:class:`Stream`: the generator's state, or the array loader's
``position``, restored before and saved after each of its draws), and each
step gathers each member's own rows
(:func:`orchard_jax.data.resident.member_batches`).
Other loaders are read once per shared pass, in the cohort's order: a fixed
order (a list of batches, an unshuffled DataLoader) is every member's own,
but a member that joins a cohort of a shuffling loader after its first pass
reads the cohort's current order (recorded as
:data:`~orchard_jax.records.SHARED_ORDER`).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from typing import Any

import numpy as np

from orchard_jax.data import gather, resident
from orchard_jax.data.adapter import Where, _convert_images, _convert_labels, loader_error


def _array_identity(a: Any) -> Any:
  """The memory a numpy array or torch tensor reads (None for anything else)."""
  torch = sys.modules.get("torch")
  if torch is not None and isinstance(a, torch.Tensor):
    return ("tensor", a.device.type, a.data_ptr(), tuple(a.shape), a.stride(), str(a.dtype),
            a._version)
  if isinstance(a, np.ndarray):
    return ("array", a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)
  return None


def _torch_identity(loader: Any) -> Any:
  source = gather.tensor_source(loader.dataset)
  if source is None:
    dataset: Any = ("dataset", id(loader.dataset))
  else:
    tensors, chain = source
    dataset = (*(_array_identity(t) for t in tensors),
               *(hashlib.blake2b(np.asarray(m).tobytes(), digest_size=16).digest()
                 for m in chain))
  return ("DataLoader", dataset, loader.batch_size, loader.drop_last, len(loader),
          type(loader.sampler).__name__, id(loader.collate_fn))


def data_identity(loader: Any) -> Any:
  """What names the samples ``loader`` yields, cheaply and exactly: equal for two loaders that
  read the same data in the same way.

  A torch DataLoader: its dataset (a ``TensorDataset``'s tensors by memory and version and its
  ``Subset`` indices; any other dataset by object), batch size, ``drop_last``, length, sampler
  kind and collate function. A list or tuple of batches of numpy arrays or torch tensors: the
  memory of each. A loader with a ``data_identity()`` method: what it returns. Anything else:
  the loader object itself.
  """
  own = getattr(loader, "data_identity", None)
  if callable(own):
    return (type(loader).__qualname__, own())
  data = sys.modules.get("torch.utils.data")
  if data is not None and isinstance(loader, data.DataLoader):
    return _torch_identity(loader)
  if isinstance(loader, (list, tuple)):
    parts = [_array_identity(a) for batch in loader
             for a in (batch if isinstance(batch, (list, tuple)) else (batch,))]
    if parts and None not in parts:
      return ("batches", tuple(parts))
  return ("object", id(loader))


def _sampler_kinds() -> tuple[type, ...]:
  data = sys.modules["torch.utils.data"]
  return data.RandomSampler, data.SequentialSampler


def own_orders(loader: Any) -> bool:
  """Whether a cohort can give each member its own epoch order of ``loader`` (on one device)."""
  if not resident.fits(loader):
    return False
  if resident.serves_epochs(loader):
    return True
  data = sys.modules["torch.utils.data"]
  sampler = loader.sampler
  return (type(loader.batch_sampler) is data.BatchSampler  # pylint: disable=unidiomatic-typecheck
          and type(sampler) in _sampler_kinds()
          and getattr(sampler, "generator", loader.generator) is loader.generator)


def fixed_order(loader: Any) -> bool:
  """Whether ``loader`` yields its batches in one order every pass (a list, an unshuffled
  DataLoader)."""
  if isinstance(loader, (list, tuple)):
    return True
  data = sys.modules.get("torch.utils.data")
  return (data is not None and isinstance(loader, data.DataLoader)
          and type(loader.sampler) is data.SequentialSampler)  # pylint: disable=unidiomatic-typecheck


class Stream:
  """A position in ``loader``'s shuffling, taken now (a member's solo start): its torch
  generator's state, or the ``position`` of a loader that serves its epochs
  (:func:`~orchard_jax.data.resident.serves_epochs`). :meth:`active` makes it the loader's
  position, and keeps where it got to."""

  def __init__(self, loader: Any):
    torch = sys.modules.get("torch")
    generator = getattr(loader, "generator", None)
    self.loader = loader
    self.generator = generator if torch is not None and isinstance(generator, torch.Generator) \
        else None
    self.arrays = self.generator is None and resident.serves_epochs(loader)
    self.state = (self.generator.get_state() if self.generator is not None else
                  loader.position if self.arrays else None)

  @contextlib.contextmanager
  def active(self):
    if self.generator is None and not self.arrays:
      yield
      return
    if self.arrays:
      self.loader.position = self.state
    else:
      self.generator.set_state(self.state)
    try:
      yield
    finally:
      self.state = self.loader.position if self.arrays else self.generator.get_state()

  def epoch_order(self, epoch: int) -> list:
    """The index lists of the loader's next epoch from this position (``iter(loader)``'s)."""
    with self.active():
      try:
        if self.arrays:
          return self.loader.epoch_indices()
        return list(gather.epoch_sampler(self.loader))
      except BaseException as e:
        raise loader_error(e, Where("training", 0, epoch)) from e


def same_position(a: Stream | None, b: Stream | None) -> bool:
  """Whether two members' streams are at one position of one shuffling (no position to compare:
  assumed, as members of one cohort share the data and the seed)."""
  a, b = (None if s is None or s.state is None else s for s in (a, b))
  if a is None or b is None:
    return a is b
  if a.arrays or b.arrays:
    return a.arrays == b.arrays and a.state == b.state
  return bool(sys.modules["torch"].equal(a.state, b.state))


def member_batches(streams: list, epochs: list, state: Any, layout: str, stacked: bool,
                   device: Any):
  """One training pass in which each member (a :class:`Stream` at its epoch, None for a free
  slot) reads its own epoch's batches: see :func:`orchard_jax.data.resident.member_batches`."""
  orders = [None if s is None else s.epoch_order(e) for s, e in zip(streams, epochs)]
  loader = next(s for s in streams if s is not None).loader
  wheres = [lambda b, e=e: Where("training", b, e) for e in epochs]
  return contextlib.closing(resident.member_batches(
      loader, orders, num_classes=state.spec.num_classes, layout=layout,
      convert_images=_convert_images, convert_labels=_convert_labels, wheres=wheres,
      stacked=stacked, device=device))


def first_member_batch(loader: Any, state: Any, k: int, layout: str, stacked: bool,
                       device: Any) -> Any:
  """The first batch of a pass of :func:`member_batches` of ``k`` slots, one member reading
  ``loader`` from its position (the others free): its shapes and placement, for compiling the
  steps ahead. None for an empty pass."""
  with member_batches([Stream(loader), *[None] * (k - 1)], [1, *[None] * (k - 1)], state, layout,
                      stacked, device) as batches:
    return next(batches, None)
