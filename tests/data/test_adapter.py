"""device_batches / make_loader: layout, padding, checks, prefetch thread, workers."""

import contextlib
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from orchard_jax.data import adapter, device_batches, make_loader
from orchard_jax.errors import DataError, LoaderError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _collect(loader, **kw):
  kw.setdefault("num_classes", 3)
  return [jax.device_get(b) for b in device_batches(loader, **kw)]


def _tensor_loader(n=10, shape=(3, 4, 5), batch_size=4, num_classes=3, dtype=torch.float32, **kw):
  x = torch.arange(n * int(np.prod(shape)), dtype=torch.float32).reshape(n, *shape).to(dtype)
  y = torch.arange(n) % num_classes
  return x, y, DataLoader(TensorDataset(x, y), batch_size=batch_size, **kw)


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == adapter.THREAD_NAME]


def _wait_for_no_prefetch_thread(timeout=2.0):
  deadline = time.monotonic() + timeout
  while _prefetch_threads() and time.monotonic() < deadline:
    time.sleep(0.01)
  return _prefetch_threads()


# ----------------------------------------------------------------- layout / dtype
def test_nchw_inputs_become_nhwc_with_the_same_values():
  x, y, loader = _tensor_loader(n=8, shape=(3, 4, 5))
  batches = _collect(loader)
  image = np.concatenate([b["image"] for b in batches])
  assert image.shape == (8, 4, 5, 3)
  np.testing.assert_array_equal(image, x.permute(0, 2, 3, 1).numpy())


def test_nhwc_layout_leaves_4d_inputs_unchanged():
  x, _, loader = _tensor_loader(n=4, shape=(4, 5, 3))
  (batch,) = _collect(loader, layout="NHWC")
  np.testing.assert_array_equal(batch["image"], x.numpy())


def test_3d_inputs_get_a_trailing_channel_axis():
  x, _, loader = _tensor_loader(n=4, shape=(6, 7))
  (batch,) = _collect(loader)
  assert batch["image"].shape == (4, 6, 7, 1)
  np.testing.assert_array_equal(batch["image"][..., 0], x.numpy())


def test_2d_feature_inputs_keep_their_shape():
  x, _, loader = _tensor_loader(n=4, shape=(9,))
  (batch,) = _collect(loader)
  np.testing.assert_array_equal(batch["image"], x.numpy())


def test_uint8_images_are_cast_to_float32_without_rescaling():
  x = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)  # [1, 1, 1, 3] NCHW
  (batch,) = _collect([(x, torch.tensor([1]))])
  assert batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["image"].reshape(-1), [0.0, 128.0, 255.0])


def test_batch_dtypes_and_device_arrays():
  _, _, loader = _tensor_loader(n=4, shape=(2,), dtype=torch.float64)
  batch = next(iter(device_batches(loader, num_classes=3)))
  assert all(isinstance(v, jax.Array) for v in batch.values())
  assert (batch["image"].dtype, batch["label"].dtype, batch["mask"].dtype) == (
      np.float32, np.int32, np.bool_)


@pytest.mark.parametrize("where", ["default", "device", "sharding"])
def test_every_array_of_a_batch_is_committed_to_its_device(where):
  # As the trial's state is: a step sees one placement from its first batch on, and compiles once.
  device = jax.devices()[0]
  sharding = {"default": None, "device": device,
              "sharding": jax.sharding.SingleDeviceSharding(device)}[where]
  pairs = [(np.zeros((4, 2), np.float32), np.zeros(4, np.int64))] * 2  # the prefetch thread's path
  for batch in device_batches(pairs, num_classes=3, sharding=sharding):
    assert all(v.committed and v.devices() == {device} for v in batch.values()), where


def test_cpu_tensors_are_read_without_a_copy():
  t = torch.ones(4, 3)
  assert np.shares_memory(adapter._to_numpy(t, "inputs", "batch 0"), t.numpy())


# ----------------------------------------------------------------- labels
def test_labels_with_a_trailing_singleton_axis_are_squeezed():
  x = torch.zeros(4, 2)
  (batch,) = _collect([(x, torch.tensor([[2], [0], [1], [2]]))])
  np.testing.assert_array_equal(batch["label"], [2, 0, 1, 2])
  assert batch["label"].dtype == np.int32


