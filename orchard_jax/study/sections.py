"""A recipe's sections: the model of each, and the parsing and checks of each.

Each ``parse_<section>`` takes the section's data as YAML gives it and returns
its model (:class:`DatasetSpec`, :class:`ArchitectureSpec`, ``TrainingConfig``,
``AugmentationConfig`` or None, :class:`StudySpec`, :class:`TelemetrySpec`), or raises a one-line
:class:`~orchard_jax.study.checks.RecipeError` naming the key. The checks
that span sections (a monitored metric the recipe's validation computes, a
storage given the reference's way) are here too; the recipe that holds the
sections is :mod:`orchard_jax.study.recipe`'s.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, InstanceOf, WithJsonSchema

from orchard_jax.config import SEED_MAX, AugmentationConfig, OptunaConfig, TrainingConfig
from orchard_jax.config_base import ConfigError, Says, validated
from orchard_jax.config_fields import Int, Name
from orchard_jax.study import checks as c
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.model_names import FUNCTION_PREFIX, model_function, registry_names
from orchard_jax.study.space import Overrides, parse_overrides

__all__ = ["ArchitectureSection", "ArchitectureSpec", "DatasetSpec", "RECIPE_METRICS",
           "StudySpec", "TelemetrySpec", "parse_architecture", "parse_augmentation",
           "parse_dataset", "parse_study", "parse_telemetry", "parse_training"]

DEFAULT_CACHE = "~/.cache/orchard_jax/jax"


def _upper(value: Any) -> Any:
  return value.upper() if isinstance(value, str) else value


# A recipe's strings: optional non-empty text, and a function of the user's.
Text = Annotated[str | None, Field(pattern=r"\S")]
EntryPoint = Annotated[str | None, Field(pattern=f"^(?:{c.ENTRY})$"),
                       Says("'module:function' or 'path/file.py:function'", c.brief)]
Levels = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


@validated
class DatasetSpec(c.Section):
  """The ``dataset:`` section; see :mod:`orchard_jax.study.sources`."""
  _SECTION = "dataset"
  source: Literal["digits", "npz", "function"] = Field("digits", description=(
      "digits (bundled with scikit-learn) | npz (MedMNIST format) | function"))
  path: Text = Field(None, description="npz: the file")
  function: EntryPoint = Field(None, description=(
      "function: 'module:function' or 'path/file.py:function' returning loaders"))
  num_classes: Int | None = Field(None, ge=2, description=(
      "None: from the labels (npz) or the function; digits: 10"))
  layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="function: layout of 4-D inputs")
  val_fraction: float = Field(0.15, gt=0, lt=1, description="digits: validation share")
  test_fraction: float = Field(0.15, gt=0, lt=1, description="digits: test share")
  split_seed: Int = Field(0, ge=0, le=SEED_MAX, description=(
      "digits: seed of the stratified split, in [0, 2**32)"))
  eval_batch_size: Int = Field(256, ge=1, description="batch size of validation and test loaders")
  is_anatomical: bool = Field(False, description=(
      "the images have a meaningful orientation (organ scans): augmentation and TTA neither "
      "flip nor rotate them"))
  is_texture_based: bool = Field(False, description=(
      "the classes are textures (tissue patches): no colour jitter in augmentation, no shift, "
      "zoom or blur in TTA"))


@validated
class ArchitectureSpec(c.Section):
  """The ``architecture:`` section: a model of :func:`orchard_jax.models.build_model`, or of a
  function of the user's (see :mod:`orchard_jax.study.build`).

  The recipe's ``function: 'pkg.module:build'`` is ``name='fn:pkg.module:build'``
  here, the name a trial's ``model_name`` has for it (:attr:`function` reads it back).
  """
  _SECTION = "architecture"
  name: Name = Field("mini_cnn", description=(
      "a name of orchard_jax.models.build_model (mlp, mini_cnn, ...)"))
  dropout: float | None = Field(None, ge=0, lt=1, description=(
      "dropout before the classifier head; null: the architecture's default"))
  options: dict[str, Any] = Field(default_factory=dict, description="extra build keywords")
  pretrained: bool = False
  weight_variant: Text = None

  @property
  def function(self) -> str | None:
    """The ``'module:function'`` (or ``'path/file.py:function'``) that builds the model, or None
    for a registry model."""
    return model_function(self.name)

  def to_dict(self) -> dict[str, Any]:
    """The section as a recipe writes it: ``name`` or ``function``, then the rest."""
    out = c.plain(dataclasses.asdict(self))
    if self.function is not None:
      del out["name"]
      out = {"function": self.function, **out}
    return out


@validated
class ArchitectureSection(ArchitectureSpec):
  """The ``architecture:`` section as a recipe writes it: ``function`` instead of ``name`` for
  a model of the user's."""
  function: EntryPoint = Field(None, description=(
      "instead of name: your own model, 'module:function' or 'path/file.py:function', called as "
      "build(num_classes, input_shape, **options)"))

  @classmethod
  def _unknown(cls, key: Any) -> str:  # the keys in the order recipes write them
    return c.unknown_key("architecture", key, ["name", "function", "dropout", "options",
                                               "pretrained", "weight_variant"])


