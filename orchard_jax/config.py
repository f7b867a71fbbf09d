"""Frozen, validated configuration for orchard_jax trials.

Two value objects hold every setting the trial loop reads:

* :class:`TrainingConfig`: the reference's ``training:`` section (same field
  names, defaults and ranges), plus ``precision``.
* :class:`OptunaConfig`: the parts of the reference's ``optuna:`` section that
  the study and the loop read.

:class:`TrialConfig` bundles them with what one trial trains: the model, the
data loaders and optional task adapters.

All three are frozen, keyword-only pydantic (v2) dataclasses (strict types, unknown
fields refused); the first two hash and compare by value. They are checked whenever one is
built, so also by :meth:`~_Config.replace`, ``dataclasses.replace`` and
:meth:`~_Config.from_dict`. Every problem raises :class:`ConfigError`, a
``ValueError`` whose one-line message names the class, the field, the value
received and what is allowed (pydantic's own report is never shown)::

    TrainingConfig.learning_rate must be in (1e-08, 1), got -0.1

Deliberate differences from the reference (orchard-ml v0.2.5):

* ``batch_size`` has no upper bound. The reference caps it at 128 to suit 8 GB
  GPUs; that cap does not fit TPU/GPU JAX users.
* ``precision`` (new) picks a jmp-style dtype policy, checked by
  ``core.precision.parse_policy`` (imported only when ``precision`` is set).
  ``None`` derives it from ``use_amp``; see :func:`resolve_precision`.
* ``min_lr`` must be ``<= learning_rate``.
* ``seed`` must be in ``[0, 2**32)``: the seeds numpy's and Optuna's samplers
  take.
* ``TrainingConfig.monitor_metric`` takes any metric name, since task
  adapters can report their own metrics. The reference allows only ``'auc'``
  and ``'accuracy'``. A :class:`TrialConfig` with the default validation (no
  ``validate_fn``) checks it as the command line does: one of
  :data:`DEFAULT_METRICS`, ``'loss'`` minimized and the others maximized.
* ``OptunaConfig.storage`` is a single field: ``'sqlite'``, ``'memory'`` or a
  database URL. The reference uses storage_type, storage_path and
  postgresql_url. ``n_jobs`` must be ``>= 1`` (the reference also allows
  ``-1``), ``timeout`` must be ``> 0`` and the default ``study_name`` is
  ``'orchard_jax'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import os
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

import pydantic
import pydantic.dataclasses
from pydantic import AfterValidator, BeforeValidator, Field

__all__ = ["ConfigError", "DEFAULT_METRICS", "TrainingConfig", "OptunaConfig", "TrialConfig",
           "resolve_precision"]

_C = TypeVar("_C", bound="_Config")


class ConfigError(ValueError):
  """An invalid configuration value, unknown field or inconsistent combination."""


# Values that messages echo are capped: a value longer than SHOWN_MAX characters
# is shown as its first SHOWN_HEAD characters, '…' and its length.
SHOWN_MAX = 80
SHOWN_HEAD = 60
SEED_MAX = 2**32 - 1  # numpy's and Optuna's samplers take seeds in [0, 2**32)
# The metrics the default validation (orchard_jax.engine.evaluate) returns; the
# command line's recipes allow the same (study.recipe.RECIPE_METRICS).
DEFAULT_METRICS = ("auc", "accuracy", "f1", "loss")


def clip(text: str, limit: int = SHOWN_MAX, length: int | None = None) -> str:
  """``text``, or when longer than ``limit`` its start, '…' and ``(N characters)``."""
  if len(text) <= limit:
    return text
  head = max(SHOWN_HEAD, limit - 20)
  return f"{text[:head]}… ({len(text) if length is None else length} characters)"


def brief(value: Any) -> str:
  """``repr(value)``, capped by :func:`clip` (a string's length is its own)."""
  try:
    text = repr(value)
  except Exception:  # e.g. an int of over 4300 digits, or a repr that raises
    bits = value.bit_length() if isinstance(value, int) else None
    text = f"<an int of {bits} bits>" if bits else f"<{type(value).__name__} object>"
  return clip(text, length=len(value) if isinstance(value, str) else None)


def show(value: Any) -> str:
  """The value (capped, see :func:`brief`) and its type: ``"'x' (str)"``."""
  return f"{brief(value)} ({type(value).__name__})"


def closest(word: Any, allowed: Any) -> str:
  """``" (did you mean 'x'?)"`` for the allowed word closest to ``word`` (case ignored), else
  ``""``."""
  if not isinstance(word, str):
    return ""
  lowered = {str(a).lower(): a for a in allowed}
  match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
  return f" (did you mean {lowered[match[0]]!r}?)" if match else ""


# --------------------------------------------------------------- messages --


@dataclasses.dataclass(frozen=True)
class Says:
  """Field metadata: what a type error of the field says is allowed, and how it shows the value
  (``<where> must be <allowed>, got <shown(value)>``)."""
  allowed: str
  shown: Callable[[Any], str] = show


# What a type error says, by pydantic's error type; fields of a recipe section word it as
# ``study.checks.Section._WORDS``.
_KINDS = {"int_type": "int", "float_type": "float", "finite_number": "finite", "bool_type": "bool",
          "string_type": "str", "string_pattern_mismatch": "str", "string_too_short": "str",
          "tuple_type": "list", "list_type": "list", "dict_type": "dict"}
_RANGES = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _allowed(field: Any) -> str:
  """A field's range from its constraints: ``'>= 1'``, ``'> 0'``, ``'in [0, 1)'``."""
  bounds = {k: getattr(m, k) for m in field.metadata for k in ("gt", "ge", "lt", "le")
            if hasattr(m, k)}
  number = str if int in (field.annotation, *get_args(field.annotation)) else (
      lambda x: format(x, "g"))
  lo, hi = bounds.get("gt", bounds.get("ge")), bounds.get("lt", bounds.get("le"))
  if hi is None:
    return f"{'>' if 'gt' in bounds else '>='} {number(lo)}"
  return (f"in {'(' if 'gt' in bounds else '['}{number(lo)}, {number(hi)}"
          f"{')' if 'lt' in bounds else ']'}")


def _integral(value: Any) -> Any:
  """numpy's (any Integral's) ints become int; bools and the rest are left to the type check."""
  integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  return int(value) if integral else value


# Field types: ints (numpy's included) and non-empty strings (not only spaces).
Int = Annotated[int, BeforeValidator(_integral)]
Name = Annotated[str, Field(pattern=r"\S")]
_SETTINGS = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def validated(cls: type[_C] | None = None, *, eq: bool = True) -> Any:
  """Class decorator: a frozen, keyword-only pydantic dataclass that raises ``cls._ERROR``.

  Pydantic's ``ValidationError`` never leaves the constructor: its first error
  (an unknown field before any other, then in field order) becomes one line
  (:meth:`_Config._line`). Fields are keyword-only: a positional argument is a TypeError.
  """
  def make(cls: type[_C]) -> type[_C]:
    cls = pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=eq,
                                         config=_SETTINGS)(cls)
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(self: Any, **kwargs: Any) -> None:
      try:
        validate(self, **kwargs)
      except pydantic.ValidationError as e:
        fields = list(cls.__pydantic_fields__)  # unknown fields first, then in field order
        first = min(e.errors(), key=lambda x: fields.index(x["loc"][0])
                    if x["loc"] and x["loc"][0] in fields else -1)
        raise type(self)._ERROR(type(self)._line(first, kwargs)) from None
    cls.__init__ = __init__
    return cls
  return make if cls is None else make(cls)


