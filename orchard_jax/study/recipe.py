"""Recipes: one YAML file describes a study, or a single training run.

A recipe has up to six sections, as the reference's recipes do:

=============  ======================================================  ====================
section        what it holds                                           parsed into
=============  ======================================================  ====================
dataset        where the data comes from (see :mod:`.sources`)         :class:`DatasetSpec`
architecture   the model: registry name or function, dropout, options  :class:`ArchitectureSpec`
training       :class:`~orchard_jax.config.TrainingConfig` fields      ``TrainingConfig``
augmentation   the reference's augmentation section (null or absent:   ``training.augmentation``
               no augmentation), with ``dataset``'s flags
optuna         :class:`~orchard_jax.config.OptunaConfig` fields and    :class:`StudySpec`
               the study's own keys (search space, plots, ...)
telemetry      output folder, logging, compilation cache               :class:`TelemetrySpec`
=============  ======================================================  ====================

A recipe *with* an ``optuna`` section runs a study; one *without* it is a
single training run of ``training.epochs`` epochs (what ``best_config.yaml``
is). Every value is checked before anything runs; an unknown key raises a
:class:`RecipeError` naming it and the closest valid key. This module reads
a recipe file (``--set`` assignments, paths relative to the file's folder)
into a :class:`Recipe`; each section is :mod:`orchard_jax.study.sections`'.

A reference (orchard-ml) recipe's ``training:`` and ``optuna:`` sections load
unchanged: ``storage_type``/``storage_path``/``postgresql_url`` become
``storage``, ``metric_name``/``direction`` must agree with ``training``, and
``n_jobs: -1`` means one job per CPU.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from orchard_jax import bundled
from orchard_jax.config import TrainingConfig
from orchard_jax.config_base import validated
from orchard_jax.study import checks as c
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.functions import module_file
from orchard_jax.study.model_names import FUNCTION_PREFIX, model_function
from orchard_jax.study.sections import (FLAGS, ArchitectureSpec, DatasetSpec, StudySpec,
                                        TelemetrySpec, parse_architecture, parse_augmentation,
                                        parse_dataset, parse_study, parse_telemetry,
                                        parse_training)

__all__ = ["Recipe", "RecipeError", "SECTIONS", "apply_sets", "bundled_recipe_text",
           "from_folder", "load_recipe", "parse_recipe"]

SECTIONS = ("dataset", "architecture", "training", "augmentation", "optuna", "telemetry")
# Sections of orchard-ml recipes that orchard_jax does not implement.
REFERENCE_ONLY_SECTIONS = ("hardware", "evaluation", "tracking", "export")
BUNDLED = "<bundled default recipe>"
PATH_SHOWN = 200  # file paths in messages: capped later than values, they run long


@validated
class Recipe(c.Section):
  """A validated recipe. ``study`` is None for a single training run. The ``augmentation:``
  section is ``training.augmentation`` (None: no augmentation), its flags ``dataset``'s."""
  dataset: DatasetSpec
  architecture: ArchitectureSpec
  training: TrainingConfig
  study: StudySpec | None
  telemetry: TelemetrySpec
  origin: str = BUNDLED

  def to_dict(self) -> dict[str, Any]:
    """The recipe as plain YAML-ready data (``parse_recipe(to_dict())`` is equal)."""
    training = self.training.to_dict()
    augmentation = training.pop("augmentation")
    out: dict[str, Any] = {
        "dataset": dataclasses.asdict(self.dataset),
        "architecture": self.architecture.to_dict(),
        "training": training,
    }
    if augmentation is not None:  # absent: no augmentation
      out["augmentation"] = {k: v for k, v in augmentation.items() if k not in FLAGS}
    if self.study is not None:
      s = self.study
      out["optuna"] = {**s.config.to_dict(), "enable_model_search": s.enable_model_search,
                       "model_pool": None if s.model_pool is None else list(s.model_pool),
                       "pruner_startup_trials": s.pruner_startup_trials,
                       "show_progress_bar": s.show_progress_bar, "save_plots": s.save_plots,
                       "save_best_config": s.save_best_config,
                       "search_space_overrides": s.overrides.to_dict()}
    out["telemetry"] = dataclasses.asdict(self.telemetry)
    return out


def parse_recipe(data: Any, origin: str = BUNDLED) -> Recipe:
  """Validates a recipe mapping (e.g. ``yaml.safe_load`` output) into a :class:`Recipe`.

  Raises:
    RecipeError: the first problem found, in one line naming the key.
  """
  data = {} if data is None else data
  if not isinstance(data, Mapping):
    raise RecipeError(f"a recipe must be a mapping of sections ({', '.join(SECTIONS)}), "
                      f"got {c.show(data)}")
  for key in data:
    if key in REFERENCE_ONLY_SECTIONS:
      raise RecipeError(f"section {key!r} of orchard-ml recipes is not supported by orchard-jax; "
                        f"remove it (supported: {', '.join(SECTIONS)})")
  c.refuse_unknown("recipe", data, SECTIONS, what="section")
  dataset = parse_dataset(data.get("dataset"))
  training = parse_training(data.get("training"))
  training = training.replace(
      augmentation=parse_augmentation(data.get("augmentation"), dataset))
  study = parse_study(data["optuna"], training) if "optuna" in data else None
  return Recipe(dataset=dataset,
                architecture=parse_architecture(data.get("architecture")), training=training,
                study=study, telemetry=parse_telemetry(data.get("telemetry")), origin=origin)


