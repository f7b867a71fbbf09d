"""Frozen, validated configuration for orchard_jax trials.

Two value objects hold every setting the trial loop reads:

* :class:`TrainingConfig`: the reference's ``training:`` section (same field
  names, defaults and ranges), plus ``precision``.
* :class:`OptunaConfig`: the parts of the reference's ``optuna:`` section that
  the study and the loop read.

:class:`TrialConfig` bundles them with what one trial trains: the model, the
data loaders and optional task adapters.

Both are frozen, hashable, keyword-only dataclasses. They are checked whenever
one is built, so also by :meth:`~_Config.replace` and :meth:`~_Config.from_dict`.
Every problem raises :class:`ConfigError`, a ``ValueError`` whose message names
the class, the field, the value received and what is allowed::

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
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

__all__ = ["ConfigError", "DEFAULT_METRICS", "TrainingConfig", "OptunaConfig", "TrialConfig",
           "resolve_precision"]

_C = TypeVar("_C", bound="_Config")
_REFUSE = object()  # Sentinel: None is not an allowed value.


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


def _show(value: Any) -> str:
  return f"{brief(value)} ({type(value).__name__})"


def _closest(word: str, allowed: Any) -> str:
  match = difflib.get_close_matches(word.lower(), list(allowed), n=1, cutoff=0.6)
  return f" (did you mean {match[0]!r}?)" if match else ""


def _bound(x: float) -> str:
  return format(x, "g")


# Field checks. Each takes (where, value) and returns the normalised value.


@dataclasses.dataclass(frozen=True)
class _Int:
  lo: int | None = None
  hi: int | None = None

  def __call__(self, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise ConfigError(f"{where} must be an int, got {_show(value)}")
    if self.hi is not None and not self.lo <= value <= self.hi:
      raise ConfigError(f"{where} must be in [{self.lo}, {self.hi}], got {brief(value)}")
    if self.lo is not None and value < self.lo:
      raise ConfigError(f"{where} must be >= {self.lo}, got {brief(value)}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class _Float:
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  none: Any = _REFUSE  # What None becomes; _REFUSE: None is an error.

  def allowed(self) -> str:
    if self.hi is None:
      return f"{'>' if self.lo_open else '>='} {_bound(self.lo)}"
    left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
    return f"in {left}{_bound(self.lo)}, {_bound(self.hi)}{right}"

  def __call__(self, where: str, value: Any) -> float | None:
    if value is None and self.none is not _REFUSE:
      return self.none
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      kind = "a float" if self.none is _REFUSE else "a float or None"
      raise ConfigError(f"{where} must be {kind}, got {_show(value)}")
    raw, value = value, float(value)
    if not math.isfinite(value):
      raise ConfigError(f"{where} must be a finite float, got {brief(raw)}")
    too_low = self.lo is not None and (
        value <= self.lo if self.lo_open else value < self.lo)
    too_high = self.hi is not None and (
        value >= self.hi if self.hi_open else value > self.hi)
    if too_low or too_high:
      raise ConfigError(f"{where} must be {self.allowed()}, got {brief(raw)}")
    return value


def _bool(where: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise ConfigError(f"{where} must be True or False, got {_show(value)}")
  return value


def _name(where: str, value: Any) -> str:
  if not isinstance(value, str) or not value.strip():
    raise ConfigError(f"{where} must be a non-empty str, got {_show(value)}")
  return value


@dataclasses.dataclass(frozen=True)
class _Choice:
  options: tuple[str, ...]

  def __call__(self, where: str, value: Any) -> str:
    if value not in self.options or not isinstance(value, str):
      hint = _closest(value, self.options) if isinstance(value, str) else ""
      allowed = ", ".join(map(repr, self.options))
      raise ConfigError(
          f"{where} must be one of {allowed}, got {brief(value)}{hint}")
    return value


_POLICY_MAX = 100  # 'params=bfloat16,compute=bfloat16,output=bfloat16' has 49


def _check_precision(where: str, value: Any) -> str | None:
  """None, or a policy string that ``core.precision.parse_policy`` accepts.

  The parser is imported here, not at module level, so that loading or
  building a config without ``precision`` never imports jax.
  """
  if value is None:
    return None
  if not isinstance(value, str):
    raise ConfigError(
        f"{where} must be None or a dtype policy str, got {_show(value)}")
  if len(value) > _POLICY_MAX:
    raise ConfigError(
        f"{where} must be a dtype policy str of at most {_POLICY_MAX} characters, such as "
        f"'bfloat16' or 'params=float32,compute=bfloat16,output=float32', got {brief(value)}")
  from orchard_jax.core.precision import parse_policy
  try:
    parse_policy(value)
  except ValueError as e:
    # parse_policy's message quotes the value: capped there too.
    raise ConfigError(f"{where}={brief(value)} is invalid: "
                      f"{str(e).replace(repr(value), brief(value))}") from e
  return value


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S*")


def _check_storage(where: str, value: Any) -> str:
  if isinstance(value, str) and (value in ("sqlite", "memory")
                                 or _URL.fullmatch(value)):
    return value
  shown = re.sub(r"//[^/@]*@", "//***@", value) if isinstance(value, str) else value
  raise ConfigError(
      f"{where} must be 'sqlite', 'memory' or a database URL such as "
      f"'postgresql://user:pass@host/db' or 'sqlite:///path/study.db', "
      f"got {brief(shown)}")


def _field(default: Any, check: Callable[[str, Any], Any]) -> Any:
  return dataclasses.field(default=default, metadata={"check": check})


class _Config:
  """Shared behaviour: unknown-field refusal, checks, dict I/O, replace."""

  __slots__ = ()
  # Keys of the reference's section that orchard_jax does not read: why.
  _NOT_READ: ClassVar[Mapping[str, str]] = {}

  def __new__(cls, *args: Any, **kwargs: Any):
    # Runs before the generated __init__, so an unknown keyword gets a
    # ConfigError with a suggestion instead of a bare TypeError.
    cls._refuse_unknown(kwargs)
    return super().__new__(cls)

  def __post_init__(self) -> None:
    owner = type(self).__name__
    for f in dataclasses.fields(self):
      checked = f.metadata["check"](f"{owner}.{f.name}", getattr(self, f.name))
      object.__setattr__(self, f.name, checked)
    self._check_combinations()

  def _check_combinations(self) -> None:
    """Checks that involve several fields; run after the per-field checks."""

  @classmethod
  def _refuse_unknown(cls, keys: Any) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
      if not isinstance(key, str):
        raise ConfigError(f"{cls.__name__} field names must be str, got {_show(key)}")
      if key in names:
        continue
      if key in cls._NOT_READ:
        raise ConfigError(
            f"{cls.__name__} has no field {brief(key)}: {cls._NOT_READ[key]}; "
            f"remove it")
      hint = _closest(key, names) or f"; valid fields: {', '.join(names)}"
      raise ConfigError(f"{cls.__name__} has no field {brief(key)}{hint}")

  @classmethod
  def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
    """Builds a config from a mapping, e.g. a recipe section from yaml.safe_load.

    Unknown keys are refused, naming the closest field. Missing keys take
    their defaults. For float fields a numeric string is parsed: PyYAML reads
    ``1e-6`` (no dot) as the string ``'1e-6'``, and reference recipes write
    ``min_lr: 1e-6``. Every other value must already have the right type.
    """
    if not isinstance(data, Mapping):
      raise ConfigError(
          f"{cls.__name__}.from_dict expects a mapping, got {_show(data)}")
    cls._refuse_unknown(data)
    kwargs = dict(data)
    for f in dataclasses.fields(cls):
      value = kwargs.get(f.name)
      if isinstance(f.metadata["check"], _Float) and isinstance(value, str):
        try:
          kwargs[f.name] = float(value)
        except ValueError:
          pass  # Left as is: the field check names the bad string.
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    """Every field by name; ``from_dict(cfg.to_dict()) == cfg``."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def replace(self: _C, **changes: Any) -> _C:
    """A copy with ``changes`` applied, checked like a new config."""
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
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

  seed: int = _field(42, _Int(lo=0, hi=SEED_MAX))
  batch_size: int = _field(16, _Int(lo=1))
  epochs: int = _field(60, _Int(lo=1))
  optimizer_type: str = _field("sgd", _Choice(("sgd", "adamw")))
  learning_rate: float = _field(0.008, _Float(1e-8, 1, lo_open=True, hi_open=True))
  min_lr: float = _field(1e-6, _Float(1e-8, 1, lo_open=True, hi_open=True))
  momentum: float = _field(0.9, _Float(0, 1, hi_open=True))
  weight_decay: float = _field(5e-4, _Float(0, 0.2))
  grad_clip: float | None = _field(1.0, _Float(0, 100, none=0.0))
  label_smoothing: float = _field(0.0, _Float(0, 0.3))
  mixup_alpha: float = _field(0.2, _Float(lo=0))
  mixup_epochs: int = _field(20, _Int(lo=0))
  scheduler_type: str = _field(
      "cosine", _Choice(("cosine", "plateau", "step", "none")))
  monitor_metric: str = _field("auc", _name)
  monitor_direction: str = _field("maximize", _Choice(("maximize", "minimize")))
  scheduler_patience: int = _field(5, _Int(lo=0))
  scheduler_factor: float = _field(0.1, _Float(0, 1))
  step_size: int = _field(20, _Int(lo=1))
  use_amp: bool = _field(True, _bool)
  criterion_type: str = _field("cross_entropy", _Choice(("cross_entropy", "focal")))
  weighted_loss: bool = _field(False, _bool)
  focal_gamma: float = _field(2.0, _Float(lo=0))
  precision: str | None = _field(None, _check_precision)
  # Keys of reference recipes, accepted so that a ``training:`` section loads unchanged.
  patience: int = _field(15, _Int(lo=1))
  use_tqdm: bool = _field(True, _bool)
  use_tta: bool = _field(False, _bool)

  def _check_combinations(self) -> None:
    if self.use_amp and self.batch_size < 4:
      raise ConfigError(
          f"TrainingConfig.batch_size must be >= 4 when use_amp=True (AMP with "
          f"very small batches can give NaN gradients), got "
          f"batch_size={self.batch_size}; set use_amp=False or a larger batch")
    if self.min_lr > self.learning_rate:
      raise ConfigError(
          f"TrainingConfig.min_lr must be <= learning_rate, got "
          f"min_lr={brief(self.min_lr)}, learning_rate={brief(self.learning_rate)}")

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
    raise ConfigError(f"backend must be a non-empty str, got {_show(backend)}")
  if cfg.precision is not None:
    return cfg.precision
  if cfg.use_amp and backend.lower() in _LOW_PRECISION_BACKENDS:
    return "bfloat16"
  return "float32"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
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

  study_name: str = _field("orchard_jax", _name)
  n_trials: int = _field(50, _Int(lo=1))
  epochs: int = _field(15, _Int(lo=1))
  timeout: float | None = _field(None, _Float(lo=0, lo_open=True, none=None))
  enable_pruning: bool = _field(True, _bool)
  pruning_warmup_epochs: int = _field(5, _Int(lo=0))
  pruner_type: str = _field(
      "median", _Choice(("median", "percentile", "hyperband", "none")))
  sampler_type: str = _field("tpe", _Choice(("tpe", "cmaes", "random")))
  storage: str = _field("sqlite", _check_storage)
  load_if_exists: bool = _field(True, _bool)
  n_jobs: int = _field(1, _Int(lo=1))
  cohort_size: int = _field(1, _Int(lo=1))
  search_space_preset: str = _field("full", _Choice(("quick", "full")))
  enable_early_stopping: bool = _field(True, _bool)
  early_stopping_threshold: float | None = _field(None, _Float(none=None))
  early_stopping_patience: int = _field(2, _Int(lo=1))

  _NOT_READ: ClassVar[Mapping[str, str]] = {
      "metric_name": "the metric is TrainingConfig.monitor_metric",
      "direction": "the direction is TrainingConfig.monitor_direction",
      "storage_type": "use storage='sqlite', 'memory' or a database URL",
      "storage_path": "use storage='sqlite:///path/study.db'",
      "postgresql_url": "use storage='postgresql://user:pass@host/db'",
  }

  def _check_combinations(self) -> None:
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