class _Config:
  """Shared behaviour: one-line messages, dict I/O, replace."""

  __slots__ = ()
  _ERROR: ClassVar[type[ConfigError]] = ConfigError
  _WORDS: ClassVar[Mapping[str, Says]] = {
      "int": Says("an int"), "float": Says("a float"), "float?": Says("a float or None"),
      "finite": Says("a finite float", brief), "bool": Says("True or False"),
      "str": Says("a non-empty str"), "list": Says("a list"), "dict": Says("a mapping")}
  # Keys of the reference's section that orchard_jax does not read: why.
  _NOT_READ: ClassVar[Mapping[str, str]] = {}

  @classmethod
  def _where(cls) -> str:
    """What messages name before a field: the class (a recipe section: the section)."""
    return cls.__name__

  @classmethod
  def _unknown(cls, key: Any) -> str:
    """The message of an unknown field."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(key, str):
      return f"{cls.__name__} field names must be str, got {show(key)}"
    if key in cls._NOT_READ:
      return f"{cls.__name__} has no field {brief(key)}: {cls._NOT_READ[key]}; remove it"
    return f"{cls.__name__} has no field {brief(key)}" + (
        closest(key, names) or f"; valid fields: {', '.join(names)}")

  @classmethod
  def _line(cls, error: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """One pydantic error as one line: where, what is allowed, the value received."""
    kind, loc, value = error["type"], list(error["loc"]), error.get("input")
    problem = error.get("ctx", {}).get("error")
    if isinstance(problem, ConfigError):  # a section's, or a check of several fields: whole
      return str(problem)
    if kind == "unexpected_keyword_argument":
      return cls._unknown(loc[0])
    if "[key]" in loc:  # a mapping's key: the message is the mapping's
      loc, value, kind = loc[:1], data.get(loc[0]), "dict_type"
    where = cls._where() + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    field = cls.__pydantic_fields__[loc[0]] if loc else None
    if kind == "missing":
      return f"{where} is required; pass {loc[-1]}=..."
    if kind == "value_error":  # a field's own check: the text after the field's name
      text = str(problem)
      return f"{where}{'' if text.startswith('=') else ' '}{text}"
    if kind == "literal_error":
      options = get_args(field.annotation)
      return (f"{where} must be one of {', '.join(map(repr, options))}, got {brief(value)}"
              f"{closest(value, options)}")
    if kind in _RANGES:
      return f"{where} must be {_allowed(field)}, got {brief(value)}"
    if kind in _KINDS:
      says = next((m for m in field.metadata if isinstance(m, Says)), None)
      if says is None or len(loc) > 1:
        word = _KINDS[kind]
        nullable = word == "float" and type(None) in get_args(field.annotation)
        says = cls._WORDS[word + "?" if nullable else word]
      return f"{where} must be {says.allowed}, got {says.shown(value)}"
    return f"{where} is invalid: {' '.join(error['msg'].split())}"

  @classmethod
  def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
    """Builds a config from a mapping, e.g. a recipe section from yaml.safe_load.

    Unknown keys are refused, naming the closest field. Missing keys take
    their defaults. For float fields a numeric string is parsed: PyYAML reads
    ``1e-6`` (no dot) as the string ``'1e-6'``, and reference recipes write
    ``min_lr: 1e-6``. Every other value must already have the right type.
    """
    if not isinstance(data, Mapping):
      raise cls._ERROR(f"{cls.__name__}.from_dict expects a mapping, got {show(data)}")
    for key in data:
      if not isinstance(key, str) or key not in cls.__pydantic_fields__:
        raise cls._ERROR(cls._unknown(key))
    floats = [n for n, f in cls.__pydantic_fields__.items()
              if float in (f.annotation, *get_args(f.annotation))]
    return cls(**{k: cls._number(v) if k in floats else v for k, v in data.items()})

  @staticmethod
  def _number(value: Any) -> Any:
    """A float field's value from a mapping: a numeric string as a float, else as it is (the
    type check names it)."""
    try:
      return float(value) if isinstance(value, str) else value
    except ValueError:
      return value

  def to_dict(self) -> dict[str, Any]:
    """Every field by name; ``from_dict(cfg.to_dict()) == cfg``."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def replace(self: _C, **changes: Any) -> _C:
    """A copy with ``changes`` applied, checked like a new config."""
    return dataclasses.replace(self, **changes)


