"""Device-resident TensorDataset images: the same batches as the per-batch path, uploaded once."""

import gc

import jax
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from orchard_jax.core.batches import IndexedBatch, materialize
from orchard_jax.data import device_batches, resident
from orchard_jax.errors import DataError, LoaderError


def _host(batches):
  return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


def _per_batch(loader):
  """The same batches through the per-batch path (a plain iterable of the loader's batches)."""
  return list(iter(loader))


@pytest.mark.parametrize("case", ["nchw_float", "uint8_nhw", "labels_n1", "subset_shuffled"])
def test_resident_batches_equal_the_per_batch_path(case):
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(37, 2, 4, 3)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, 5, 37))
  kwargs = {}
  if case == "uint8_nhw":
    x = torch.from_numpy(rng.integers(0, 255, (37, 4, 3)).astype(np.uint8))
  if case == "labels_n1":
    y = y[:, None]
  dataset = TensorDataset(x, y)
  if case == "subset_shuffled":
    dataset = Subset(dataset, list(range(36, 5, -1)))
    kwargs = {"shuffle": True, "generator": torch.Generator().manual_seed(4)}
  loader = DataLoader(dataset, batch_size=8, **kwargs)
  twin = DataLoader(dataset, batch_size=8, **{**kwargs, "generator": torch.Generator().manual_seed(4)}
                    if kwargs else {})
  assert resident.fits(loader)
  for _ in range(2):
    got = _host(device_batches(loader, num_classes=5))
    want = _host(device_batches(_per_batch(twin), num_classes=5))
    # A plain iterable's full batch size is its first batch's; the loader's is batch_size.
    assert len(got) == len(want)
    for g, w in zip(got, want):
      assert g.keys() == w.keys()
      for key in g:
        np.testing.assert_array_equal(g[key], w[key], err_msg=key)
        assert g[key].dtype == w[key].dtype


def test_images_are_uploaded_once_and_again_after_an_in_place_change():
  x = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
  loader = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.int64)), batch_size=4)
  first = _host(device_batches(loader, num_classes=2))
  key = (id(x), "NCHW", jax.devices()[0])
  uploaded = resident._resident[key][1]
  _host(device_batches(loader, num_classes=2))
  assert resident._resident[key][1] is uploaded  # reused
  x.mul_(2.0)
  changed = _host(device_batches(loader, num_classes=2))
  assert resident._resident[key][1] is not uploaded
  np.testing.assert_array_equal(changed[0]["image"], 2.0 * first[0]["image"])


def test_the_device_copy_is_dropped_with_its_tensor():
  x = torch.ones(6, 3)
  loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.int64)), batch_size=4)
  list(device_batches(loader, num_classes=2))
  key = (id(x), "NCHW", jax.devices()[0])
  assert key in resident._resident
  del loader, x
  gc.collect()
  assert key not in resident._resident


def test_datasets_over_the_size_limit_take_the_per_batch_path(monkeypatch):
  x = torch.ones(6, 3)
  loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.int64)), batch_size=4)
  monkeypatch.setattr(resident, "MAX_BYTES", 6 * 3 * 4 - 1)
  assert not resident.fits(loader)
  list(device_batches(loader, num_classes=2))
  assert (id(x), "NCHW") not in resident._resident


def test_a_bad_label_names_its_batch_and_epoch():
  y = torch.tensor([0, 1, 0, 1, 7, 0])
  loader = DataLoader(TensorDataset(torch.ones(6, 3), y), batch_size=2)
  with pytest.raises(DataError, match=r"^validation labels must be in \[0, 2\), got 7 in batch 2 "
                                      r"\(epoch 3\)$"):
    list(device_batches(loader, num_classes=2, epoch=3, role="validation"))


class _FailingSampler(torch.utils.data.Sampler):
  def __init__(self, n, fail_at):
    self.n, self.fail_at = n, fail_at

  def __len__(self):
    return self.n

  def __iter__(self):
    for i in range(self.n):
      if i == self.fail_at:
        raise IndexError(f"sample {i} is gone")
      yield i


def test_a_sampler_that_raises_is_a_loader_error_naming_the_batch():
  loader = DataLoader(TensorDataset(torch.ones(6, 3), torch.zeros(6, dtype=torch.int64)),
                      batch_size=2, sampler=_FailingSampler(6, fail_at=4))
  assert resident.fits(loader)
  message = (r"^training loader raised IndexError: sample 4 is gone while reading batch 2 "
             r"\(epoch 1\)$")
  with pytest.raises(LoaderError, match=message) as info:
    list(device_batches(loader, num_classes=2, epoch=1, role="training"))
  assert isinstance(info.value.__cause__, IndexError)


