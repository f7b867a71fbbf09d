"""Data sources: digits, MedMNIST-format .npz, a user function; the array loader."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback

import numpy as np
import pytest

from orchard_jax.study.checks import RecipeError
from orchard_jax.study.sections import DatasetSpec
from orchard_jax.study.sources import (ArrayLoader, digits_arrays, load_source, resolve_function,
                                       stratified_split)


def medmnist_arrays(n=(12, 6, 6), classes=3, rgb=False) -> dict:
  rng = np.random.default_rng(0)
  shape = (8, 8, 3) if rgb else (8, 8)
  arrays = {}
  for split, count in zip(("train", "val", "test"), n):
    arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    arrays[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8)[:, None]
  return arrays


def npz(tmp_path, **arrays) -> DatasetSpec:
  path = tmp_path / "data.npz"
  np.savez(path, **arrays)
  return DatasetSpec(source="npz", path=str(path))


def load(spec):
  return load_source(spec, batch_size=4, seed=0)


def test_shuffled_loader_repeats_its_epochs_for_the_same_seed_and_covers_every_sample():
  x, y = np.arange(10)[:, None], np.arange(10)
  loader = ArrayLoader(x, y, 4, shuffle=True, seed=3)
  epochs = [np.concatenate([b for _, b in loader]) for _ in range(2)]
  fresh = np.concatenate([b for _, b in ArrayLoader(x, y, 4, shuffle=True, seed=3)])
  np.testing.assert_array_equal(fresh, epochs[0])
  assert sorted(epochs[0]) == list(range(10)) and not np.array_equal(epochs[0], epochs[1])
  assert [len(b) for _, b in loader] == [4, 4, 2] and len(loader) == 3


def test_unshuffled_loader_keeps_the_order():
  x, y = np.arange(5)[:, None], np.arange(5)
  assert np.concatenate([b for _, b in ArrayLoader(x, y, 2, shuffle=False)]).tolist() == [0, 1, 2, 3, 4]


def test_digits_split_is_stratified_reproducible_and_scaled():
  source = load(DatasetSpec())
  sizes = {k: len(y) for k, (_, y) in source.splits.items()}
  assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == 270
  assert source.input_shape == (8, 8, 1) and source.num_classes == 10
  train_x = source.splits["train"][0]
  assert train_x.dtype == np.float32 and 0.0 <= train_x.min() and train_x.max() <= 1.0
  np.testing.assert_array_equal(load(DatasetSpec()).splits["val"][1], source.splits["val"][1])
  assert np.bincount(source.splits["val"][1]).min() >= 25


def test_npz_uint8_images_are_scaled_and_get_a_channel(tmp_path):
  source = load(npz(tmp_path, **medmnist_arrays()))
  x, y = source.splits["train"]
  assert source.input_shape == (8, 8, 1) and x.max() <= 1.0 and y.shape == (12,)
  assert source.num_classes == 3 and set(source.splits) == {"train", "val", "test"}


def test_npz_rgb_images_keep_their_channels(tmp_path):
  assert load(npz(tmp_path, **medmnist_arrays(rgb=True))).input_shape == (8, 8, 3)


def test_npz_without_test_split_is_accepted(tmp_path):
  arrays = {k: v for k, v in medmnist_arrays().items() if not k.startswith("test")}
  assert "test" not in load(npz(tmp_path, **arrays)).splits


def test_npz_missing_arrays_are_named(tmp_path):
  arrays = {k: v for k, v in medmnist_arrays().items() if not k.startswith("val")}
  with pytest.raises(RecipeError, match="lacks val_images, val_labels; a MedMNIST-format"):
    load(npz(tmp_path, **arrays))


def test_npz_with_one_test_array_is_refused(tmp_path):
  arrays = medmnist_arrays()
  del arrays["test_labels"]
  with pytest.raises(RecipeError, match="only one of test_images, test_labels"):
    load(npz(tmp_path, **arrays))


def test_missing_npz_file_is_reported(tmp_path):
  with pytest.raises(RecipeError, match="dataset.path: file not found"):
    load(DatasetSpec(source="npz", path=str(tmp_path / "none.npz")))


def test_multilabel_targets_are_refused(tmp_path):
  arrays = medmnist_arrays()
  arrays["train_labels"] = np.zeros((12, 4), np.uint8)
  with pytest.raises(RecipeError, match="multi-label targets are not supported"):
    load(npz(tmp_path, **arrays))


def test_splits_with_different_sample_shapes_are_refused(tmp_path):
  arrays = medmnist_arrays()
  arrays["val_images"] = np.zeros((6, 4, 4), np.uint8)
  with pytest.raises(RecipeError, match="per-sample shapes differ"):
    load(npz(tmp_path, **arrays))


def test_labels_beyond_num_classes_are_refused(tmp_path):
  spec = npz(tmp_path, **medmnist_arrays(classes=3))
  with pytest.raises(RecipeError, match="labels go up to 2, but dataset.num_classes is 2"):
    load(DatasetSpec(source="npz", path=spec.path, num_classes=2))


def write_module(tmp_path, body: str) -> str:
  path = tmp_path / "my_data.py"
  path.write_text("import numpy as np\n" + body)
  return str(path)


def test_function_source_reads_num_classes_and_the_nchw_input_shape(tmp_path):
  path = write_module(tmp_path, (
      "def loaders(batch_size, seed):\n"
      "  batch = (np.zeros((batch_size, 1, 6, 5), np.float32), np.zeros(batch_size, np.int64))\n"
      "  return {'train': [batch], 'val': [batch], 'num_classes': 4}\n"))
  source = load(DatasetSpec(source="function", function=f"{path}:loaders"))
  assert source.num_classes == 4 and source.input_shape == (6, 5, 1)
  assert source.loaders(4, 0) is source.loaders(4, 0) and source.loaders(4, 0).test is None


def test_function_that_raises_is_reported_in_one_line_with_its_file_and_line(tmp_path):
  path = write_module(tmp_path, "def loaders(batch_size, seed):\n  raise ValueError('no\\ndata')\n")
  with pytest.raises(RecipeError) as info:
    load(DatasetSpec(source="function", function=f"{path}:loaders", num_classes=2))
  assert str(info.value) == (f"dataset.function '{path}:loaders' raised ValueError: no data at "
                             f"{path}:3 in loaders")  # outside the working directory: in full
  # The user's exception, its traceback from the user's function on (what --debug prints).
  user = info.value.user_error
  assert isinstance(user, ValueError) and info.value.__cause__ is user
  assert [frame.f_code.co_name for frame, _ in traceback.walk_tb(user.__traceback__)] == [
      "loaders"]


def test_the_place_is_the_users_own_line_in_a_working_directory_module(tmp_path, monkeypatch):
  (tmp_path / "bug_data.py").write_text(
      "import json\n\n\ndef read(text):\n  return json.loads(text)\n\n\n"
      "def loaders(batch_size, seed):\n  rows = [{'image': 1}]\n"
      "  labels = [row['label'] for row in rows]\n  return labels, labels\n\n\n"
      "def settings(batch_size, seed):\n  return read('{')\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(RecipeError, match=r"^dataset.function 'bug_data:loaders' raised KeyError: "
                     r"'label' at bug_data.py:10 in (loaders|<listcomp>)$"):  # listcomp: Python < 3.12
    load(DatasetSpec(source="function", function="bug_data:loaders", num_classes=2))
  # Raised inside the standard library: the user's innermost line that led there.
  with pytest.raises(RecipeError, match=r"raised JSONDecodeError: .* at bug_data.py:5 in read$"):
    load(DatasetSpec(source="function", function="bug_data:settings", num_classes=2))


def test_a_loader_that_fails_on_its_first_batch_names_the_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = write_module(tmp_path, (
      "class Loader:\n  def __iter__(self):\n    yield self.batch\n"
      "def loaders(batch_size, seed):\n  return Loader(), Loader()\n"))
  with pytest.raises(RecipeError) as info:
    load(DatasetSpec(source="function", function=f"{path}:loaders", num_classes=2))
  assert str(info.value) == (f"dataset.function '{path}:loaders': reading a first batch failed: "
                             f"AttributeError: 'Loader' object has no attribute 'batch' at "
                             f"my_data.py:4 in __iter__")


@pytest.mark.parametrize("body, says", [
    ("x = 1\ny = 1 / 0\n", "ZeroDivisionError: division by zero at {path}:3 in <module>"),
    ("def f(:\n  pass\n", "at {path}:2"),
    ("import no_such_dependency_xyz\n",
     "ModuleNotFoundError: No module named 'no_such_dependency_xyz' at {path}:2 in <module>"),
])
def test_a_module_that_fails_to_import_names_its_line(tmp_path, monkeypatch, body, says):
  monkeypatch.chdir(tmp_path)
  path = write_module(tmp_path, body)
  with pytest.raises(RecipeError, match="cannot import") as info:
    load(DatasetSpec(source="function", function=f"{path}:loaders", num_classes=2))
  assert str(info.value).endswith(says.format(path="my_data.py"))
  assert "\n" not in str(info.value)


def test_missing_names_get_the_closest_suggested(tmp_path, monkeypatch):
  path = write_module(tmp_path, "def loaders(batch_size, seed):\n  return [], []\n")
  with pytest.raises(RecipeError, match=r"has no function 'loader' \(did you mean 'loaders'\?\)$"):
    load(DatasetSpec(source="function", function=f"{path}:loader", num_classes=2))
  with pytest.raises(RecipeError, match=r"file not found: .*my_dat.py \(did you mean "
                     r"'.*my_data.py'\?\)$"):
    load(DatasetSpec(source="function", function=f"{tmp_path / 'my_dat.py'}:loaders",
                     num_classes=2))
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(RecipeError, match=r"cannot import 'my_dta': ModuleNotFoundError: No module "
                     r"named 'my_dta' \(did you mean 'my_data'\?\)$"):
    load(DatasetSpec(source="function", function="my_dta:loaders", num_classes=2))


def test_a_file_is_executed_once_per_process(tmp_path):
  path = write_module(tmp_path, "runs = []\nruns.append(1)\n"
                                "def loaders(batch_size, seed):\n  return [], []\n")
  first = resolve_function(f"{path}:loaders")
  assert resolve_function(f"{path}:loaders") is first and first.__globals__["runs"] == [1]


def test_function_without_num_classes_is_refused(tmp_path):
  path = write_module(tmp_path, "def loaders(batch_size, seed):\n  return [], []\n")
  with pytest.raises(RecipeError, match="dataset.num_classes is required"):
    load(DatasetSpec(source="function", function=f"{path}:loaders"))


def test_function_module_that_cannot_be_imported_is_reported():
  with pytest.raises(RecipeError, match="cannot import 'no_such_module_xyz'"):
    load(DatasetSpec(source="function", function="no_such_module_xyz:loaders", num_classes=2))


def test_missing_function_in_module_is_reported(tmp_path):
  path = write_module(tmp_path, "x = 1\n")
  with pytest.raises(RecipeError, match="has no function 'loaders'"):
    load(DatasetSpec(source="function", function=f"{path}:loaders", num_classes=2))


def test_the_digits_are_scikit_learns_read_without_importing_it():
  from sklearn.datasets import load_digits
  images, labels = digits_arrays()
  want_images, want_labels = load_digits(return_X_y=True)
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)
  code = ("import sys; from orchard_jax.study.recipe import DatasetSpec; "
          "from orchard_jax.study.sources import load_source; "
          "load_source(DatasetSpec(), batch_size=32, seed=0); "
          "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_the_stratified_split_picks_the_indices_of_scikit_learns_train_test_split():
  from sklearn.model_selection import train_test_split
  _, digits = digits_arrays()
  rng = np.random.default_rng(0)
  uneven = np.repeat(np.arange(5), [5, 5, 3, 7, 2])  # ties in the remainders
  cases = [(digits, 0.15), (digits[:1527], 0.15 / 0.85), (digits, 0.3), (digits, 0.5),
           (uneven, 0.5), (uneven, 0.33), (rng.permutation(uneven), 0.45),
           (rng.integers(0, 3, 101), 0.2)]
  for labels, fraction in cases:
    for seed in (0, 1, 42):
      want_train, want_test = train_test_split(np.arange(len(labels)), test_size=fraction,
                                               stratify=labels, random_state=seed)
      train, test = stratified_split(labels, fraction, seed)
      np.testing.assert_array_equal(train, want_train)
      np.testing.assert_array_equal(test, want_test)


def test_a_split_that_cannot_be_stratified_is_a_recipe_error():
  with pytest.raises(RecipeError, match="every class at least twice"):
    stratified_split(np.array([0, 0, 1, 1, 2]), 0.5, 0)
  with pytest.raises(RecipeError, match="at least one sample per class"):
    stratified_split(np.repeat(np.arange(10), 10), 0.05, 0)