# --------------------------------------------------- TrainingConfig checks --

_POLICY_MAX = 100  # 'params=bfloat16,compute=bfloat16,output=bfloat16' has 49


def _check_precision(value: str | None) -> str | None:
  """None, or a policy string that ``core.precision.parse_policy`` accepts.

  The parser is imported here, not at module level, so that loading or
  building a config without ``precision`` never imports jax.
  """
  if value is None:
    return None
  if len(value) > _POLICY_MAX:
    raise ValueError(
        f"must be a dtype policy str of at most {_POLICY_MAX} characters, such as "
        f"'bfloat16' or 'params=float32,compute=bfloat16,output=float32', got {brief(value)}")
  from orchard_jax.core.precision import parse_policy
  try:
    parse_policy(value)
  except ValueError as e:
    # parse_policy's message quotes the value: capped there too.
    raise ValueError(f"={brief(value)} is invalid: "
                     f"{str(e).replace(repr(value), brief(value))}") from e
  return value


def _zero_if_none(value: Any) -> Any:
  return 0.0 if value is None else value


_STORAGE = r"^(?:sqlite|memory|[A-Za-z][A-Za-z0-9+.\-]*://\S*)$"
_STORAGE_SAYS = Says(
    "'sqlite', 'memory' or a database URL such as 'postgresql://user:pass@host/db' or "
    "'sqlite:///path/study.db'",
    lambda v: brief(re.sub(r"//[^/@]*@", "//***@", v) if isinstance(v, str) else v))