def test_chunks_of_batches_give_the_same_batches_and_name_a_bad_batch_in_a_later_chunk(monkeypatch):
  monkeypatch.setattr(resident, "CHUNK", 3)
  rng = np.random.default_rng(2)
  x = torch.from_numpy(rng.normal(size=(29, 3)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, 4, 29))
  make = lambda: DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True,
                            generator=torch.Generator().manual_seed(9))
  got = _host(device_batches(make(), num_classes=4))
  want = _host(device_batches(_per_batch(make()), num_classes=4))
  assert len(got) == len(want) == 8
  for g, w in zip(got, want):
    for key in g:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)
  y_bad = y.clone()
  y_bad[25] = 9  # sample 25: batch 6 (0-based) in order, in the third chunk of 3
  loader = DataLoader(TensorDataset(x, y_bad), batch_size=4)
  with pytest.raises(DataError, match=r"^labels must be in \[0, 4\), got 9 in batch 6$"):
    list(device_batches(loader, num_classes=4))


def test_indexed_batches_materialize_to_the_dict_batches():
  rng = np.random.default_rng(5)
  x = torch.from_numpy(rng.normal(size=(21, 1, 3, 3)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, 3, 21))
  make = lambda: DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True,
                            generator=torch.Generator().manual_seed(1))
  indexed = list(device_batches(make(), num_classes=3, indexed=True))
  assert all(isinstance(b, IndexedBatch) for b in indexed)
  got = _host(materialize(b) for b in indexed)
  want = _host(device_batches(make(), num_classes=3))
  assert len(got) == len(want) == 6
  for g, w in zip(got, want):
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_loaders_that_are_not_resident_yield_dicts_even_when_indexed():
  loader = DataLoader(TensorDataset(torch.ones(6, 3), torch.zeros(6, dtype=torch.int64)),
                      batch_size=4)
  batches = list(device_batches(_per_batch(loader), num_classes=2, indexed=True))
  assert len(batches) == 2 and all(isinstance(b, dict) for b in batches)


def test_batch_rows_are_device_scalars_made_once():
  device = jax.devices()[0]
  rows = resident._row_ids(device)
  assert rows is resident._row_ids(device)
  assert [int(r) for r in rows] == list(range(resident.CHUNK))
  assert all(r.devices() == {device} and r.dtype == np.int32 for r in rows)


def test_every_array_of_a_resident_batch_is_committed_to_its_device():
  # As the trial's state is: a step sees one placement from its first batch on, and compiles once.
  x = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
  loader = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.int64)), batch_size=4)
  device = jax.devices()[0]
  for indexed in (True, False):
    for batch in device_batches(loader, num_classes=2, indexed=indexed):
      leaves = jax.tree.leaves(batch)
      assert all(leaf.committed and leaf.devices() == {device} for leaf in leaves), indexed
  one = jax.sharding.SingleDeviceSharding(device)  # a one-device sharding stays resident
  assert all(isinstance(b, IndexedBatch)
             for b in device_batches(loader, num_classes=2, sharding=one, indexed=True))


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_array_loader_s_own_passes_are_resident_and_equal_its_batches(shuffle):
  # The command line's loader of in-memory arrays serves its epochs' orders: a trial's own passes
  # gather its rows on the device (IndexedBatch), in the order iterating it yields, epoch by epoch.
  from orchard_jax.study.sources import ArrayLoader
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(21, 4, 3, 1)).astype(np.float32), rng.integers(0, 3, 21)
  loader, twin = (ArrayLoader(x, y, 8, shuffle=shuffle, seed=5) for _ in range(2))
  assert resident.fits(loader)
  for _ in range(2):
    indexed = list(device_batches(loader, num_classes=3, layout="NHWC", indexed=True))
    assert all(isinstance(b, IndexedBatch) for b in indexed)
    want = _host(device_batches(list(iter(twin)), num_classes=3, layout="NHWC"))
    got = _host(materialize(b) for b in indexed)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
      for key in w:
        np.testing.assert_array_equal(g[key], w[key], err_msg=key)
  assert loader.position == twin.position == (2 if shuffle else 0)
