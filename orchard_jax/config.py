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
* ``TrainingConfig.augmentation`` (the reference's ``augmentation:`` section, an
  :class:`AugmentationConfig`) is off (None) by default; the reference always augments.
* ``OptunaConfig.storage`` is a single field: ``'sqlite'``, ``'memory'`` or a
  database URL. The reference uses storage_type, storage_path and
  postgresql_url. ``n_jobs`` must be ``>= 1`` (the reference also allows
  ``-1``), ``timeout`` must be ``> 0`` and the default ``study_name`` is
  ``'orchard_jax'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import Field

from orchard_jax.config_augment import AugmentationConfig
from orchard_jax.config_base import ConfigError, _Config, brief, closest, show, validated
from orchard_jax.config_fields import (Adapter, Devices, Fallback, InputShape, Int, Labels, Loader,
                                       Name, NoneAsZero, OutputDir, Precision, Required,
                                       RequiredInt, Storage, section)

__all__ = ["AugmentationConfig", "ConfigError", "DEFAULT_METRICS", "TrainingConfig", "OptunaConfig", "TrialConfig",
           "resolve_precision"]

SEED_MAX = 2**32 - 1  # numpy's and Optuna's samplers take seeds in [0, 2**32)
# The metrics the default validation (orchard_jax.engine.evaluate) returns; the
# command line's recipes allow the same (study.sections.RECIPE_METRICS).
DEFAULT_METRICS = ("auc", "accuracy", "f1", "loss")


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
    use_tta: Test-time augmentation at the final evaluation: the reference's ensemble
      (identity, flips, shift, zoom, blur, rotations; ``augmentation``'s ``tta_*``
      settings and dataset flags, or :class:`AugmentationConfig`'s defaults when
      ``augmentation`` is None) averaged over softmax probabilities, on the device. Used for
      the evaluation of a retrained best trial, never inside trials, as in the reference.
    augmentation: Training augmentation on the device (see
      :mod:`orchard_jax.config_augment`): an :class:`AugmentationConfig` (or a mapping)
      applies the reference's flip, rotation, colour jitter and resized crop inside the
      training step, with the trial's strengths in its state; None (the default) trains on
      the batches as the loader gives them (a DataLoader's own transforms stay the only
      ones). Not a key of a recipe's ``training:`` section: recipes have an
      ``augmentation:`` section.
  """

  seed: Int = Field(42, ge=0, le=SEED_MAX)
  batch_size: Int = Field(16, ge=1)
  epochs: Int = Field(60, ge=1)
  optimizer_type: Literal["sgd", "adamw"] = "sgd"
  learning_rate: float = Field(0.008, gt=1e-8, lt=1)
  min_lr: float = Field(1e-6, gt=1e-8, lt=1)
  momentum: float = Field(0.9, ge=0, lt=1)
  weight_decay: float = Field(5e-4, ge=0, le=0.2)
  grad_clip: NoneAsZero = Field(1.0, ge=0, le=100)
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
  precision: Precision = None
  # Keys of reference recipes, accepted so that a ``training:`` section loads unchanged.
  patience: Int = Field(15, ge=1)
  use_tqdm: bool = True
  use_tta: bool = False
  augmentation: Annotated[AugmentationConfig | None,
                          section(AugmentationConfig, optional=True)] = None

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

  def to_dict(self) -> dict[str, Any]:
    """Every field by name, ``augmentation`` as a mapping (or None): plain data."""
    out = _Config.to_dict(self)
    out["augmentation"] = None if self.augmentation is None else self.augmentation.to_dict()
    return out

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
    pruner_type: ``'median'``, ``'percentile'`` (25th), ``'hyperband'``,
      ``'successive_halving'``, ``'same_epoch'`` (a trial against every trial at
      its epoch, cohort peers included: see
      :class:`orchard_jax.engine.pruning.SameEpochPruner`) or ``'none'``;
      ``'none'`` needs ``enable_pruning=False``. None (the default): ``'median'``
      with ``cohort_size`` 1, as the reference, and ``'successive_halving'`` for
      cohorts (it reached a good value soonest: docs/performance.md).
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
  pruner_type: Literal["median", "percentile", "hyperband", "successive_halving", "same_epoch",
                       "none"] | None = None
  sampler_type: Literal["tpe", "cmaes", "random"] = "tpe"
  storage: Storage = "sqlite"
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
          "OptunaConfig.pruner_type must be 'median', 'percentile', 'hyperband', "
          "'successive_halving', 'same_epoch' or null when enable_pruning=True, got 'none'; "
          "or set enable_pruning=False")
    if self.enable_pruning and self.pruning_warmup_epochs >= self.epochs:
      raise ConfigError(
          f"OptunaConfig.pruning_warmup_epochs must be < epochs when "
          f"enable_pruning=True, got pruning_warmup_epochs="
          f"{self.pruning_warmup_epochs}, epochs={self.epochs}")
    return self

  @property
  def pruner(self) -> str:
    """The pruner the study uses: :attr:`pruner_type`, or its default for the cohort size."""
    if not self.enable_pruning:
      return "none"
    if self.pruner_type is not None:
      return self.pruner_type
    return "median" if self.cohort_size == 1 else "successive_halving"


def _closest_metric(name: str) -> str:
  """The did-you-mean of a metric name: a metric it abbreviates ('acc'), else the closest."""
  prefixed = [m for m in DEFAULT_METRICS if len(name) >= 2 and m.startswith(name.lower())]
  return f" (did you mean {prefixed[0]!r}?)" if prefixed else closest(name, DEFAULT_METRICS)


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
  num_classes: RequiredInt = Field(ge=2)
  training: Annotated[TrainingConfig, section(TrainingConfig)] = TrainingConfig()
  optuna: Annotated[OptunaConfig, section(OptunaConfig)] = OptunaConfig()
  log_interval: Int = Field(10, ge=1)
  input_shape: InputShape = None
  layout: Literal["NCHW", "NHWC"] = "NCHW"
  train_labels: Labels = None
  train_epoch_fn: Adapter = None
  validate_fn: Adapter = None
  fallback_metrics: Fallback = None
  output_dir: OutputDir = None
  reraise_errors: bool = False
  devices: Devices = None

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