@validated
class TrainingConfig(_Config):
  """Hyperparameters of one training run (the reference's ``training:``).

  Attributes:
    seed: Seed of every random stream of the run (and of the study's
      sampler), an int in ``[0, 2**32)``, as numpy and Optuna take.
    batch_size: Samples per batch, ``>= 1``. Unlike the reference, no upper
      bound (the reference's cap of 128 suits 8 GB GPUs, not TPU/GPU JAX).
    epochs: Epochs of a full run, ``>= 1``.
    optimizer_type: ``'sgd'`` (coupled weight decay) or ``'adamw'`` (decoupled).
    learning_rate: Initial learning rate, in ``(1e-08, 1)``.
    min_lr: Floor of the cosine/plateau schedules, in ``(1e-08, 1)`` and
      ``<= learning_rate``.
    momentum: SGD momentum, in ``[0, 1)``.
    weight_decay: In ``[0, 0.2]``.
    grad_clip: Max global gradient norm, in ``[0, 100]``; 0 disables it.
      ``None`` also disables it and is stored as ``0.0``.
    label_smoothing: In ``[0, 0.3]``.
    mixup_alpha: Beta(alpha, alpha) parameter of MixUp, ``>= 0``.
    mixup_epochs: MixUp is applied while ``epoch <= mixup_epochs``; ``>= 0``.
    scheduler_type: ``'cosine'``, ``'plateau'``, ``'step'`` or ``'none'``.
    monitor_metric: Validation metric that is tracked, reported and given to
      the plateau scheduler (any non-empty name here; a :class:`TrialConfig`
      without a ``validate_fn`` allows only :data:`DEFAULT_METRICS`).
    monitor_direction: ``'maximize'`` or ``'minimize'``.
    scheduler_patience: Plateau patience in epochs, ``>= 0``.
    scheduler_factor: Plateau/step LR multiplier, in ``[0, 1]``.
    step_size: Step scheduler period in epochs, ``>= 1``.
    use_amp: Low-precision compute (the reference's AMP); needs
      ``batch_size >= 4``. Used only when ``precision`` is None.
    criterion_type: ``'cross_entropy'`` or ``'focal'``.
    weighted_loss: Class weights ``N / (num_classes * count_c)``.
    focal_gamma: Focal loss exponent, ``>= 0``.
    precision: Dtype policy, as read by
      :func:`orchard_jax.core.precision.parse_policy`: ``'float32'``, a low
      dtype such as ``'bfloat16'`` (compute in it, params/output float32), or
      ``'params=float32,compute=bfloat16,output=float32'``. ``None`` (the
      default) derives it from ``use_amp``; see :func:`resolve_precision`.
    patience: Early stopping of a full run (:func:`orchard_jax.fit`): stop
      after this many epochs without improvement of ``monitor_metric``.
    use_tqdm: Show a per-epoch progress bar.
    use_tta: Accepted so that reference recipes load; test-time augmentation
      is not implemented, and ``True`` logs a warning when training starts.
  """

  seed: Int = Field(42, ge=0, le=SEED_MAX)
  batch_size: Int = Field(16, ge=1)
  epochs: Int = Field(60, ge=1)
  optimizer_type: Literal["sgd", "adamw"] = "sgd"
  learning_rate: float = Field(0.008, gt=1e-8, lt=1)
  min_lr: float = Field(1e-6, gt=1e-8, lt=1)
  momentum: float = Field(0.9, ge=0, lt=1)
  weight_decay: float = Field(5e-4, ge=0, le=0.2)
  grad_clip: Annotated[float | None, BeforeValidator(_zero_if_none)] = Field(1.0, ge=0, le=100)
  label_smoothing: float = Field(0.0, ge=0, le=0.3)
  mixup_alpha: float = Field(0.2, ge=0)
  mixup_epochs: Int = Field(20, ge=0)
  scheduler_type: Literal["cosine", "plateau", "step", "none"] = "cosine"
  monitor_metric: Name = "auc"
  monitor_direction: Literal["maximize", "minimize"] = "maximize"
  scheduler_patience: Int = Field(5, ge=0)
  scheduler_factor: float = Field(0.1, ge=0, le=1)
  step_size: Int = Field(20, ge=1)
  use_amp: bool = True
  criterion_type: Literal["cross_entropy", "focal"] = "cross_entropy"
  weighted_loss: bool = False
  focal_gamma: float = Field(2.0, ge=0)
  precision: Annotated[str | None, Says("None or a dtype policy str"),
                       AfterValidator(_check_precision)] = None
  # Keys of reference recipes, accepted so that a ``training:`` section loads unchanged.
  patience: Int = Field(15, ge=1)
  use_tqdm: bool = True
  use_tta: bool = False

  @pydantic.model_validator(mode="after")
  def _check_combinations(self) -> TrainingConfig:
    if self.use_amp and self.batch_size < 4:
      raise ConfigError(
          f"TrainingConfig.batch_size must be >= 4 when use_amp=True (AMP with "
          f"very small batches can give NaN gradients), got "
          f"batch_size={self.batch_size}; set use_amp=False or a larger batch")
    if self.min_lr > self.learning_rate:
      raise ConfigError(
          f"TrainingConfig.min_lr must be <= learning_rate, got "
          f"min_lr={brief(self.min_lr)}, learning_rate={brief(self.learning_rate)}")
    return self

  def resolved_precision(self, backend: str) -> str:
    """Shorthand for ``resolve_precision(self, backend)``."""
    return resolve_precision(self, backend)