def test_one_hot_labels_raise_data_error():
  one_hot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3)
  with pytest.raises(DataError, match=r"shape \[B\] or \[B, 1\].*one-hot"):
    _collect([(torch.zeros(4, 2), one_hot)])


def test_label_out_of_range_names_the_values_batch_epoch_and_range():
  good = (np.zeros((2, 3), np.float32), np.array([0, 1]))
  bad = (np.zeros((2, 3), np.float32), np.array([5, 1]))
  with pytest.raises(DataError,
                     match=r"^labels must be in \[0, 3\), got 5 in batch 1 \(epoch 7\)$"):
    _collect([good, bad], epoch=7)


def test_bad_labels_are_a_data_error_that_names_the_loader_s_role():
  bad = (np.zeros((2, 3), np.float32), np.array([12, 1]))
  with pytest.raises(DataError, match=r"^validation labels must be in \[0, 10\), got 12 in batch 0 "
                                      r"\(epoch 2\)$") as info:
    _collect([bad], num_classes=10, epoch=2, role="validation")
  assert not isinstance(info.value, (ValueError, RuntimeError))  # no fallback may catch it


def test_negative_label_raises_data_error():
  with pytest.raises(DataError, match=r"must be in \[0, 3\), got -1 in batch 0$"):
    _collect([(np.zeros((2, 3), np.float32), np.array([0, -1]))])


def test_float_labels_raise_data_error():
  with pytest.raises(DataError, match="^training labels must be integer class ids, got dtype "
                                      "float32 in batch 0$"):
    _collect([(np.zeros((2, 3), np.float32), np.array([0.0, 1.0], np.float32))], role="training")


def test_string_labels_raise_data_error():
  with pytest.raises(DataError, match="must be integer class ids"):
    _collect([(np.zeros((2, 3), np.float32), ["cat", "dog"])])


def test_object_inputs_raise_data_error():
  inputs = np.array([{"a": 1}, {"b": 2}], dtype=object)
  with pytest.raises(DataError, match="^inputs must be numeric, got dtype object in batch 0$"):
    _collect([(inputs, np.array([0, 1]))])


def test_label_count_different_from_input_count_raises():
  with pytest.raises(DataError, match="batch has 3 inputs but 2 labels in batch 0"):
    _collect([(np.zeros((3, 2), np.float32), np.array([0, 1]))])


# ----------------------------------------------------------------- padding / batch size
def test_last_batch_is_padded_and_masked():
  x, _, loader = _tensor_loader(n=10, shape=(2,), batch_size=4)
  batches = _collect(loader)
  assert [b["image"].shape for b in batches] == [(4, 2)] * 3
  last = batches[-1]
  np.testing.assert_array_equal(last["mask"], [True, True, False, False])
  np.testing.assert_array_equal(last["image"][:2], x[8:].numpy())
  np.testing.assert_array_equal(last["image"][2:], 0.0)
  np.testing.assert_array_equal(last["label"][2:], 0)
  assert all(b["mask"].all() for b in batches[:-1])


