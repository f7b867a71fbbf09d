"""Data sources of recipes; none needs a network.

* ``source: digits`` (default): scikit-learn's bundled handwritten digits
  (1797 images of 8x8 px, 10 classes), pixels scaled to [0, 1], split
  stratified into train/val/test by ``val_fraction``/``test_fraction``.
* ``source: npz``: a MedMNIST-format file (``path``) with ``train_images``,
  ``train_labels``, ``val_images``, ``val_labels`` and, optionally,
  ``test_images``/``test_labels``. Images are ``[N, H, W]``, ``[N, H, W, C]``
  (channels last) or feature rows ``[N, F]``; ``uint8`` pixels are scaled to
  [0, 1], floats are kept. Labels are class ids ``[N]`` or ``[N, 1]``.
* ``source: function``: ``function: 'module:function'`` (the module is
  imported with the working directory on ``sys.path``) or
  ``'path/file.py:function'``, called as ``fn(batch_size=..., seed=...)`` and
  returning ``(train, val)``, ``(train, val, test)`` or a mapping with keys
  ``train``, ``val`` and optionally ``test`` and ``num_classes``; each loader
  yields ``(inputs, labels)`` batches (e.g. a torch DataLoader). It is called
  once per batch size a study tries.

Every problem found while loading (missing file, missing arrays, shapes that
disagree, a function that cannot be imported or raises) is a
:class:`~orchard_jax.study.checks.RecipeError`, raised before any training.
A missing module, file or function gets the closest existing name suggested.
An error raised in the user's code (importing the module, calling the
function, reading a first batch) ends with where it was raised, e.g.
``dataset.function 'bug_data:loaders' raised KeyError: 'label' at
bug_data.py:12 in loaders``; the exception itself, with its traceback from
the user's function on, is the error's ``user_error`` (and ``__cause__``),
which ``orchard-jax ... --debug`` prints. Functions are found by
:func:`orchard_jax.study.functions.resolve_function`, which also finds the
model functions of ``architecture.function`` (:mod:`orchard_jax.study.build`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from orchard_jax.study.checks import RecipeError, brief, clip, user_code_error
from orchard_jax.study.functions import _shown, one_line, resolve_function

__all__ = ["ArrayLoader", "ArraySource", "FunctionSource", "Loaders", "load_source"]

REQUIRED = ("train_images", "train_labels", "val_images", "val_labels")
OPTIONAL = ("test_images", "test_labels")


class Loaders(NamedTuple):
  train: Any
  val: Any
  test: Any | None


class ArrayLoader:
  """``(images, labels)`` numpy batches of in-memory arrays.

  With ``shuffle`` every pass draws a new order from ``(seed, pass index)``,
  so a fresh loader with the same seed repeats the same sequence of epochs.
  A cohort's members each read their own pass of it (``resident_arrays``,
  ``position``, ``epoch_indices``: see :mod:`orchard_jax.data.resident`).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *,
               shuffle: bool, seed: int = 0):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    self.images, self.labels, self.batch_size = images, labels, batch_size
    self.shuffle, self.seed, self._passes = shuffle, seed, 0

  def __len__(self) -> int:
    return math.ceil(len(self.labels) / self.batch_size)

  def data_identity(self) -> tuple:
    """The arrays it reads and how: a study's trials with equal ones share a cohort."""
    return id(self.images), id(self.labels), self.batch_size, self.shuffle, self.seed

  def resident_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """The arrays its batches are rows of."""
    return self.images, self.labels

  @property
  def position(self) -> int:
    """The passes its shuffling has drawn (the next pass's index)."""
    return self._passes

  @position.setter
  def position(self, passes: int) -> None:
    self._passes = passes

  def _next_order(self) -> np.ndarray | None:
    """The next pass's order (None: in order), drawn as ``iter`` draws it."""
    if not self.shuffle:
      return None
    order = np.random.default_rng((self.seed, self._passes)).permutation(len(self.labels))
    self._passes += 1
    return order

  def epoch_indices(self) -> list[np.ndarray]:
    """The rows of each batch the next pass (``iter``) yields; the position advances as there."""
    n, order = len(self.labels), self._next_order()
    order = np.arange(n) if order is None else order
    return [order[start:start + self.batch_size] for start in range(0, n, self.batch_size)]

  def __iter__(self):
    n = len(self.labels)
    order = self._next_order()
    for start in range(0, n, self.batch_size):
      if order is None:
        yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
      else:
        index = order[start:start + self.batch_size]
        yield self.images[index], self.labels[index]


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """In-memory splits ``{'train'|'val'|'test': (images, labels)}`` (channels last)."""
  name: str
  splits: Mapping[str, tuple[np.ndarray, np.ndarray]]
  num_classes: int
  eval_batch_size: int = 256
  layout: str = "NHWC"

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.splits["train"][0].shape[1:])

  @property
  def train_labels(self) -> np.ndarray:
    return self.splits["train"][1]

  def loaders(self, batch_size: int, seed: int) -> Loaders:
    """Fresh loaders: training shuffled with ``seed``, the others in order."""
    def evaluation(split: str) -> ArrayLoader | None:
      return ArrayLoader(*self.splits[split], self.eval_batch_size, shuffle=False) \
          if split in self.splits else None
    return Loaders(ArrayLoader(*self.splits["train"], batch_size, shuffle=True, seed=seed),
                   evaluation("val"), evaluation("test"))