_LOW_PRECISION_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def resolve_precision(cfg: TrainingConfig, backend: str) -> str:
  """The dtype policy string a run uses on ``backend``.

  ``cfg.precision`` when set (it overrides ``use_amp``). Otherwise the
  reference's ``use_amp`` (float16 autocast on CUDA) maps to ``'bfloat16'``
  on GPU/TPU backends and to ``'float32'`` on CPU, where low precision is not
  faster; ``use_amp=False`` gives ``'float32'``. Backends other than
  gpu/cuda/rocm/tpu get ``'float32'``, which is always correct.

  Args:
    cfg: The training config.
    backend: Backend name, normally ``jax.default_backend()`` (case ignored).
  """
  if not isinstance(backend, str) or not backend:
    raise ConfigError(f"backend must be a non-empty str, got {show(backend)}")
  if cfg.precision is not None:
    return cfg.precision
  if cfg.use_amp and backend.lower() in _LOW_PRECISION_BACKENDS:
    return "bfloat16"
  return "float32"


@validated
class OptunaConfig(_Config):
  """Study settings (the reference's ``optuna:`` parts the loop reads).

  The metric and its direction are ``TrainingConfig.monitor_metric`` and
  ``monitor_direction``; they are not repeated here.

  Attributes:
    study_name: Optuna study name (non-empty). A recipe also makes it the run
      folder's name, so there it must be a safe folder name (see
      :func:`orchard_jax.study.checks.folder_name`).
    n_trials: Trials to run, ``>= 1``.
    epochs: Epochs of each trial, ``>= 1``.
    timeout: Study time limit in seconds, ``> 0``; None means no limit.
    enable_pruning: Whether trials report to a pruner and may be pruned.
    pruning_warmup_epochs: First epoch at which a trial may be pruned,
      ``>= 0``; must be ``< epochs`` when pruning.
    pruner_type: ``'median'``, ``'percentile'`` (25th), ``'hyperband'`` or
      ``'none'``; ``'none'`` needs ``enable_pruning=False``.
    sampler_type: ``'tpe'``, ``'cmaes'`` or ``'random'``.
    storage: ``'sqlite'`` (a file the caller places), ``'memory'``, or a
      database URL such as ``'postgresql://user:pass@host/db'`` or
      ``'sqlite:///path/study.db'``.
    load_if_exists: Resume a stored study of the same name.
    n_jobs: Trials run in parallel, ``>= 1``.
    cohort_size: Trials trained together in one vmapped program, ``>= 1``;
      1 (the default) trains each trial alone.
    search_space_preset: ``'quick'`` or ``'full'``.
    enable_early_stopping: Stop the study once trials reach the threshold.
    early_stopping_threshold: Metric value that counts as reached, any finite
      float (task adapters report their own metrics; a recipe narrows it to
      ``[0, 1]`` for auc/accuracy/f1 and ``>= 0`` for loss); None lets the
      study pick one from the metric.
    early_stopping_patience: Consecutive trials at the threshold that stop
      the study, ``>= 1``.
  """

  study_name: Name = "orchard_jax"
  n_trials: Int = Field(50, ge=1)
  epochs: Int = Field(15, ge=1)
  timeout: float | None = Field(None, gt=0)
  enable_pruning: bool = True
  pruning_warmup_epochs: Int = Field(5, ge=0)
  pruner_type: Literal["median", "percentile", "hyperband", "none"] = "median"
  sampler_type: Literal["tpe", "cmaes", "random"] = "tpe"
  storage: Annotated[str, Field(pattern=_STORAGE), _STORAGE_SAYS] = "sqlite"
  load_if_exists: bool = True
  n_jobs: Int = Field(1, ge=1)
  cohort_size: Int = Field(1, ge=1)
  search_space_preset: Literal["quick", "full"] = "full"
  enable_early_stopping: bool = True
  early_stopping_threshold: float | None = None
  early_stopping_patience: Int = Field(2, ge=1)

  _NOT_READ: ClassVar[Mapping[str, str]] = {
      "metric_name": "the metric is TrainingConfig.monitor_metric",
      "direction": "the direction is TrainingConfig.monitor_direction",
      "storage_type": "use storage='sqlite', 'memory' or a database URL",
      "storage_path": "use storage='sqlite:///path/study.db'",
      "postgresql_url": "use storage='postgresql://user:pass@host/db'",
  }

  @pydantic.model_validator(mode="after")
  def _check_combinations(self) -> OptunaConfig:
    if self.enable_pruning and self.pruner_type == "none":
      raise ConfigError(
          "OptunaConfig.pruner_type must be 'median', 'percentile' or "
          "'hyperband' when enable_pruning=True, got 'none'; or set "
          "enable_pruning=False")
    if self.enable_pruning and self.pruning_warmup_epochs >= self.epochs:
      raise ConfigError(
          f"OptunaConfig.pruning_warmup_epochs must be < epochs when "
          f"enable_pruning=True, got pruning_warmup_epochs="
          f"{self.pruning_warmup_epochs}, epochs={self.epochs}")
    return self


