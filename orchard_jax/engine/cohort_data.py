"""What a cohort's members read: which data they share, and each member's own epoch order.

Trials train in one cohort only when they read the same data
(:func:`data_identity`, part of :func:`~orchard_jax.engine.cohort.cohort_key`),
so bad data fails exactly the trials that would fail on it alone.

A member reads its own epoch's order, the one its solo run reads at that
epoch, when its training loader can serve it (:func:`own_orders`): a
single-process torch DataLoader over a ``TensorDataset`` (images resident on
one device), shuffled by its ``generator`` or not at all. Each member keeps
its own position in that shuffling (:class:`Stream`: the generator's state,
restored before and saved after each of its draws), and each step gathers
each member's own rows (:func:`orchard_jax.data.resident.member_batches`).
Other loaders are read once per shared pass, in the cohort's order: a fixed
order (a list of batches, an unshuffled DataLoader) is every member's own,
but a member that joins a cohort of a shuffling loader after its first pass
reads the cohort's current order (recorded as :data:`SHARED_ORDER`).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from typing import Any

import jax
import numpy as np

from orchard_jax.data import gather, resident
from orchard_jax.data.adapter import Where, _convert_images, _convert_labels, loader_error

SHARED_ORDER = "cohort_shared_order"  # the user attribute of a member that reads another order


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
  """A position in ``loader``'s shuffling: its torch generator's state, taken now (a member's
  solo start). :meth:`active` makes it the generator's state, and keeps where it got to."""

  def __init__(self, loader: Any):
    torch = sys.modules.get("torch")
    generator = getattr(loader, "generator", None)
    self.loader = loader
    self.generator = generator if torch is not None and isinstance(generator, torch.Generator) \
        else None
    self.state = None if self.generator is None else self.generator.get_state()

  @contextlib.contextmanager
  def active(self):
    if self.generator is None:
      yield
      return
    self.generator.set_state(self.state)
    try:
      yield
    finally:
      self.state = self.generator.get_state()

  def epoch_order(self, epoch: int) -> list:
    """The index lists of the loader's next epoch from this position (``iter(loader)``'s)."""
    with self.active():
      try:
        return list(gather.epoch_sampler(self.loader))
      except BaseException as e:
        raise loader_error(e, Where("training", 0, epoch)) from e


def same_position(a: Stream | None, b: Stream | None) -> bool:
  """Whether two members' streams are at one position of one shuffling (no generator: assumed,
  as members of one cohort share the data and the seed)."""
  if a is None or b is None or a.generator is None or b.generator is None:
    return (a is None or a.generator is None) and (b is None or b.generator is None)
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


def stacked(batch: Any, k: int) -> Any:
  """A shared ``IndexedBatch`` as ``k`` members' own (their rows all its rows): the shapes and
  placement of a pass of :func:`member_batches`, for compiling its step ahead."""
  def own(a):
    return jax.device_put(np.broadcast_to(np.asarray(a), (k, *a.shape)), a.sharding)
  return batch._replace(index=own(batch.index), label=own(batch.label), count=own(batch.count))