def bundled_recipe_text() -> str:
  """The text of the bundled, commented default recipe (``orchard-jax init`` writes it); its
  first line points YAML editors at the recipe's JSON Schema (see :mod:`orchard_jax.bundled`)."""
  return bundled.recipe_text()


def apply_sets(data: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
  """Applies ``--set a.b.c=value`` assignments; values are parsed as YAML scalars."""
  for assignment in assignments:
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
      raise RecipeError(f"--set expects key.path=value (e.g. optuna.n_trials=20), "
                        f"got {c.brief(assignment)}")
    try:
      value = yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, ValueError):  # ValueError: an int of over 4300 digits
      value = text
    node = data
    for i, part in enumerate(parts[:-1]):
      child = node.get(part)
      if child is None:
        child = node[part] = {}
      if not isinstance(child, dict):
        raise RecipeError(f"--set {c.clip(key)}: {c.clip('.'.join(parts[:i + 1]))} is "
                          f"{c.show(child)}, not a section")
      node = child
    node[parts[-1]] = value
  return data


def load_recipe(path: str | os.PathLike | None, sets: Sequence[str] = ()) -> Recipe:
  """Reads a recipe file (None: the bundled default), applies ``sets``, validates it."""
  origin = BUNDLED if path is None else os.fspath(path)
  if path is None:
    text = bundled_recipe_text()
  else:
    p = pathlib.Path(path)
    if not p.is_file():
      raise RecipeError(f"recipe file not found: {c.clip(origin, PATH_SHOWN)}")
    text = p.read_text()
  try:
    data = yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    raise RecipeError(f"{c.clip(origin, PATH_SHOWN)} is not valid YAML{where}: "
                      f"{c.clip(' '.join(str(getattr(e, 'problem', None) or e).split()), 160)}"
                      ) from None
  except ValueError as e:  # PyYAML's int(): more than 4300 digits
    raise RecipeError(f"{c.clip(origin, PATH_SHOWN)} is not a readable recipe: "
                      f"{c.clip(' '.join(str(e).split()), 160)}") from None
  data = {} if data is None else data
  if not isinstance(data, dict):
    raise RecipeError(f"{c.clip(origin, PATH_SHOWN)}: a recipe must be a mapping of sections, "
                      f"got {c.show(data)}")
  if "trial" in data and "params" in data:  # orchard_jax.write_outputs' best_trial.yaml
    raise RecipeError(f"{c.clip(origin, PATH_SHOWN)} describes the best trial of a study of your "
                      f"own objective (best_trial.yaml of orchard_jax.write_outputs), not a "
                      f"recipe: rerun its params with your objective; orchard-jax run takes a "
                      f"recipe, such as the best_config.yaml of an orchard-jax run study")
  if path is not None:  # the file's own relative paths; --set values stay the command's
    data = from_folder(data, pathlib.Path(path).absolute().parent)
  return parse_recipe(apply_sets(data, sets), origin)


def _joined(folder: pathlib.Path, path: Any, *, found: bool = True) -> Any:
  """A relative ``path`` read from ``folder``; with ``found``, only when it exists there
  (else it stays relative to the working directory, as recipes were read before)."""
  if not isinstance(path, str) or not path or os.path.isabs(os.path.expanduser(path)):
    return path
  joined = os.path.normpath(folder / path)
  return joined if not found or os.path.exists(joined) else path


def _joined_entry(folder: pathlib.Path, entry: Any) -> Any:
  """A ``'path/file.py:function'`` entry from ``folder`` (when the file is there); a module's
  ``'pkg.mod:fn'`` found in ``folder`` as its file there, which is imported as that module
  (:func:`orchard_jax.study.functions.resolve_function`); else the entry as it is."""
  if not isinstance(entry, str) or ":" not in entry:
    return entry
  target, _, attr = entry.rpartition(":")
  if target.endswith(".py") or "/" in target or os.sep in target:
    return f"{_joined(folder, target)}:{attr}"
  file = module_file(folder, target)
  return entry if file is None else f"{file}:{attr}"


def _joined_pool(folder: pathlib.Path, pool: Any) -> Any:
  """``optuna.model_pool``'s ``'fn:...'`` entries from ``folder``, as ``architecture.function``."""
  if not isinstance(pool, list):
    return pool
  return [FUNCTION_PREFIX + _joined_entry(folder, model_function(name))
          if isinstance(name, str) and model_function(name) is not None else name
          for name in pool]


def from_folder(data: dict[str, Any], folder: pathlib.Path) -> dict[str, Any]:
  """A recipe file's data with its relative paths read from ``folder``, the file's own, first:
  ``dataset.path``, the files or modules of ``dataset.function``, ``architecture.function`` and
  ``optuna.model_pool``'s functions, and ``telemetry.output_dir`` (``best_config.yaml`` writes
  them relative to itself). What is not in ``folder`` stays relative to the working directory,
  as ``--set`` values are."""
  fixes = {("dataset", "path"): _joined, ("dataset", "function"): _joined_entry,
           ("architecture", "function"): _joined_entry, ("optuna", "model_pool"): _joined_pool,
           ("telemetry", "output_dir"): lambda folder, path: _joined(folder, path, found=False)}
  out = dict(data)
  for (section, key), fix in fixes.items():
    if isinstance(out.get(section), dict) and out[section].get(key) is not None:
      out[section] = {**out[section], key: fix(folder, out[section][key])}
  return out