@validated
class TelemetrySpec(c.Section):
  """The ``telemetry:`` section."""
  _SECTION = "telemetry"
  output_dir: Text = Field(None, description="null: outputs/<study_name> (or outputs/train)")
  log_level: Annotated[Levels, BeforeValidator(_upper)] = "INFO"
  log_interval: Int = Field(10, ge=1, description=(
      "log a line every this many epochs (and the last)"))
  compilation_cache: Text = Field(DEFAULT_CACHE, description=(
      "JAX's compile cache and executables/; null: off"))


def _listed(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


@validated
class StudySpec(c.Section):
  """The ``optuna:`` section: an OptunaConfig and the study's own keys."""
  _SECTION = "optuna"
  config: OptunaConfig
  overrides: Annotated[Overrides, InstanceOf, WithJsonSchema({"type": "object"})]
  enable_model_search: bool = Field(False, description=(
      "also search the architecture among models that fit the input"))
  model_pool: Annotated[tuple[Name, ...] | None, BeforeValidator(_listed)] = Field(
      None, description="architectures the search picks from (registry names, 'fn:mod:function')")
  pruner_startup_trials: Int = Field(
      5, ge=0, description="median/percentile: trials never pruned; same_epoch: other trials "
                           "at the epoch before it judges")
  show_progress_bar: bool = True
  save_plots: bool = True
  save_best_config: bool = True


# --------------------------------------------------------------- parsing --

_ONLY_FOR = {"path": "npz", "function": "function", "layout": "function",
             "val_fraction": "digits", "test_fraction": "digits", "split_seed": "digits"}
_REFERENCE_STORAGE = ("storage_type", "storage_path", "postgresql_url")
_REFERENCE_TARGET = {"metric_name": "monitor_metric", "direction": "monitor_direction"}
_STUDY_KEYS = [f.name for f in dataclasses.fields(StudySpec)
               if f.name not in ("config", "overrides")]
RECIPE_METRICS = ("auc", "accuracy", "f1", "loss")
DIGITS_CLASSES = 10  # the bundled digits: 0-9


def parse_dataset(data: Any) -> DatasetSpec:
  spec = DatasetSpec.from_dict(c.as_mapping("dataset", data))
  defaults = DatasetSpec()
  for key, source in _ONLY_FOR.items():
    if getattr(spec, key) != getattr(defaults, key) and spec.source != source:
      raise RecipeError(f"dataset.{key} is read only when dataset.source is {source!r}, "
                        f"got source={c.brief(spec.source)}")
  if spec.source == "npz" and spec.path is None:
    raise RecipeError("dataset.path is required when dataset.source is 'npz' (a MedMNIST-format "
                      ".npz file with train_images, train_labels, val_images, val_labels)")
  if spec.source == "function" and spec.function is None:
    raise RecipeError("dataset.function is required when dataset.source is 'function' "
                      "('module:function' returning loaders)")
  if spec.source == "digits" and spec.num_classes not in (None, DIGITS_CLASSES):
    raise RecipeError(f"dataset.num_classes must be {DIGITS_CLASSES} or null with dataset.source "
                      f"'digits' (the bundled digits have {DIGITS_CLASSES} classes), got "
                      f"{c.brief(spec.num_classes)}")
  if spec.val_fraction + spec.test_fraction >= 1:
    raise RecipeError(f"dataset.val_fraction + dataset.test_fraction must be < 1, got "
                      f"{spec.val_fraction} + {spec.test_fraction}")
  return spec


def parse_architecture(data: Any) -> ArchitectureSpec:
  data = dict(c.as_mapping("architecture", data))
  if data.get("name", "") is None:  # null: not given (e.g. --set architecture.name=null)
    del data["name"]
  values = ArchitectureSection.from_dict(data).to_dict()
  function = data.get("function")
  if function is not None and "name" in data:
    raise RecipeError(f"architecture.name ({c.brief(data['name'])}) and architecture.function "
                      f"({c.brief(function)}) are mutually exclusive: give a registry name or a "
                      f"function of your own, not both (name: null drops the name)")
  del values["function"]
  if function is not None:
    values["name"] = FUNCTION_PREFIX + function
    if "dropout" in values["options"] and values["dropout"] is not None:
      raise RecipeError("architecture.dropout and architecture.options.dropout are both set; "
                        "give the function's dropout once, as architecture.dropout")
  spec = ArchitectureSpec(**values)
  if spec.pretrained or spec.weight_variant is not None:
    raise RecipeError("architecture.pretrained / weight_variant: pretrained weights are not "
                      "supported by recipes; set pretrained: false and weight_variant: null")
  if function is None:
    names = registry_names()  # imports the models (jax)
    if spec.name not in names:
      hint = c.closest(spec.name, names) or (
          "; a model of your own is architecture.function: 'module:function'"
          if spec.name.startswith(FUNCTION_PREFIX) or ":" in spec.name else "")
      raise RecipeError(f"architecture.name must be one of {', '.join(map(repr, names))}, "
                        f"got {c.brief(spec.name)}{hint}")
  return spec.replace(options=c.hashable(spec.options))


def parse_training(data: Any) -> TrainingConfig:
  data = c.as_mapping("training", data)
  if "augmentation" in data:
    raise RecipeError("training.augmentation: in a recipe augmentation is a section of its own "
                      "(augmentation: at the top level, beside training:); move it there")
  c.refuse_unknown("training", data, [f.name for f in dataclasses.fields(TrainingConfig)
                                      if f.name != "augmentation"])
  training = c.renamed(TrainingConfig.from_dict, data)
  if training.monitor_metric not in RECIPE_METRICS:
    raise RecipeError(f"training.monitor_metric must be one of {', '.join(map(repr, RECIPE_METRICS))} "
                      f"in a recipe (the metrics validation computes), got "
                      f"{c.brief(training.monitor_metric)}"
                      f"{c.closest(training.monitor_metric, RECIPE_METRICS)}")
  if (training.monitor_metric == "loss") != (training.monitor_direction == "minimize"):
    raise RecipeError(f"training.monitor_direction must be 'minimize' for 'loss' and 'maximize' "
                      f"for {', '.join(RECIPE_METRICS[:3])}, got monitor_metric="
                      f"{c.brief(training.monitor_metric)}, "
                      f"monitor_direction={c.brief(training.monitor_direction)}")
  return training


# The augmentation section's keys: AugmentationConfig's but the dataset's flags.
FLAGS = ("is_anatomical", "is_texture_based")
AUGMENTATION_KEYS = tuple(f.name for f in dataclasses.fields(AugmentationConfig)
                          if f.name not in FLAGS)


def parse_augmentation(data: Any, dataset: DatasetSpec) -> AugmentationConfig | None:
  """The ``augmentation:`` section with the dataset's flags, or None when the recipe has none
  (absent or ``null``: the trials do not augment).

  Raises:
    RecipeError: a bad key or value; the dataset's flags given here; ``mean``/``std`` for a
      source whose images are already in ``[0, 1]``; dataset flags without the section (TTA
      reads them from it too, so nothing would).
  """
  if data is None:
    given = [f for f in FLAGS if getattr(dataset, f)]
    if given:  # TTA reads them from training.augmentation too: without it, nothing would
      raise RecipeError(f"dataset.{given[0]} is read through the augmentation: section (by the "
                        f"training augmentation and by TTA), and the recipe has none, so it "
                        f"would change nothing; add an augmentation: section or remove it")
    return None
  data = c.as_mapping("augmentation", data)
  for flag in FLAGS:
    if flag in data:
      raise RecipeError(f"augmentation.{flag}: in a recipe the dataset's flags are in its "
                        f"dataset: section (dataset.{flag}); move it there")
  c.refuse_unknown("augmentation", data, AUGMENTATION_KEYS)
  if dataset.source != "function" and any(data.get(k) is not None for k in ("mean", "std")):
    raise RecipeError(f"augmentation.mean/std are the normalisation of images a function "
                      f"source's loaders give; dataset.source {dataset.source!r} gives images "
                      f"in [0, 1]: remove them")
  try:
    return AugmentationConfig.from_dict({**data, **{f: getattr(dataset, f) for f in FLAGS}})
  except ConfigError as e:
    raise RecipeError(str(e).replace("AugmentationConfig.", "augmentation.")) from None


def _storage(data: dict[str, Any]) -> None:
  """Turns the reference's storage_type/storage_path/postgresql_url into ``storage``."""
  given = {k: data.pop(k) for k in _REFERENCE_STORAGE if k in data}
  if not given:
    return
  if "storage" in data:
    raise RecipeError(f"optuna.storage and optuna.{'/'.join(given)} both set; use only storage "
                      f"('sqlite', 'memory' or a database URL)")
  kind, path, url = (given.get(k) for k in _REFERENCE_STORAGE)
  kind = kind or ("postgresql" if url else "sqlite")
  if kind == "postgresql":
    if not url:
      raise RecipeError("optuna.storage_type 'postgresql' needs optuna.postgresql_url")
    data["storage"] = url
  elif kind == "sqlite":
    data["storage"] = f"sqlite:///{os.path.abspath(path)}" if path else "sqlite"
  elif kind == "memory":
    data["storage"] = "memory"
  else:
    raise RecipeError(f"optuna.storage_type must be 'sqlite', 'memory' or 'postgresql', "
                      f"got {c.brief(kind)}")


def parse_study(data: Any, training: TrainingConfig) -> StudySpec:
  data = dict(c.as_mapping("optuna", data))
  own_keys = [*_STUDY_KEYS, "search_space_overrides"]
  c.refuse_unknown("optuna", data, [*(f.name for f in dataclasses.fields(OptunaConfig)),
                                    *own_keys, *_REFERENCE_STORAGE, *_REFERENCE_TARGET])
  own = {k: data.pop(k) for k in list(data) if k in own_keys}
  for key, field in _REFERENCE_TARGET.items():
    if key in data and data.pop(key) != getattr(training, field):
      raise RecipeError(f"optuna.{key} must agree with training.{field} "
                        f"({c.brief(getattr(training, field))}); the study optimizes "
                        f"training.{field}")
  _storage(data)
  if data.get("n_jobs") == -1:
    data["n_jobs"] = os.cpu_count() or 1
  if "study_name" in data:  # also the run folder: outputs/<study_name>
    c.folder_name("optuna.study_name", data["study_name"])
  config = c.renamed(OptunaConfig.from_dict, data)
  _threshold(config.early_stopping_threshold, training.monitor_metric)
  if config.sampler_type == "cmaes" and importlib.util.find_spec("cmaes") is None:
    raise RecipeError("optuna.sampler_type 'cmaes' needs the 'cmaes' package "
                      "(pip install cmaes), or use 'tpe' or 'random'")
  ranges = own.pop("search_space_overrides", None)
  if ranges is not None and (not isinstance(ranges, Mapping)
                             or not all(isinstance(k, str) for k in ranges)):
    raise RecipeError(f"optuna.search_space_overrides must be a mapping with string keys, got "
                      f"{c.show(ranges)}")
  spec = StudySpec.from_dict({**own, "config": config,
                              "overrides": parse_overrides(ranges or {}, training,
                                                              config.search_space_preset)})
  if spec.model_pool is not None:
    if not spec.enable_model_search:
      raise RecipeError("optuna.model_pool requires optuna.enable_model_search: true")
    if len(spec.model_pool) < 2:
      raise RecipeError(f"optuna.model_pool must name at least 2 architectures, got "
                        f"{c.brief(list(spec.model_pool))}")
    for i, name in enumerate(spec.model_pool):
      entry = model_function(name)
      if entry is not None:
        if not c.is_entry_point(entry):
          raise RecipeError(f"optuna.model_pool[{i}] must be a registry name or "
                            f"'{FUNCTION_PREFIX}module:function' ('{FUNCTION_PREFIX}path/file.py:"
                            f"function'), got {c.brief(name)}")
      elif name not in registry_names():
        hint = (f" (did you mean '{FUNCTION_PREFIX}{name}'?)" if c.is_entry_point(name)
                else c.closest(name, registry_names()))
        raise RecipeError(f"optuna.model_pool: unknown architecture {c.brief(name)}{hint}; known: "
                          f"{', '.join(registry_names())}, or '{FUNCTION_PREFIX}module:function' "
                          f"for a function of your own")
  return spec


def _threshold(threshold: float | None, metric: str) -> None:
  """The early-stopping threshold must be a value ``metric`` can take."""
  if threshold is None:
    return
  if metric == "loss" and threshold < 0:
    raise RecipeError(f"optuna.early_stopping_threshold must be >= 0 for training.monitor_metric "
                      f"'loss', got {c.brief(threshold)}")
  if metric != "loss" and not 0 <= threshold <= 1:
    raise RecipeError(f"optuna.early_stopping_threshold must be in [0, 1] for "
                      f"training.monitor_metric {c.brief(metric)} (a score between 0 and 1), "
                      f"got {c.brief(threshold)}")


def parse_telemetry(data: Any) -> TelemetrySpec:
  return TelemetrySpec.from_dict(c.as_mapping("telemetry", data))
