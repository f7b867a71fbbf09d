"""A faster, exact read of a common kind of torch DataLoader: one gather per batch.

A single-process ``DataLoader`` over a ``TensorDataset`` (optionally wrapped
in ``Subset``s) with the default collate function builds each batch by
indexing the dataset once per sample and stacking the results
(``torch.stack`` of ``B`` tensors). :func:`batches` yields the same batches
from one index operation per tensor: the indices come from the loader's own
``batch_sampler``, and the loader's random generator is advanced exactly as
``iter(loader)`` advances it, so shuffled orders, this epoch's and every later
one's, are the ones the loader itself would give. Any other loader is iterated
as it is.

For a 784-feature MLP at batch 64 the per-sample path costs about as much as a
training step on 2 CPU cores; see ``benchmarks/loader_vs_device.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["batches", "epoch_sampler", "gathers", "tensor_source"]


def tensor_source(dataset: Any) -> tuple[tuple[Any, ...], list[Any]] | None:
  """``(tensors, Subset index tensors outermost first)`` for a TensorDataset behind Subsets.

  None for any other dataset, or one whose tensors are not two CPU tensors.
  """
  torch, data = sys.modules["torch"], sys.modules["torch.utils.data"]
  chain = []
  while type(dataset) is data.Subset:  # pylint: disable=unidiomatic-typecheck
    chain.append(torch.as_tensor(dataset.indices, dtype=torch.int64))
    dataset = dataset.dataset
  if type(dataset) is not data.TensorDataset:  # pylint: disable=unidiomatic-typecheck
    return None
  tensors = tuple(dataset.tensors)
  if len(tensors) != 2 or any(t.device.type != "cpu" for t in tensors):
    return None
  return tensors, chain


def epoch_sampler(loader: Any) -> Iterator[list[int]]:
  """The epoch's batch indices, with the loader's RNG advanced as ``iter(loader)`` does.

  ``iter(DataLoader)`` draws a base seed for its workers from the loader's
  generator (or torch's global one) before the sampler draws its order.
  """
  torch = sys.modules["torch"]
  sampler = iter(loader.batch_sampler)
  torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
  return sampler


def gathers(loader: Any) -> bool:
  """Whether :func:`batches` reads ``loader`` by gathering (else it iterates it)."""
  data = sys.modules.get("torch.utils.data")
  if data is None or type(loader) is not data.DataLoader:  # pylint: disable=unidiomatic-typecheck
    return False
  default_collate = data.default_collate
  return (loader.num_workers == 0 and loader.batch_sampler is not None
          and loader.collate_fn is default_collate
          and tensor_source(loader.dataset) is not None)


def _gather(loader: Any) -> Iterator[list[Any]]:
  torch = sys.modules["torch"]
  tensors, chain = tensor_source(loader.dataset)
  for indices in epoch_sampler(loader):
    index = torch.as_tensor(indices, dtype=torch.int64)
    for mapping in chain:  # outermost Subset first
      index = mapping[index]
    yield [t[index] for t in tensors]


def batches(loader: Iterable) -> Iterator[Any]:
  """An iterator over ``loader``'s batches: gathered when :func:`gathers`, else ``iter(loader)``."""
  return _gather(loader) if gathers(loader) else iter(loader)
