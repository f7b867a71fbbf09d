"""Search spaces: the reference's ``quick`` and ``full`` presets, YAML overrides, model search.

The presets sample the hyperparameters orchard_jax trains with, in the
reference's order, with the reference's default ranges
(``SearchSpaceOverrides`` of orchard-ml):

=====================  ==================================  ======  ======
parameter              default range                       quick   full
=====================  ==================================  ======  ======
optimizer_type         sgd, adamw                          yes     yes
learning_rate          1e-5 .. 1e-2, log                   yes     yes
weight_decay           1e-6 .. 1e-3, log                   yes     yes
momentum               0.85 .. 0.95                        yes     yes
min_lr                 1e-7 .. 1e-5, log                   yes     yes
criterion_type         cross_entropy, focal                        yes
focal_gamma            0.5 .. 5.0 (only with focal)                yes
label_smoothing        0.0 .. 0.2 (only with cross_entropy)        yes
mixup_alpha            0.0 .. 0.4                                  yes
dropout                0.1 .. 0.5, step 0.1                yes     yes
batch_size             16, 32, 48, 64 (8, 12, 16 >= 224px)  yes     yes
scheduler_type         cosine, plateau, step                       yes
scheduler_patience     3 .. 10 (int)                               yes
rotation_angle         0 .. 15 (int)                               with augmentation,
                                                                   not anatomical
jitter_val             0.0 .. 0.15                                 with augmentation,
                                                                   not texture-based
min_scale              0.9 .. 1.0                                  with augmentation
model_name             the registry's pool for the input   with ``enable_model_search``
=====================  ==================================  ======  ======

``optuna.search_space_overrides`` changes a range: a mapping merges into the
default (``learning_rate: {low: 1e-3}`` keeps ``high`` and ``log``), a list
makes the parameter a choice among its values, and ``null`` takes it out of
the search (the recipe's own value is used). A range given for a parameter
outside the preset adds it to the search (after the preset's parameters, in
the table's order): nothing a recipe lists goes unsearched. ``focal_gamma``
and ``label_smoothing`` given so are refused when the trial's loss can never
be the one they apply to.

The augmentation ranges (``rotation_angle``, ``jitter_val``, ``min_scale``)
are searched, as the reference's ``full`` preset does, when the recipe
augments (an ``augmentation:`` section, ``training.augmentation`` set); their
values reach the trial's state (``Hyperparams.augment``), so they compile
nothing. A recipe without augmentation does not search them, and a range given
for one of them is refused: nothing would read it. So for the strength a
dataset's flag turns off: ``rotation_angle`` when ``dataset.is_anatomical``
(no flip nor rotation), ``jitter_val`` when ``dataset.is_texture_based`` (no
colour jitter).

Deviations from the reference: ``dropout`` is sampled on a 0.1 grid
(``step: null`` makes it continuous), because dropout is part of the compiled
model and each distinct value compiles anew; augmentation is searched only
when on (the reference always augments), and without the strength a dataset's
flag turns off (the reference samples it, unused); ``min_lr`` is capped to the
trial's ``learning_rate``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Union

from orchard_jax.config import ConfigError, TrainingConfig
from orchard_jax.study import checks as c
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.model_names import default_pool, fits_input, input_side, takes_dropout

__all__ = ["FloatRange", "IntRange", "Overrides", "SearchSpace", "apply_params", "build_space",
           "parse_overrides"]


@dataclasses.dataclass(frozen=True)
class FloatRange:
  low: float
  high: float
  log: bool = False
  step: float | None = None


@dataclasses.dataclass(frozen=True)
class IntRange:
  low: int
  high: int
  step: int = 1


Dist = Union[FloatRange, IntRange, tuple]  # a tuple is a list of choices


class Param(NamedTuple):
  section: str   # 'training', 'augmentation' (training.augmentation's) or 'architecture'
  field: str
  kind: str      # 'float' | 'int' | 'choice'


PARAMS: Mapping[str, Param] = MappingProxyType({
    "optimizer_type": Param("training", "optimizer_type", "choice"),
    "learning_rate": Param("training", "learning_rate", "float"),
    "weight_decay": Param("training", "weight_decay", "float"),
    "momentum": Param("training", "momentum", "float"),
    "min_lr": Param("training", "min_lr", "float"),
    "criterion_type": Param("training", "criterion_type", "choice"),
    "focal_gamma": Param("training", "focal_gamma", "float"),
    "label_smoothing": Param("training", "label_smoothing", "float"),
    "mixup_alpha": Param("training", "mixup_alpha", "float"),
    "dropout": Param("architecture", "dropout", "float"),
    "batch_size": Param("training", "batch_size", "choice"),
    "scheduler_type": Param("training", "scheduler_type", "choice"),
    "scheduler_patience": Param("training", "scheduler_patience", "int"),
    "rotation_angle": Param("augmentation", "rotation_angle", "int"),
    "jitter_val": Param("augmentation", "jitter_val", "float"),
    "min_scale": Param("augmentation", "min_scale", "float"),
})
QUICK = ("optimizer_type", "learning_rate", "weight_decay", "momentum", "min_lr", "batch_size",
         "dropout")
FULL = ("optimizer_type", "learning_rate", "weight_decay", "momentum", "min_lr", "criterion_type",
        "focal_gamma", "label_smoothing", "mixup_alpha", "dropout", "batch_size", "scheduler_type",
        "scheduler_patience", "rotation_angle", "jitter_val", "min_scale")
PRESETS = MappingProxyType({"quick": QUICK, "full": FULL})
HIGH_RES = 224  # inputs at least this large use batch_size_high_res
DEFAULTS: Mapping[str, Dist] = MappingProxyType({
    "optimizer_type": ("sgd", "adamw"),
    "learning_rate": FloatRange(1e-5, 1e-2, log=True),
    "weight_decay": FloatRange(1e-6, 1e-3, log=True),
    "momentum": FloatRange(0.85, 0.95),
    "min_lr": FloatRange(1e-7, 1e-5, log=True),
    "criterion_type": ("cross_entropy", "focal"),
    "focal_gamma": FloatRange(0.5, 5.0),
    "label_smoothing": FloatRange(0.0, 0.2),
    "mixup_alpha": FloatRange(0.0, 0.4),
    "dropout": FloatRange(0.1, 0.5, step=0.1),
    "scheduler_type": ("cosine", "plateau", "step"),
    "scheduler_patience": IntRange(3, 10),
    "rotation_angle": IntRange(0, 15),
    "jitter_val": FloatRange(0.0, 0.15),
    "min_scale": FloatRange(0.9, 1.0),
    "batch_size_low_res": (16, 32, 48, 64),
    "batch_size_high_res": (8, 12, 16),
})
AUGMENTATION = ("rotation_angle", "jitter_val", "min_scale")  # searched only when augmenting
_WHERE = "optuna.search_space_overrides"


def _param(key: str) -> Param:
  return PARAMS["batch_size"] if key.startswith("batch_size_") else PARAMS[key]


# -------------------------------------------------------------- overrides --


@dataclasses.dataclass(frozen=True)
class Overrides:
  """Every range of :data:`DEFAULTS`, with the recipe's overrides merged in.

  ``ranges[key]`` is a :class:`FloatRange`, an :class:`IntRange`, a tuple of
  choices, or None (not searched).
  """
  ranges: Mapping[str, Dist | None] = dataclasses.field(default_factory=lambda: DEFAULTS)
  given: frozenset[str] = frozenset()  # the parameters the recipe gives a range (not null)
  # The AUGMENTATION parameters no transform of the trials reads (all three without
  # augmentation): never searched, and refused a range.
  unread: frozenset[str] = frozenset(AUGMENTATION)

  def searched(self, preset: str) -> tuple[str, ...]:
    """The parameters a study with this preset samples, in sampling order: the preset's, then
    those the recipe gives a range outside it; without those it takes out (``null``), and
    without :data:`AUGMENTATION` when the trials do not augment."""
    given = {"batch_size" if key.startswith("batch_size_") else key for key in self.given}
    names = (*PRESETS[preset], *(n for n in FULL if n in given and n not in PRESETS[preset]))
    return tuple(n for n in names if n == "batch_size" or (
        self.ranges[n] is not None and n not in self.unread))

  def to_dict(self) -> dict[str, Any]:
    """The overrides as a recipe writes them: the ranges given and those taken out (``null``);
    a preset's parameter searched with its default range is the preset's."""
    out = {}
    for key, dist in self.ranges.items():
      if key not in self.given and dist is not None:
        continue
      out[key] = (dataclasses.asdict(dist) if isinstance(dist, (FloatRange, IntRange))
                  else None if dist is None else list(dist))
    return out


def _choices(where: str, key: str, values: list) -> tuple:
  if not values:
    raise RecipeError(f"{where} must list at least one value, got []")
  kind = _param(key).kind
  if key.startswith("batch_size_") or kind == "int":
    values = [c.integer(1 if key.startswith("batch_size_") else None)(f"{where}[{i}]", v)
              for i, v in enumerate(values)]
  elif kind == "float":
    values = [c.number(f"{where}[{i}]", v) for i, v in enumerate(values)]
  else:
    values = [c.text(f"{where}[{i}]", v) for i, v in enumerate(values)]
  return tuple(dict.fromkeys(values))


def _range(where: str, key: str, value: Mapping, default: Dist) -> FloatRange | IntRange:
  kind = _param(key).kind
  if kind == "choice" or not isinstance(default, (FloatRange, IntRange)):
    raise RecipeError(f"{where} is a choice: give a list of values or null, got {c.show(dict(value))}")
  allowed = [f.name for f in dataclasses.fields(default)]
  c.refuse_unknown(where, value, allowed)
  merged = {**dataclasses.asdict(default), **value}
  if kind == "int":
    low, high = (c.integer()(f"{where}.{k}", merged[k]) for k in ("low", "high"))
    dist = IntRange(low, high, c.integer(1)(f"{where}.step", merged["step"]))
  else:
    step = merged["step"]
    dist = FloatRange(c.number(f"{where}.low", merged["low"]),
                      c.number(f"{where}.high", merged["high"]),
                      c.boolean(f"{where}.log", merged["log"]),
                      None if step is None else c.number(f"{where}.step", step))
    if dist.log and (dist.low <= 0 or dist.step is not None):
      raise RecipeError(f"{where}: log: true needs low > 0 and no step, got low={dist.low}, "
                        f"step={dist.step}")
    if dist.step is not None and dist.step <= 0:
      raise RecipeError(f"{where}.step must be > 0 or null, got {dist.step}")
  if dist.low >= dist.high:
    raise RecipeError(f"{where}: low must be < high, got low={dist.low}, high={dist.high}")
  return dist


def _check_values(where: str, key: str, dist: Dist, training: TrainingConfig) -> None:
  """Every value the range can give must build a valid TrainingConfig (or dropout)."""
  param = _param(key)
  values = (dist.low, dist.high) if isinstance(dist, (FloatRange, IntRange)) else dist
  for value in values:
    if param.section == "augmentation":
      try:
        training.augmentation.replace(**{param.field: value})
      except ConfigError as e:
        raise RecipeError(f"{where}: {value!r} is not a valid augmentation.{param.field}: "
                          f"{str(e).replace('AugmentationConfig.', 'augmentation.')}") from None
      continue
    if param.section == "architecture":
      if not (isinstance(value, numbers.Real) and 0 <= value < 1):
        raise RecipeError(f"{where}: dropout must be in [0, 1), got {value!r}")
      continue
    changes = {param.field: value}
    if key == "min_lr":
      changes["learning_rate"] = max(training.learning_rate, value)
    if key == "learning_rate":
      changes["min_lr"] = min(training.min_lr, value)
    try:
      training.replace(**changes)
    except ConfigError as e:
      raise RecipeError(f"{where}: {value!r} is not a valid training.{param.field}: "
                        f"{str(e).replace('TrainingConfig.', 'training.')}") from None


def _unread(training: TrainingConfig) -> frozenset[str]:
  """The :data:`AUGMENTATION` parameters that no transform of ``training``'s trials reads."""
  augmentation = training.augmentation
  if augmentation is None:
    return frozenset(AUGMENTATION)
  return frozenset(name for name, off in (("rotation_angle", augmentation.is_anatomical),
                                          ("jitter_val", augmentation.is_texture_based)) if off)