def _images(name: str, images: np.ndarray) -> np.ndarray:
  if images.dtype.kind not in "biuf":
    raise RecipeError(f"dataset: {name} must be numeric, got dtype {images.dtype}")
  if images.ndim not in (2, 3, 4) or len(images) == 0:
    raise RecipeError(f"dataset: {name} must have shape [N, H, W], [N, H, W, C] or [N, F] "
                      f"with N > 0, got {images.shape}")
  scaled = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
  return scaled[..., None] if images.ndim == 3 else scaled


def _labels(name: str, labels: np.ndarray, n: int) -> np.ndarray:
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.dtype.kind not in "iu" or labels.ndim != 1:
    raise RecipeError(f"dataset: {name} must be integer class ids of shape [N] or [N, 1] "
                      f"(multi-label targets are not supported), got dtype {labels.dtype}, "
                      f"shape {labels.shape}")
  if len(labels) != n:
    raise RecipeError(f"dataset: {name} has {len(labels)} labels for {n} images")
  if labels.size and labels.min() < 0:
    raise RecipeError(f"dataset: {name} has negative class ids ({labels.min()})")
  return labels.astype(np.int32)


def array_source(name: str, arrays: Mapping[str, np.ndarray], num_classes: int | None,
                 eval_batch_size: int) -> ArraySource:
  """Checks and converts ``{split}_images``/``{split}_labels`` arrays into a source."""
  splits = {}
  for split in ("train", "val", "test"):
    if f"{split}_images" not in arrays:
      continue
    images = _images(f"{split}_images", np.asarray(arrays[f"{split}_images"]))
    splits[split] = (images, _labels(f"{split}_labels", np.asarray(arrays[f"{split}_labels"]),
                                     len(images)))
  shapes = {split: x.shape[1:] for split, (x, _) in splits.items()}
  if len(set(shapes.values())) > 1:
    raise RecipeError(f"dataset: the splits' per-sample shapes differ: {shapes}")
  top = max(int(y.max()) for _, y in splits.values()) + 1
  if num_classes is None:
    num_classes = top
  elif top > num_classes:
    raise RecipeError(f"dataset: labels go up to {top - 1}, but dataset.num_classes is "
                      f"{num_classes} (class ids must be < num_classes); set "
                      f"dataset.num_classes: {top} or null")
  if num_classes < 2:
    raise RecipeError(f"dataset: at least 2 classes are needed, the labels have {num_classes}")
  return ArraySource(name, splits, num_classes, eval_batch_size)


def _approximate_mode(class_counts: np.ndarray, n_draws: int,
                      rng: np.random.RandomState) -> np.ndarray:
  """Samples per class of a stratified draw: scikit-learn's ``_approximate_mode``."""
  continuous = class_counts / class_counts.sum() * n_draws
  floored = np.floor(continuous)
  need_to_add = int(n_draws - floored.sum())
  if need_to_add > 0:
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:  # largest remainders first, ties by rng
      (indices,) = np.where(remainder == value)
      add_now = min(len(indices), need_to_add)
      floored[rng.choice(indices, size=add_now, replace=False)] += 1
      need_to_add -= add_now
      if need_to_add == 0:
        break
  return floored.astype(int)