# TrialConfig checks: objects rather than recipe values.


def _closest_metric(name: str) -> str:
  """The did-you-mean of a metric name: a metric it abbreviates ('acc'), else the closest."""
  prefixed = [m for m in DEFAULT_METRICS if len(name) >= 2 and m.startswith(name.lower())]
  return f" (did you mean {prefixed[0]!r}?)" if prefixed else _closest(name, DEFAULT_METRICS)

_REQUIRED = object()  # Sentinel default of the fields a TrialConfig must be given.


def _present(where: str, value: Any) -> Any:
  if value is _REQUIRED:
    raise ConfigError(f"{where} is required; pass {where.split('.')[-1]}=...")
  if value is None:
    raise ConfigError(f"{where} is required, got None")
  return value


def _required(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
  def checked(where: str, value: Any) -> Any:
    return check(where, _present(where, value))
  return checked


def _loader(where: str, value: Any) -> Any:
  if not hasattr(value, "__iter__"):
    raise ConfigError(
        f"{where} must be an iterable of (inputs, labels) batches such as a "
        f"torch DataLoader, got {_show(value)}")
  return value


def _optional_callable(where: str, value: Any) -> Any:
  if value is not None and not callable(value):
    raise ConfigError(f"{where} must be None or a callable, got {_show(value)}")
  return value


def _section(cls: type[_C]) -> Callable[[str, Any], _C]:
  def check(where: str, value: Any) -> _C:
    if isinstance(value, cls):
      return value
    if isinstance(value, Mapping):
      return cls.from_dict(value)
    raise ConfigError(
        f"{where} must be a {cls.__name__} or a mapping, got {_show(value)}")
  return check


def _devices(where: str, value: Any) -> int | tuple[int, ...] | None:
  if value is None:
    return None
  if isinstance(value, int) and not isinstance(value, bool):
    if value < 1:
      raise ConfigError(f"{where} must be >= 1, got {brief(value)}")
    return value
  if isinstance(value, (list, tuple)) and value and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    return tuple(value)
  raise ConfigError(f"{where} must be None, a device count >= 1 or a non-empty list of device "
                    f"ids, got {_show(value)}")


def _input_shape(where: str, value: Any) -> tuple[int, ...] | None:
  if value is None:
    return None
  if (not isinstance(value, (tuple, list)) or not value or any(
      isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1
      for d in value)):
    raise ConfigError(
        f"{where} must be None or a non-empty tuple of ints >= 1 (the "
        f"per-sample shape, channels last, e.g. (28, 28, 1)), got {brief(value)}")
  return tuple(int(d) for d in value)


def _fallback(where: str, value: Any) -> Mapping[str, float] | None:
  if value is None:
    return None
  if not isinstance(value, Mapping) or not all(
      isinstance(k, str) and isinstance(v, numbers.Real)
      and not isinstance(v, bool) for k, v in value.items()):
    raise ConfigError(
        f"{where} must be None or a mapping of metric names (str) to numbers, "
        f"got {brief(value)}")
  return MappingProxyType({k: float(v) for k, v in value.items()})


def _directory(where: str, value: Any) -> str | None:
  if value is None:
    return None
  if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
    raise ConfigError(
        f"{where} must be None or a non-empty path (str or os.PathLike), "
        f"got {_show(value)}")
  return os.fspath(value)


def _labels(where: str, value: Any) -> Any:
  if value is None:
    return None
  import numpy as np  # numpy only; loading a config never imports jax
  labels = np.asarray(value)
  if labels.dtype.kind not in "iu" or labels.ndim != 1 or labels.size == 0:
    raise ConfigError(
        f"{where} must be None or a non-empty 1-D array of integer class ids, "
        f"got dtype {labels.dtype}, shape {labels.shape}")
  return labels


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
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

  model: Any = _field(_REQUIRED, _present)
  train_loader: Any = _field(_REQUIRED, _required(_loader))
  val_loader: Any = _field(_REQUIRED, _required(_loader))
  num_classes: int = _field(_REQUIRED, _required(_Int(lo=2)))
  training: TrainingConfig = _field(TrainingConfig(), _section(TrainingConfig))
  optuna: OptunaConfig = _field(OptunaConfig(), _section(OptunaConfig))
  log_interval: int = _field(10, _Int(lo=1))
  input_shape: tuple[int, ...] | None = _field(None, _input_shape)
  layout: str = _field("NCHW", _Choice(("NCHW", "NHWC")))
  train_labels: Any = _field(None, _labels)
  train_epoch_fn: Callable[..., Any] | None = _field(None, _optional_callable)
  validate_fn: Callable[..., Any] | None = _field(None, _optional_callable)
  fallback_metrics: Mapping[str, float] | None = _field(None, _fallback)
  output_dir: str | None = _field(None, _directory)
  reraise_errors: bool = _field(False, _bool)
  devices: int | tuple[int, ...] | None = _field(None, _devices)

  def _check_combinations(self) -> None:
    if self.validate_fn is not None:  # a task adapter names its own metrics
      return
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