def _refuse_augmentation(key: str, training: TrainingConfig | None = None) -> None:
  augmentation = None if training is None else training.augmentation
  if augmentation is not None:  # a transform the dataset's flag turns off
    flag, transform = (("is_anatomical", "rotate") if key == "rotation_angle"
                       else ("is_texture_based", "jitter colours"))
    raise RecipeError(f"{_WHERE}.{key}: the trials do not {transform} (dataset.{flag}: true), "
                      f"so {key} would change nothing; set dataset.{flag}: false or remove {key}")
  raise RecipeError(f"{_WHERE}.{key}: the trials do not augment (the recipe has no "
                    f"augmentation: section), so {key} would change nothing; add an "
                    f"augmentation: section or remove {key}")


def _conditional(overrides: Overrides, preset: str, training: TrainingConfig) -> None:
  """Refuses ``focal_gamma``/``label_smoothing`` given a range when no trial can use them: each is
  sampled only with its loss (focal, cross-entropy), sampled or the recipe's."""
  names = overrides.searched(preset)
  criteria = (overrides.ranges["criterion_type"] if "criterion_type" in names
              else (training.criterion_type,))
  for key, loss in (("focal_gamma", "focal"), ("label_smoothing", "cross_entropy")):
    if key in overrides.given and key in names and loss not in criteria:
      raise RecipeError(f"{_WHERE}.{key} is searched only with criterion_type {loss!r}, but "
                        f"every trial's criterion_type is one of {list(criteria)}; search "
                        f"criterion_type with {loss!r} among its choices, set "
                        f"training.criterion_type: {loss}, or remove {key}")