# TrialConfig checks: objects rather than recipe values. Each raises a ValueError with what
# follows the field's name in the message.


def _closest_metric(name: str) -> str:
  """The did-you-mean of a metric name: a metric it abbreviates ('acc'), else the closest."""
  prefixed = [m for m in DEFAULT_METRICS if len(name) >= 2 and m.startswith(name.lower())]
  return f" (did you mean {prefixed[0]!r}?)" if prefixed else closest(name, DEFAULT_METRICS)


def _check(test: Callable[[Any], bool], allowed: str) -> AfterValidator:
  """A field check: None, or ``test(value)``; else '<field> must be <allowed>, got <value>'."""
  def check(value: Any) -> Any:
    if value is None:
      return None
    if not test(value):
      raise ValueError(f"must be {allowed}, got {show(value)}")
    return value
  return AfterValidator(check)


def _present(value: Any) -> Any:
  if value is None:
    raise ValueError("is required, got None")
  return value


def _section(cls: type[_C]) -> BeforeValidator:
  def check(value: Any) -> _C:
    if isinstance(value, Mapping):
      return cls.from_dict(value)
    if not isinstance(value, cls):
      raise ValueError(f"must be a {cls.__name__} or a mapping, got {show(value)}")
    return value
  return BeforeValidator(check)