def stratified_split(labels: np.ndarray, test_size: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(train, test)`` indices of a stratified shuffled split of ``labels``.

  The indices ``sklearn.model_selection.train_test_split(..., test_size=test_size,
  stratify=labels, random_state=seed)`` picks (scikit-learn's
  ``StratifiedShuffleSplit`` algorithm, BSD-3-Clause), re-implemented so that
  loading the digits does not import scikit-learn and SciPy: about 1.7 s that
  the command spends instead while its first programs compile
  (:mod:`orchard_jax.study.ahead`). ``tests/study/test_sources.py`` checks it
  against scikit-learn.
  """
  n_test = math.ceil(test_size * len(labels))
  n_train = len(labels) - n_test
  classes, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
  if class_counts.min() < 2 or min(n_train, n_test) < len(classes):
    raise RecipeError(f"dataset: a stratified split of {len(labels)} samples of {len(classes)} "
                      f"classes into {n_train} and {n_test} needs every class at least twice and "
                      f"both parts at least one sample per class")
  class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
  rng = np.random.RandomState(seed)
  n_i = _approximate_mode(class_counts, n_train, rng)
  t_i = _approximate_mode(class_counts - n_i, n_test, rng)
  train, test = [], []
  for i in range(len(classes)):
    shuffled = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
    train.extend(shuffled[:n_i[i]])
    test.extend(shuffled[n_i[i]:n_i[i] + t_i[i]])
  return rng.permutation(train), rng.permutation(test)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """``sklearn.datasets.load_digits(return_X_y=True)``, read from scikit-learn's data file.

  The file ships with scikit-learn; reading it does not import the package.
  """
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise RecipeError("dataset: the digits source reads scikit-learn's bundled data; "
                      "pip install scikit-learn")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
  data = np.loadtxt(path, delimiter=",")
  return data[:, :-1], data[:, -1].astype(int)


def _digits(spec: Any) -> ArraySource:
  images, labels = digits_arrays()
  classes = len(np.unique(labels))
  if spec.num_classes is not None and spec.num_classes != classes:
    raise RecipeError(f"dataset.num_classes must be {classes} or null with dataset.source 'digits' "
                      f"(the bundled digits have {classes} classes), got {brief(spec.num_classes)}")
  images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8)
  rest, test = stratified_split(labels, spec.test_fraction, spec.split_seed)
  rest_x, x_test, rest_y, y_test = images[rest], images[test], labels[rest], labels[test]
  train, val = stratified_split(rest_y, spec.val_fraction / (1 - spec.test_fraction),
                                spec.split_seed)
  x_train, x_val, y_train, y_val = rest_x[train], rest_x[val], rest_y[train], rest_y[val]
  arrays = {"train_images": x_train, "train_labels": y_train, "val_images": x_val,
            "val_labels": y_val, "test_images": x_test, "test_labels": y_test}
  return array_source("digits", arrays, spec.num_classes, spec.eval_batch_size)


def _npz(spec: Any) -> ArraySource:
  path = os.path.expanduser(spec.path)
  if not os.path.isfile(path):
    raise RecipeError(f"dataset.path: file not found: {clip(spec.path, 200)}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      missing = [k for k in REQUIRED if k not in npz.files]
      if missing:
        raise RecipeError(
            f"dataset.path: {clip(spec.path, 200)} lacks {', '.join(missing)}; a MedMNIST-format "
            f".npz has {', '.join(REQUIRED)} (and optionally {', '.join(OPTIONAL)})")
      if sum(k in npz.files for k in OPTIONAL) == 1:
        raise RecipeError(f"dataset.path: {clip(spec.path, 200)} has only one of "
                          f"{', '.join(OPTIONAL)}; give both or neither")
      arrays = {k: npz[k] for k in (*REQUIRED, *OPTIONAL) if k in npz.files}
  except RecipeError:
    raise
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise RecipeError(f"dataset.path: {clip(spec.path, 200)} is not a readable .npz file "
                      f"({one_line(e)})") from None
  name = os.path.splitext(os.path.basename(path))[0]
  return array_source(name, arrays, spec.num_classes, spec.eval_batch_size)


# ---------------------------------------------------------------- function --


class FunctionSource:
  """Loaders from a user function, called once per (batch size, seed)."""

  layout: str
  train_labels = None

  def __init__(self, spec: Any, fn: Callable[..., Any]):
    self.entry, self.fn, self.layout = spec.function, fn, spec.layout
    self.name = spec.function
    self._given_classes = spec.num_classes
    self._cache: dict[tuple[int, int], Loaders] = {}
    self.num_classes: int = 0
    self.input_shape: tuple[int, ...] = ()

  def loaders(self, batch_size: int, seed: int) -> Loaders:
    key = (batch_size, seed)
    if key not in self._cache:
      self._cache[key] = self._call(batch_size, seed)
    return self._cache[key]

  def _call(self, batch_size: int, seed: int) -> Loaders:
    where = f"dataset.function {_shown(self.entry)}"
    try:
      out = self.fn(batch_size=batch_size, seed=seed)
    except Exception as e:  # the user's code
      raise user_code_error(f"{where} raised {one_line(e)}", e, e.__traceback__.tb_next) from e
    classes = None
    if isinstance(out, Mapping):
      unknown = set(out) - {"train", "val", "test", "num_classes"}
      if unknown or "train" not in out or "val" not in out:
        raise RecipeError(f"{where} returned a mapping with keys {sorted(out)}; expected train, "
                          f"val and optionally test, num_classes")
      loaders, classes = Loaders(out["train"], out["val"], out.get("test")), out.get("num_classes")
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
      loaders = Loaders(*out, *([None] * (3 - len(out))))
    else:
      raise RecipeError(f"{where} must return (train, val), (train, val, test) or a mapping, "
                        f"got {type(out).__name__}")
    for split, loader in zip(Loaders._fields, loaders):
      if loader is not None and not hasattr(loader, "__iter__"):
        raise RecipeError(f"{where} returned a {split} loader that is not iterable "
                          f"({type(loader).__name__})")
    self._set_classes(where, classes)
    return loaders

  def _set_classes(self, where: str, classes: Any) -> None:
    given = self._given_classes
    if classes is not None and given is not None and classes != given:
      raise RecipeError(f"{where} returned num_classes={brief(classes)}, but dataset.num_classes "
                        f"is {given}")
    chosen = classes if classes is not None else given
    if chosen is None:
      raise RecipeError("dataset.num_classes is required with a function source (or return "
                        "it as the mapping's 'num_classes')")
    if isinstance(chosen, bool) or not isinstance(chosen, int) or chosen < 2:
      raise RecipeError(f"{where}: num_classes must be an integer >= 2, got {brief(chosen)}")
    self.num_classes = chosen

  def peek(self, batch_size: int, seed: int) -> None:
    """Calls the function once and reads one batch, to learn the input shape."""
    loaders = self.loaders(batch_size, seed)
    try:
      inputs, _ = next(iter(loaders.train))
      shape = tuple(np.shape(inputs)[1:])
    except StopIteration:
      raise RecipeError(f"dataset.function {_shown(self.entry)}: the train loader yielded no "
                        f"batch") from None
    except Exception as e:  # the user's loader
      raise user_code_error(f"dataset.function {_shown(self.entry)}: reading a first batch "
                            f"failed: {one_line(e)}", e, e.__traceback__.tb_next) from e
    if len(shape) == 3 and self.layout == "NCHW":
      shape = (shape[1], shape[2], shape[0])
    elif len(shape) == 2:
      shape = (*shape, 1)
    self.input_shape = shape


def load_source(spec: Any, *, batch_size: int, seed: int) -> ArraySource | FunctionSource:
  """The :class:`DatasetSpec`'s source, loaded and checked (function: called once)."""
  if spec.source == "digits":
    return _digits(spec)
  if spec.source == "npz":
    return _npz(spec)
  source = FunctionSource(spec, resolve_function(spec.function))
  source.peek(batch_size, seed)
  return source