def parse_overrides(data: Mapping[str, Any], training: TrainingConfig,
                    preset: str | None = None) -> Overrides:
  """Validates ``optuna.search_space_overrides`` against ``training``'s field ranges; with the
  study's ``preset``, also that every range given can be sampled (see the module docstring)."""
  c.refuse_unknown(_WHERE, data, list(DEFAULTS))
  ranges = dict(DEFAULTS)
  unread = _unread(training)
  for key, value in data.items():
    if key in unread and value is not None:
      _refuse_augmentation(key, training)
    where = f"{_WHERE}.{key}"
    if value is None:
      ranges[key] = None
    elif isinstance(value, (list, tuple)):
      ranges[key] = _choices(where, key, list(value))
    elif isinstance(value, Mapping):
      ranges[key] = _range(where, key, value, DEFAULTS[key])
    else:
      raise RecipeError(f"{where} must be a mapping (low/high/log/step), a list of choices or "
                        f"null, got {c.show(value)}")
  for key, dist in ranges.items():
    if dist is not None and key not in unread:
      _check_values(f"{_WHERE}.{key}", key, dist, training)
  given = frozenset(k for k, v in data.items() if k in DEFAULTS and v is not None)
  overrides = Overrides(MappingProxyType(ranges), given, unread)
  if preset is not None:
    _conditional(overrides, preset, training)
  return overrides