def _is_count(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def _devices(value: Any) -> int | tuple[int, ...] | None:
  if value is None:
    return None
  if isinstance(value, int) and not isinstance(value, bool):
    if value < 1:
      raise ValueError(f"must be >= 1, got {brief(value)}")
    return value
  if isinstance(value, (list, tuple)) and value and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    return tuple(value)
  raise ValueError(f"must be None, a device count >= 1 or a non-empty list of device ids, "
                   f"got {show(value)}")


def _input_shape(value: Any) -> tuple[int, ...] | None:
  if value is None:
    return None
  if not isinstance(value, (tuple, list)) or not value or not all(map(_is_count, value)):
    raise ValueError(
        f"must be None or a non-empty tuple of ints >= 1 (the per-sample shape, channels "
        f"last, e.g. (28, 28, 1)), got {brief(value)}")
  return tuple(int(d) for d in value)


def _fallback(value: Any) -> Mapping[str, float] | None:
  if value is None:
    return None
  if not isinstance(value, Mapping) or not all(
      isinstance(k, str) and isinstance(v, numbers.Real)
      and not isinstance(v, bool) for k, v in value.items()):
    raise ValueError(
        f"must be None or a mapping of metric names (str) to numbers, got {brief(value)}")
  return MappingProxyType({k: float(v) for k, v in value.items()})


def _is_path(value: Any) -> bool:
  return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))


def _labels(value: Any) -> Any:
  if value is None:
    return None
  import numpy as np  # numpy only; loading a config never imports jax
  labels = np.asarray(value)
  if labels.dtype.kind not in "iu" or labels.ndim != 1 or labels.size == 0:
    raise ValueError(
        f"must be None or a non-empty 1-D array of integer class ids, "
        f"got dtype {labels.dtype}, shape {labels.shape}")
  return labels


_LOADER = ("an iterable of (inputs, labels) batches such as a torch DataLoader",
           lambda v: hasattr(v, "__iter__"))
Required = Annotated[Any, AfterValidator(_present)]
Loader = Annotated[Any, AfterValidator(_present), _check(_LOADER[1], _LOADER[0])]
Adapter = Annotated[Any, _check(callable, "None or a callable")]


