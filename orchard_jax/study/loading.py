"""``orchard_jax.load_model``: a trained model from its run folder, in one line.

::

  model = orchard_jax.load_model("outputs/digits_mini_cnn")    # a study's best trial
  probs = model.predict(images_NxHxWxC)                         # [N, num_classes]

What it finds in the folder it is given:

=================================  ===========================================================
``best_model/``                    a study's outputs (``orchard-jax run``, or a Python study's
                                   :func:`~orchard_jax.write_outputs` / ``StudyOutputs``): the
                                   best trial's checkpoint
``fit/``                           a single training run (``orchard-jax run`` of a recipe
                                   without ``optuna:``, its ``retrain/`` and ``final/``
                                   folders, or :func:`~orchard_jax.fit` with ``output_dir``)
``checkpoint/``                    the folder of one best state itself (``trials/trial_3``,
                                   ``best_model``, ``fit``)
=================================  ===========================================================

The model is rebuilt from ``model.json`` beside the checkpoint
(:mod:`orchard_jax.engine.inference`), which the command line writes with the
architecture of the recipe (a registry model, or ``architecture.function``,
found again relative to the file). A Python study's ``model.json`` holds the
model's ``repr`` (what :func:`~orchard_jax.run_trial` recorded): a built-in
model of :mod:`orchard_jax.models` is rebuilt from its fields there
(:func:`builtin_from_repr`); :func:`~orchard_jax.fit` writes the same record. A model of
one's own Python code (a Python study's, a ``fit`` of one's own) cannot be rebuilt from
files: pass it,
``load_model(path, model=MyModel(...))``; without it the error says so in one
line.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import types
from typing import Any

from orchard_jax.config import ConfigError
from orchard_jax.core.precision import parse_policy
from orchard_jax.engine.checkpoint import CHECKPOINT_SUBDIR
from orchard_jax.engine.inference import MODEL_FILE, LoadedModel, read_model_record, restore_variables

__all__ = ["builtin_from_repr", "checkpoint_folder", "load_model", "model_from_record"]

# Where a run folder keeps its model, in the order they are looked for.
MODEL_FOLDERS = ("best_model", "fit")


def checkpoint_folder(path: str | os.PathLike) -> pathlib.Path:
  """The folder holding the model's ``checkpoint/`` for ``path`` (see the module docstring).

  Raises:
    FileNotFoundError: in one line, naming what was looked for.
  """
  path = pathlib.Path(path).expanduser()
  if path.name == CHECKPOINT_SUBDIR and path.is_dir() and not (path / CHECKPOINT_SUBDIR).is_dir():
    path = path.parent
  if (path / CHECKPOINT_SUBDIR).is_dir():
    return path
  for name in MODEL_FOLDERS:
    if (path / name / CHECKPOINT_SUBDIR).is_dir():
      return path / name
  what = "does not exist" if not path.exists() else "holds no model"
  raise FileNotFoundError(f"{path} {what}: expected a run folder with best_model/ (a study's "
                          f"outputs) or fit/ (a training run, or fit's output_dir), or a "
                          f"checkpoint's folder (with checkpoint/)")


# A Linen module's one-line repr, flax's "Module( # attributes name = value ... )", alone or
# in its LinenModel's
_LINEN_REPR = re.compile(r"(?:LinenModel\(module=)?(\w+)\( # attributes (.*) \)"
                         r"(?:, train_kwarg='(\w+)', invert=(True|False)\))?")


def builtin_from_repr(text: str | None) -> Any:
  """The built-in Linen model (a class of :mod:`orchard_jax.models`) whose one-line ``repr``
  is ``text``, its fields read back as Python literals; None for anything else (a model of
  one's own code, a clipped or unreadable ``repr``)."""
  from orchard_jax import models  # pylint: disable=import-outside-toplevel
  match = _LINEN_REPR.fullmatch(text or "")
  cls = None if match is None else getattr(models, match.group(1), None)
  if not (isinstance(cls, type) and cls.__module__.startswith("orchard_jax.models")):
    return None
  parts = re.split(r"(?:^| )(\w+) = ", match.group(2))
  try:
    fields = {name: ast.literal_eval(value) for name, value in zip(parts[1::2], parts[2::2])}
    return models.as_model(cls(**fields), train_kwarg=match.group(3) or "train",
                           invert=match.group(4) == "True")
  except (ValueError, SyntaxError, TypeError):
    return None


def model_from_record(record: dict[str, Any], folder: pathlib.Path) -> Any:
  """Builds the model ``record`` (``model.json`` in ``folder``) describes.

  Raises:
    ConfigError: the record names no architecture (a model of one's own code), or the
      architecture cannot be built here (its function not found).
  """
  from orchard_jax.study.build import model_for  # pylint: disable=import-outside-toplevel
  from orchard_jax.study.recipe import from_folder, parse_recipe  # pylint: disable=import-outside-toplevel

  architecture = record.get("architecture")
  if not architecture:
    builtin = builtin_from_repr(record.get("model"))
    if builtin is not None:
      return builtin
    shown = record.get("model") or "a model of your own code"
    raise ConfigError(f"{folder} holds the parameters of {shown}, which orchard_jax cannot "
                      f"rebuild from files: pass it, load_model({str(folder)!r}, model=<the "
                      f"model it trained>)")
  data = from_folder({"architecture": dict(architecture)}, folder.absolute())
  recipe = parse_recipe(data, str(folder / MODEL_FILE))
  shape = types.SimpleNamespace(num_classes=int(record["num_classes"]),
                                input_shape=tuple(record["input_shape"] or ()))
  return model_for(recipe.architecture, shape)


def load_model(path: str | os.PathLike, model: Any = None, *, precision: str | None = None
               ) -> LoadedModel:
  """The trained model of a run folder or checkpoint, ready for ``predict`` and ``apply``.

  Args:
    path: A run folder (a study's outputs with ``best_model/``, a training run or ``fit``
      output directory with ``fit/``) or a checkpoint's own folder (see the module docstring).
    model: The model the checkpoint was trained with (anything
      :func:`~orchard_jax.models.as_model` takes); default: rebuilt from ``model.json``. Needed
      for a model of one's own Python code, and for a folder without ``model.json``.
    precision: The dtype policy to run it in (default: the recorded one, else float32).

  Returns:
    A :class:`~orchard_jax.engine.inference.LoadedModel`: ``predict(images)`` gives softmax
    probabilities, ``apply(x)`` the logits of a batch, ``train_state()`` a state for
    :func:`orchard_jax.evaluate`.

  Raises:
    FileNotFoundError: ``path`` holds no model.
    ConfigError: the model cannot be rebuilt from the folder and ``model`` was not given.
  """
  from orchard_jax.models import as_model  # pylint: disable=import-outside-toplevel

  folder = checkpoint_folder(path)
  record = read_model_record(folder)
  if model is None:
    if record is None:
      raise ConfigError(f"{folder} has no {MODEL_FILE} to rebuild its model from (written by "
                        f"an orchard_jax without load_model): pass it, "
                        f"load_model({str(path)!r}, model=<the model it trained>)")
    model = model_from_record(record, folder)
  model = as_model(model)
  record = record or {}
  shape = record.get("input_shape")
  shape = None if shape is None else tuple(int(d) for d in shape)
  params, model_state = restore_variables(folder, model, shape)
  policy = parse_policy(precision or record.get("precision") or "float32")
  return LoadedModel(model=model, params=params, model_state=model_state,
                     num_classes=record.get("num_classes"), input_shape=shape, policy=policy,
                     layout=record.get("layout") or "NCHW", path=folder, record=record)