# ------------------------------------------------------------------ space --


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """What a study samples: ``dists`` in sampling order, and the model pool."""
  dists: Mapping[str, Dist]
  model_pool: tuple[str, ...] | None = None

  def sample(self, trial: Any, training: TrainingConfig) -> dict[str, Any]:
    """Suggests every parameter on ``trial``; returns ``{name: value}``.

    ``focal_gamma`` is sampled only with the focal loss and ``label_smoothing``
    only with cross-entropy (the trial's criterion, sampled or the recipe's).
    """
    params: dict[str, Any] = {}
    for name, dist in self.dists.items():
      criterion = params.get("criterion_type", training.criterion_type)
      if (name == "focal_gamma" and criterion != "focal") or (
          name == "label_smoothing" and criterion != "cross_entropy"):
        continue
      if isinstance(dist, FloatRange):
        params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
      elif isinstance(dist, IntRange):
        params[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step)
      else:
        params[name] = trial.suggest_categorical(name, list(dist))
    if self.model_pool:
      params["model_name"] = trial.suggest_categorical("model_name", list(self.model_pool))
    return params

  def describe(self) -> str:
    """The parameters searched, briefly: ``learning_rate 0.001..0.3 log, batch_size 16|32``."""
    parts = [f"{name} {_brief(dist)}" for name, dist in self.dists.items()]
    if self.model_pool:
      parts.append(f"model_name {_brief(self.model_pool)}")
    return ", ".join(parts) or "nothing"