@validated(eq=False)
class TrialConfig(_Config):
  """Everything one trial (or one :func:`orchard_jax.engine.fit` run) reads.

  Frozen and checked like :class:`TrainingConfig`; it holds objects (a model,
  loaders) rather than recipe values, so it compares by identity. A typical
  objective builds one per trial::

    def objective(trial):
      training = base.replace(learning_rate=trial.suggest_float("lr", 1e-4, 0.1, log=True))
      return run_trial(trial, TrialConfig(model=model, train_loader=train,
                                          val_loader=val, num_classes=10,
                                          training=training, optuna=optuna_cfg))

  Attributes:
    model: A flax Linen or NNX module or an ``orchard_jax.models.Model``.
      Reuse one model (or equal ones) across trials: the compiled steps are
      cached on it.
    train_loader: Iterable of ``(inputs, labels)`` training batches, e.g. a
      torch DataLoader (see :func:`orchard_jax.data.make_loader`). A torch
      DataLoader with a ``generator`` is reseeded with ``training.seed`` at the
      start of every run, so the same config gives the same result.
    val_loader: Iterable of ``(inputs, labels)`` validation batches.
    num_classes: Number of classes, ``>= 2``.
    training: A :class:`TrainingConfig`, or a mapping given to its
      ``from_dict``. A trial trains ``optuna.epochs`` epochs with
      ``mixup_epochs`` capped to them; :func:`~orchard_jax.engine.fit` trains
      ``training.epochs``.
    optuna: An :class:`OptunaConfig`, or a mapping. The loop reads
      ``epochs``, ``enable_pruning`` and ``pruning_warmup_epochs``.
    log_interval: Log a progress line every ``log_interval`` epochs (and at
      the last one), ``>= 1``.
    input_shape: Per-sample input shape, channels last (e.g. ``(8, 8, 1)``);
      None takes it from the first training batch.
    layout: ``'NCHW'`` (torch's convention) or ``'NHWC'``, for 4-D inputs.
    train_labels: Training labels for ``training.weighted_loss``; None reads
      them from one pass over ``train_loader`` when weights are needed.
    train_epoch_fn: Task adapter replacing
      :func:`orchard_jax.engine.train_epoch` (same signature:
      ``fn(state, loader, *, epoch, layout) -> (state, loss)``), e.g. to
      train with a custom loss step.
    validate_fn: Task adapter replacing :func:`orchard_jax.engine.evaluate`:
      ``fn(state, loader, *, epoch, layout) -> Mapping[str, float]``. Values
      may be device arrays; they are fetched inside the fallback's guard.
      Without it, ``training.monitor_metric`` must be one of the default
      validation's metrics (:data:`DEFAULT_METRICS`: ``'auc'``,
      ``'accuracy'``, ``'f1'``, ``'loss'``), with ``monitor_direction``
      ``'minimize'`` for ``'loss'`` and ``'maximize'`` for the others, as
      the command line requires.
    fallback_metrics: Metrics an epoch uses when validation fails; None means
      ``{'loss': 999.0}``. The monitored metric is added with ``0.0`` when
      missing. Stored read-only.
    output_dir: Where the best state is written with orbax-checkpoint (see
      :func:`orchard_jax.engine.load_best_state`); None keeps it in memory only.
    devices: Local devices a run trains on, data-parallel: None for all of
      them (one device when only one is present), an int ``n`` for the first
      ``n``, or a tuple of device ids. The batch is split over the devices
      (its size must be divisible by their count) and the state replicated.
    reraise_errors: :func:`~orchard_jax.engine.run_trial` re-raises a run-time
      failure (divergence, three failed validations; Optuna then marks the
      trial FAIL) instead of returning the worst value. Configuration, setup
      and data errors, which would fail every trial, are raised either way.
  """

  model: Required
  train_loader: Loader
  val_loader: Loader
  num_classes: Annotated[Int, BeforeValidator(_present)] = Field(ge=2)
  training: Annotated[TrainingConfig, _section(TrainingConfig)] = TrainingConfig()
  optuna: Annotated[OptunaConfig, _section(OptunaConfig)] = OptunaConfig()
  log_interval: Int = Field(10, ge=1)
  input_shape: Annotated[Any, AfterValidator(_input_shape)] = None
  layout: Literal["NCHW", "NHWC"] = "NCHW"
  train_labels: Annotated[Any, AfterValidator(_labels)] = None
  train_epoch_fn: Adapter = None
  validate_fn: Adapter = None
  fallback_metrics: Annotated[Any, AfterValidator(_fallback)] = None
  output_dir: Annotated[Any, _check(_is_path, "None or a non-empty path (str or os.PathLike)"),
                        AfterValidator(lambda v: None if v is None else os.fspath(v))] = None
  reraise_errors: bool = False
  devices: Annotated[Any, AfterValidator(_devices)] = None

  @pydantic.model_validator(mode="after")
  def _check_combinations(self) -> TrialConfig:
    if self.validate_fn is not None:  # a task adapter names its own metrics
      return self
    metric, direction = self.training.monitor_metric, self.training.monitor_direction
    if metric not in DEFAULT_METRICS:
      raise ConfigError(
          f"TrialConfig.training.monitor_metric must be one of "
          f"{', '.join(map(repr, DEFAULT_METRICS))} (the metrics the default validation "
          f"computes; pass validate_fn= for others), got {brief(metric)}"
          f"{_closest_metric(metric)}")
    if (metric == "loss") != (direction == "minimize"):
      raise ConfigError(
          f"TrialConfig.training.monitor_direction must be 'minimize' for 'loss' and "
          f"'maximize' for {', '.join(map(repr, DEFAULT_METRICS[:3]))}, got monitor_metric="
          f"{brief(metric)}, monitor_direction={brief(direction)}")
    return self