def test_every_sample_is_seen_exactly_once_with_shuffling():
  x = torch.arange(23, dtype=torch.float32)[:, None]
  loader = make_loader(TensorDataset(x, torch.zeros(23, dtype=torch.long)), 5, shuffle=True, seed=3)
  seen = np.concatenate([b["image"][b["mask"], 0] for b in _collect(loader)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(23))
  assert not np.array_equal(seen, np.arange(23))  # it was shuffled


def test_full_batch_size_comes_from_the_dataloader_when_the_first_batch_is_short():
  _, _, loader = _tensor_loader(n=3, shape=(2,), batch_size=8)
  (batch,) = _collect(loader)
  assert batch["image"].shape == (8, 2)
  assert batch["mask"].sum() == 3


def test_full_batch_size_comes_from_the_first_batch_of_a_plain_iterable():
  batches = [(np.ones((4, 2)), np.zeros(4, np.int64)), (np.ones((1, 2)), np.zeros(1, np.int64))]
  out = _collect(batches)
  assert [b["image"].shape for b in out] == [(4, 2), (4, 2)]
  np.testing.assert_array_equal(out[1]["mask"], [True, False, False, False])


def test_batch_longer_than_the_full_batch_size_raises():
  batches = [(np.ones((2, 2)), np.zeros(2, np.int64)), (np.ones((3, 2)), np.zeros(3, np.int64))]
  with pytest.raises(DataError, match="batch has 3 samples in batch 1, more than the full batch "
                                     "size B=2"):
    _collect(batches)


def test_changed_per_sample_shape_raises():
  batches = [(np.ones((2, 3, 4, 4)), np.zeros(2, np.int64)),
             (np.ones((2, 3, 8, 8)), np.zeros(2, np.int64))]
  with pytest.raises(DataError, match=r"inputs have per-sample shape \(3, 8, 8\) in batch 1, but "
                                      r"the first batch's was \(3, 4, 4\)"):
    _collect(batches)


def test_numpy_and_list_batches_match_the_torch_loader():
  x, y, loader = _tensor_loader(n=6, shape=(3, 2, 2), batch_size=4)
  from_torch = _collect(loader)
  from_numpy = _collect([[x[:4].numpy(), y[:4].numpy()], (x[4:].numpy(), y[4:].tolist())])
  for a, b in zip(from_torch, from_numpy, strict=True):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[key], b[key])


def test_a_batch_that_is_not_a_pair_raises_data_error():
  with pytest.raises(DataError, match=r"batches must be \(inputs, labels\) pairs, got tuple of "
                                      r"length 3 in batch 0"):
    _collect([(np.ones((2, 2)), np.zeros(2, np.int64), "extra")])


# ----------------------------------------------------------------- loader errors
class _LoaderError(Exception):
  pass


def _failing_loader(fail_at):
  for i in range(10):
    if i == fail_at:
      raise _LoaderError("disk on fire")
    yield np.full((2, 2), i, np.float32), np.zeros(2, np.int64)


def test_loader_error_is_a_data_error_naming_its_type_batch_and_epoch_chained_to_it():
  received = []
  with pytest.raises(LoaderError, match=r"^validation loader raised _LoaderError: disk on fire "
                                        r"while reading batch 3 \(epoch 2\)$") as info:
    for batch in device_batches(_failing_loader(3), num_classes=3, epoch=2, role="validation"):
      received.append(float(batch["image"][0, 0]))
  assert received == [0.0, 1.0, 2.0]
  assert isinstance(info.value, DataError)
  assert type(info.value.__cause__) is _LoaderError and str(info.value.__cause__) == "disk on fire"


class _NoIter:
  def __iter__(self):
    raise RuntimeError("no data today")


def test_a_loader_whose_iter_raises_is_a_loader_error():
  with pytest.raises(LoaderError, match=r"^the loader raised RuntimeError: no data today while "
                                        r"reading batch 0$"):
    _collect(_NoIter())


def test_keyboard_interrupt_in_a_loader_passes_unchanged():
  def interrupted():
    yield np.zeros((2, 2), np.float32), np.zeros(2, np.int64)
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    _collect(interrupted())


class _BrokenDataset(Dataset):

  def __len__(self):
    return 8

  def __getitem__(self, i):
    if i == 5:
      raise KeyError(f"no sample {i}")
    return torch.zeros(2), 0


def test_dataset_error_inside_a_dataloader_is_a_loader_error_with_the_original_message():
  with pytest.raises(LoaderError, match=r"^the loader raised KeyError: 'no sample 5' while reading "
                                        r"batch 1$") as info:
    _collect(DataLoader(_BrokenDataset(), batch_size=4))
  assert isinstance(info.value.__cause__, KeyError)


# ----------------------------------------------------------------- prefetch thread
def _endless_loader(reads):
  while True:
    reads.append(1)
    yield np.zeros((2, 2), np.float32), np.zeros(2, np.int64)


def test_prefetch_thread_stops_when_the_consumer_closes_early():
  batches = device_batches(_endless_loader([]), num_classes=3)
  next(batches)
  next(batches)
  assert len(_prefetch_threads()) == 1
  batches.close()
  assert not _prefetch_threads()


def test_prefetch_thread_stops_when_the_consumer_raises():
  with pytest.raises(ZeroDivisionError):
    with contextlib.closing(device_batches(_endless_loader([]), num_classes=3)) as batches:
      for _ in batches:
        1 / 0  # pylint: disable=pointless-statement
  assert not _prefetch_threads()