def _brief(dist: Dist) -> str:
  if isinstance(dist, FloatRange):
    return (f"{dist.low:g}..{dist.high:g}" + (" log" if dist.log else "")
            + ("" if dist.step is None else f" step {dist.step:g}"))
  if isinstance(dist, IntRange):
    return f"{dist.low}..{dist.high}" + ("" if dist.step == 1 else f" step {dist.step}")
  return "|".join(map(str, dist))


def build_space(study: Any, input_shape: tuple[int, ...], architecture: str) -> SearchSpace:
  """The search space of a :class:`~orchard_jax.study.sections.StudySpec` for this input.

  Batch sizes come from ``batch_size_high_res`` when the input side is at
  least 224 px. With model search, the pool is ``optuna.model_pool`` or every
  registry model that fits the input; each must fit it. ``dropout`` is not
  sampled when no candidate takes it (functions of the user's without a
  ``dropout`` parameter).
  """
  side = input_side(input_shape) or 0
  dists = {}
  for name in study.overrides.searched(study.config.search_space_preset):
    key = name if name != "batch_size" else (
        "batch_size_high_res" if side >= HIGH_RES else "batch_size_low_res")
    if study.overrides.ranges[key] is not None:
      dists[name] = study.overrides.ranges[key]
  pool = None
  if study.enable_model_search:
    pool = study.model_pool or default_pool(input_shape)
    misfits = [n for n in pool if not fits_input(n, input_shape)]
    if misfits:
      raise RecipeError(f"optuna.model_pool: {', '.join(misfits)} cannot take inputs of shape "
                        f"{input_shape} (channels last)")
    if len(pool) < 2:
      raise RecipeError(f"optuna.enable_model_search: only {list(pool)} fits inputs of shape "
                        f"{input_shape}; nothing to search")
  elif not fits_input(architecture, input_shape):
    raise RecipeError(f"architecture.name {architecture!r} cannot take inputs of shape "
                      f"{input_shape} (channels last); use 'mlp' for feature vectors")
  if "dropout" in dists:
    if not any(takes_dropout(name) for name in pool or (architecture,)):
      del dists["dropout"]
  return SearchSpace(MappingProxyType(dists), pool)


def apply_params(training: TrainingConfig, params: Mapping[str, Any]) -> TrainingConfig:
  """``training`` with the sampled training parameters, and the augmentation ones in its
  ``augmentation``; ``min_lr`` capped to ``learning_rate``.

  Raises:
    RecipeError: an augmentation parameter for a ``training`` without augmentation.
  """
  def sampled(section: str) -> dict[str, Any]:
    return {PARAMS[n].field: v for n, v in params.items()
            if n in PARAMS and PARAMS[n].section == section}
  changes, augment = sampled("training"), sampled("augmentation")
  if "learning_rate" in changes or "min_lr" in changes:
    changes["min_lr"] = min(changes.get("min_lr", training.min_lr),
                            changes.get("learning_rate", training.learning_rate))
  if augment:
    if training.augmentation is None:
      _refuse_augmentation(next(iter(augment)))
    changes["augmentation"] = training.augmentation.replace(**augment)
  return training.replace(**changes)
