"""The one-gather read of TensorDataset loaders gives exactly the loader's own batches."""

import numpy as np
import pytest
import torch
from torch.utils.data import (DataLoader, Dataset, Subset, SubsetRandomSampler, TensorDataset,
                              WeightedRandomSampler)

from orchard_jax.data import device_batches, gather


def _data(n=37):
  x = torch.arange(n * 2 * 3, dtype=torch.float32).reshape(n, 2, 3)
  y = torch.arange(n) % 5
  return TensorDataset(x, y)


def _assert_same_batches(got, want):
  got, want = list(got), list(want)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert len(g) == len(w) == 2
    for a, b in zip(g, w):
      assert a.dtype == b.dtype and a.shape == b.shape
      assert torch.equal(a, b)


def test_shuffled_epochs_with_a_generator_equal_the_loaders_own():
  def make():
    return DataLoader(_data(), batch_size=8, shuffle=True,
                      generator=torch.Generator().manual_seed(3))
  ours, theirs = make(), make()
  assert gather.gathers(ours)
  for _ in range(3):  # later epochs too: the generator advances the same way
    _assert_same_batches(gather.batches(ours), iter(theirs))
  assert torch.equal(ours.generator.get_state(), theirs.generator.get_state())


def test_shuffled_epochs_without_a_generator_use_the_global_rng_the_same_way():
  loader = DataLoader(_data(), batch_size=8, shuffle=True)
  torch.manual_seed(11)
  want = [list(iter(loader)) for _ in range(2)]
  after = torch.random.get_rng_state()
  torch.manual_seed(11)
  got = [list(gather.batches(loader)) for _ in range(2)]
  for g, w in zip(got, want):
    _assert_same_batches(g, w)
  assert torch.equal(torch.random.get_rng_state(), after)


@pytest.mark.parametrize("kwargs", [
    {"drop_last": True},
    {"sampler": SubsetRandomSampler([3, 1, 4, 1, 5, 9, 2, 6], torch.Generator().manual_seed(0))},
    {"sampler": WeightedRandomSampler([1.0] * 20, 20, generator=torch.Generator().manual_seed(0))},
])
def test_subsets_drop_last_and_custom_samplers_equal_the_loaders_own(kwargs):
  dataset = Subset(Subset(_data(), list(range(30, 0, -1))), [0, 2, 4, 6, 8, 10, 12, 14, 16, 18,
                                                             20, 22, 24, 26, 28, 1, 3, 5, 7, 9])
  loader = DataLoader(dataset, batch_size=6, **kwargs)
  assert gather.gathers(loader)
  state = [s.generator.get_state() for s in [loader.sampler] if getattr(s, "generator", None)]
  want = list(iter(loader))
  for s, st in zip([loader.sampler], state):
    s.generator.set_state(st)
  _assert_same_batches(gather.batches(loader), want)


class _Plain(Dataset):
  def __len__(self):
    return 4

  def __getitem__(self, i):
    return torch.zeros(3), 0


class _Loader(DataLoader):
  pass


@pytest.mark.parametrize("make", [
    lambda: DataLoader(_data(), batch_size=4, num_workers=1, multiprocessing_context="spawn"),
    lambda: DataLoader(_data(), batch_size=4, collate_fn=lambda b: b),
    lambda: DataLoader(_Plain(), batch_size=2),
    lambda: DataLoader(TensorDataset(torch.zeros(4, 3), torch.zeros(4), torch.zeros(4)),
                       batch_size=2),
    lambda: DataLoader(_data(), batch_size=None),
    lambda: _Loader(_data(), batch_size=4),
    lambda: [(np.zeros((2, 3)), np.zeros(2, np.int64))],
], ids=["workers", "collate_fn", "custom_dataset", "three_tensors", "no_batching", "subclass",
        "plain_iterable"])
def test_other_loaders_are_iterated_as_they_are(make):
  loader = make()
  assert not gather.gathers(loader)


def test_device_batches_read_a_tensor_dataset_without_per_sample_indexing(monkeypatch):
  dataset = _data(10)
  x, y = dataset.tensors
  loader = DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
  order = torch.randperm(10, generator=_advanced(torch.Generator().manual_seed(0)))

  def per_sample(self, index):
    raise AssertionError("per-sample __getitem__ was called")

  monkeypatch.setattr(TensorDataset, "__getitem__", per_sample)
  got = list(device_batches(loader, num_classes=5, layout="NHWC"))
  images = np.concatenate([np.asarray(b["image"])[np.asarray(b["mask"])] for b in got])
  labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"])] for b in got])
  np.testing.assert_array_equal(images, x[order].numpy()[..., None])
  np.testing.assert_array_equal(labels, y[order].numpy())
  assert [int(np.asarray(b["mask"]).sum()) for b in got] == [4, 4, 2]


def _advanced(generator):
  """The generator after iter(DataLoader) has drawn its base seed from it."""
  torch.empty((), dtype=torch.int64).random_(generator=generator)
  return generator