def test_prefetch_thread_ends_after_an_error_reaches_the_consumer():
  with pytest.raises(LoaderError):
    _collect(_failing_loader(1))
  assert not _wait_for_no_prefetch_thread()


def test_prefetch_queue_is_bounded():
  reads = []
  batches = device_batches(_endless_loader(reads), num_classes=3, prefetch=2)
  next(batches)
  time.sleep(0.3)
  # 1 consumed + 2 queued + 1 converted and waiting to be queued.
  assert len(reads) == 4
  batches.close()


def test_bad_arguments_raise_value_error_at_call_time():
  with pytest.raises(ValueError, match=r"layout must be one of \('NCHW', 'NHWC'\), got layout='CHW'"):
    device_batches([], num_classes=3, layout="CHW")
  with pytest.raises(ValueError, match="prefetch must be an int >= 1, got prefetch=0"):
    device_batches([], num_classes=3, prefetch=0)
  with pytest.raises(ValueError, match="num_classes must be an int >= 1, got num_classes=0"):
    device_batches([], num_classes=0)
  with pytest.raises(ValueError, match=r"role must be one of \(None, 'training', 'validation'\), "
                                       r"got role='test'"):
    device_batches([], num_classes=3, role="test")
  with pytest.raises(ValueError, match="sharding must be None, a jax.Device or a "
                                       "jax.sharding.Sharding, got sharding='cpu'"):
    device_batches([], num_classes=3, sharding="cpu")


def test_empty_loader_yields_nothing():
  assert _collect([]) == []


# ----------------------------------------------------------------- workers
def test_forking_workers_raise_value_error_that_says_how_to_fix_it(monkeypatch):
  monkeypatch.setattr(adapter, "_default_start_method", lambda: "fork")
  _, _, loader = _tensor_loader(num_workers=2)
  with pytest.raises(ValueError, match=r'multiprocessing_context="spawn" \(or "forkserver"\).*'
                                       r"num_workers=0"):
    device_batches(loader, num_classes=3)


def test_workers_with_an_explicit_context_pass_the_fork_check(monkeypatch):
  monkeypatch.setattr(adapter, "_default_start_method", lambda: "fork")
  _, _, loader = _tensor_loader(num_workers=2, multiprocessing_context="forkserver")
  device_batches(loader, num_classes=3).close()  # does not raise


def test_workers_pass_the_fork_check_where_the_default_is_spawn(monkeypatch):
  monkeypatch.setattr(adapter, "_default_start_method", lambda: "spawn")
  _, _, loader = _tensor_loader(num_workers=2)
  device_batches(loader, num_classes=3).close()  # does not raise


def test_make_loader_spawns_workers_and_seeds_the_shuffle():
  dataset = TensorDataset(torch.arange(50), torch.zeros(50, dtype=torch.long))
  order = lambda seed: torch.cat([x for x, _ in make_loader(dataset, 7, shuffle=True, seed=seed)])
  assert torch.equal(order(1), order(1))
  assert not torch.equal(order(1), order(2))
  loader = make_loader(dataset, 7, shuffle=False, num_workers=2)
  assert loader.multiprocessing_context.get_start_method() == "spawn"


_SPAWN_SCRIPT = textwrap.dedent("""
    def main():
      import jax.numpy as jnp
      import numpy as np
      import torch
      from orchard_jax.data import device_batches, make_loader
      jnp.ones(3).block_until_ready()  # JAX and its threads are up before the workers start
      dataset = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None], torch.arange(10) % 3)
      loader = make_loader(dataset, 4, shuffle=True, num_workers=2, seed=0)
      seen = []
      for batch in device_batches(loader, num_classes=3, epoch=1):
        seen += np.asarray(batch["image"])[np.asarray(batch["mask"]), 0].tolist()
      print(sorted(seen))

    if __name__ == "__main__":
      main()
""")


def test_spawn_workers_finish_an_epoch_under_jax_without_deadlock(tmp_path):
  script = tmp_path / "spawn_epoch.py"
  script.write_text(_SPAWN_SCRIPT)
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str([float(i) for i in range(10)])
