"""The one pytree a trial trains: parameters, optimizer, loss scale, RNG, hyperparameters.

Everything that differs between trials of a study is an array in
:class:`TrainState`; only the *structure* (model, optimizer kind, criterion,
precision policy, input shape, whether MixUp can run, which augmentation runs) is
static, in :class:`StepSpec`. Two trials with equal specs therefore share one compiled
``train_step``, and states of equal spec can be stacked and vmapped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from orchard_jax.core import optim
from orchard_jax.core.augment import AugmentParams, AugmentSpec
from orchard_jax.core.losses import CRITERIA
from orchard_jax.core.precision import LossScale, Policy, loss_scale_for, parse_policy


class Hyperparams(NamedTuple):
  """Per-trial scalars the step reads (the optimizer's live in ``opt_state``)."""
  mixup_alpha: jax.Array | None  # float32 []; None when the spec has no MixUp
  mixup_on: jax.Array | None     # bool []; switched off after ``mixup_epochs``; None likewise
  label_smoothing: jax.Array  # float32 []
  focal_gamma: jax.Array      # float32 []
  class_weights: jax.Array    # float32 [num_classes]; ones when unweighted
  # The augmentation strengths (float32 [] each); None when the spec has no augmentation.
  augment: AugmentParams | None = None


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What a compiled step depends on. Hashable; equal specs share compiled code."""
  model: Any                    # an ``orchard_jax.models.Model`` (hashable, compares by value)
  optimizer: str                # "sgd" | "adamw"
  criterion: str                # "cross_entropy" | "focal"
  policy: Policy
  input_shape: tuple[int, ...]  # per-sample shape, e.g. (28, 28, 1)
  num_classes: int
  # Whether the training step contains MixUp. False for a state built with
  # mixup_alpha=0, which could never mix: its step compiles without MixUp's
  # Gamma sampler and permutation, in 0.68-0.71x MiniCNN's compile time
  # (benchmarks/compile_mixup.py).
  mixup: bool = True
  # The augmentation the training step applies (flags, channels, normalisation), or None
  # for a step without any (:func:`augmentation_spec`). The strengths are per trial, in
  # ``Hyperparams.augment``: trials differing only in them share this spec.
  augment: AugmentSpec | None = None

  def __post_init__(self):
    if self.optimizer not in optim.OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {optim.OPTIMIZERS}, got optimizer={self.optimizer!r}")
    if self.criterion not in CRITERIA:
      raise ValueError(f"criterion must be one of {CRITERIA}, got criterion={self.criterion!r}")
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got num_classes={self.num_classes}")

  @property
  def tx(self) -> optax.GradientTransformation:
    return optim.optimizer(self.optimizer)


class TrainState(struct.PyTreeNode):
  """A trial's whole training state, donated to and returned by ``train_step``."""
  step: jax.Array            # int32 []
  params: Any                # trainable parameters, in the policy's param dtype
  model_state: Any           # e.g. BatchNorm running statistics (float32)
  opt_state: optax.OptState  # hyperparameters (learning rate, ...) inside
  loss_scale: LossScale      # dynamic for float16 compute, static 1.0 otherwise
  rng: jax.Array             # base key; each step folds in ``step``
  hparams: Hyperparams
  spec: StepSpec = struct.field(pytree_node=False)

  @property
  def learning_rate(self) -> jax.Array:
    return optim.get_hyperparam(self.opt_state, "learning_rate")

  def with_learning_rate(self, learning_rate: float) -> "TrainState":
    """The same state with the epoch's learning rate written into the optimizer.

    The new scalar is placed as the one it replaces (see :func:`placed_like`),
    so the next step's arguments have the same placement and it compiles
    nothing.
    """
    value = placed_like(learning_rate, np.float32, self.learning_rate)
    return self.replace(opt_state=optim.set_hyperparams(self.opt_state, learning_rate=value))

  def with_mixup(self, enabled: bool) -> "TrainState":
    """The same state with MixUp switched on or off (no recompilation).

    A state built with ``mixup_alpha=0`` has no MixUp to switch
    (``spec.mixup`` is False) and is returned as it is: it never mixes. The
    switch is placed as the one it replaces (see :func:`placed_like`).
    """
    if not self.spec.mixup:
      return self
    value = placed_like(enabled, np.bool_, self.hparams.mixup_on)
    return self.replace(hparams=self.hparams._replace(mixup_on=value))


def default_device() -> jax.Device:
  """The device an array without a placement goes to (``jax_default_device``, else the first
  local device)."""
  chosen = jax.config.jax_default_device
  if chosen is None:
    return jax.local_devices()[0]
  if isinstance(chosen, str):
    return jax.local_devices(backend=chosen)[0]
  return chosen


def on_device(state: TrainState, device: jax.Device) -> TrainState:
  """``state`` with every array committed to ``device`` (those committed there already are
  not copied)."""
  return jax.device_put(state, jax.sharding.SingleDeviceSharding(device))


def placed_like(value, dtype: type[np.generic], like: jax.Array | None) -> jax.Array:
  """``value`` as a ``dtype`` array (a scalar, or one per cohort member) placed as ``like``: on
  its sharding, committed when it is.

  A jitted step compiles again when an argument's placement changes, and a
  device's arrays differ there in being *committed* to it or not: an array
  made by ``jax.device_put(x)`` without a device is not, one put on a device
  or sharding (or computed from one that is) is. A per-epoch scalar that
  replaces a field of the state therefore takes that field's placement, so
  the state keeps one placement from its first step to its last (on one
  device: committed to it; on a mesh: replicated over it). Under a trace
  (``like`` a tracer) this is :func:`orchard_jax.core.optim.scalar`.
  """
  if like is None or isinstance(like, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
    return optim.scalar(value, dtype)
  if isinstance(value, jax.Array):  # stays on the device: no host sync
    value = value if value.dtype == dtype else value.astype(dtype)
  else:
    value = np.asarray(value, dtype)
  return jax.device_put(value, like.sharding) if like.committed else jax.device_put(value)


def augmentation_spec(augmentation: Any, input_shape: tuple[int, ...]) -> AugmentSpec | None:
  """The static part of ``augmentation`` (an :class:`orchard_jax.AugmentationConfig`, or None)
  for inputs of ``input_shape`` (channels last): flip and rotation unless
  ``is_anatomical``, colour jitter unless ``is_texture_based``, with saturation for 3-channel
  inputs (the reference's RGB), and the inputs' ``mean``/``std``.

  Raises:
    ValueError: the inputs are not images ``(H, W, C)``, or ``mean``/``std`` do not have
      one value per channel.
  """
  if augmentation is None:
    return None
  if len(input_shape) != 3:
    raise ValueError(f"augmentation needs image inputs of shape (H, W, C), got input shape "
                     f"{input_shape}; set augmentation=None for other inputs")
  channels, mean, std = input_shape[-1], augmentation.mean, augmentation.std
  if mean is not None and (len(mean) != channels or len(std) != channels):
    raise ValueError(f"augmentation mean and std must have one value per channel ({channels}), "
                     f"got mean={tuple(mean)}, std={tuple(std)}")
  return AugmentSpec(geometric=not augmentation.is_anatomical,
                     photometric=not augmentation.is_texture_based, saturation=channels == 3,
                     mean=None if mean is None else tuple(float(m) for m in mean),
                     std=None if std is None else tuple(float(v) for v in std))


def _build(spec: StepSpec, seed: jax.Array, hyper: dict[str, jax.Array]) -> TrainState:
  """Every array of a fresh state, from the seed and the trial's float32 scalars."""
  init_key, train_key = jax.random.split(jax.random.key(seed))
  sample = jnp.zeros((1, *spec.input_shape), jnp.float32)
  params, model_state = spec.model.init(init_key, sample)
  params = spec.policy.cast_to_param(params)
  opt_state = optim.init_optimizer(spec.optimizer, params, learning_rate=hyper["learning_rate"],
                                   momentum=hyper["momentum"], weight_decay=hyper["weight_decay"],
                                   grad_clip=hyper["grad_clip"])
  mixup_alpha = hyper["mixup_alpha"] if spec.mixup else None
  augment = (AugmentParams(*(hyper[k] for k in AugmentParams._fields))
             if spec.augment is not None else None)
  hparams = Hyperparams(
      mixup_alpha=mixup_alpha, mixup_on=None if mixup_alpha is None else mixup_alpha > 0,
      label_smoothing=hyper["label_smoothing"], focal_gamma=hyper["focal_gamma"],
      class_weights=hyper["class_weights"], augment=augment)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=opt_state, loss_scale=loss_scale_for(spec.policy), rng=train_key,
                    hparams=hparams, spec=spec)


# The build runs once per trial, so its compile time matters more than its run
# time: LLVM's level 1 compiles the unrolled random-number kernels of the
# initialisers about 3x faster (3.3 s -> 1.1 s for MiniCNN's state on 2 CPU
# cores) and gives the same bits as a default compile (tested; level 0 does not).
BUILD_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
_jit_build = jax.jit(_build, static_argnums=0, compiler_options=BUILD_COMPILER_OPTIONS)


def create_train_state(model, *, input_shape, num_classes: int, seed: int = 42,
                       optimizer: str = "sgd", learning_rate: float = 0.008, momentum: float = 0.9,
                       weight_decay: float = 5e-4, grad_clip: float | None = 1.0,
                       criterion: str = "cross_entropy", label_smoothing: float = 0.0,
                       mixup_alpha: float = 0.0, focal_gamma: float = 2.0,
                       class_weights=None, precision: str | Policy = "float32",
                       augmentation: Any = None,
                       compiled: Callable[..., Callable[..., Any]] | None = None) -> TrainState:
  """Initialises a model and its optimizer into a :class:`TrainState`.

  Args:
    model: anything :func:`orchard_jax.models.as_model` accepts (a Linen or
      NNX module, or a ``Model``).
    input_shape: the per-sample input shape, e.g. ``(28, 28, 1)`` (NHWC).
    num_classes: the number of classes the logits cover.
    seed: seeds parameter initialisation, dropout and MixUp.
    class_weights: ``[num_classes]`` weights for the loss; ``None`` means ones.
    mixup_alpha: MixUp's Beta parameter. ``0`` builds a state whose training
      step has no MixUp at all (``spec.mixup`` False, ``hparams.mixup_alpha``
      and ``mixup_on`` None): the same numbers as a step with MixUp switched
      off, for a shorter compile. Trials with ``mixup_alpha > 0`` share one
      program whatever their alpha; one with 0 compiles its own.
    precision: a :class:`Policy` or a string :func:`parse_policy` accepts.
    augmentation: an :class:`orchard_jax.AugmentationConfig` (any object with its
      fields) to augment every training batch on the device: its flags and normalisation
      make ``spec.augment`` (:func:`augmentation_spec`), its ``hflip``,
      ``rotation_angle``, ``jitter_val`` and ``min_scale`` ``hparams.augment``, so
      trials differing only in those share one program. ``None``: a step without
      augmentation (``spec.augment`` and ``hparams.augment`` None), the program of a
      state built before augmentation existed.
    compiled: where a Linen model's build program comes from: a function
      called as ``compiled(jitted, args, name="init", static=(spec,),
      model=spec.model)`` that returns the program for ``args``, such as
      :func:`orchard_jax.engine.executables.compiled` (which keeps programs
      on disk across processes). ``None``: ``jax.jit``'s own in-process cache.

  The remaining arguments mirror :class:`orchard_jax.TrainingConfig`.

  For a Linen model the whole state is built by one compiled program, keyed
  on the model's structure: the next trial of the same structure compiles
  nothing (nor, through ``compiled``, the next process with the executable
  cache on). Eager initialisation would dispatch and compile op by op. Other
  models (NNX modules carry their initial weights, which a program keyed on
  structure would reuse) are built eagerly.

  ``orchard_jax.create_train_state`` is this function with ``compiled`` from
  the executable cache (:func:`orchard_jax.engine.first_state.create_train_state`).

  Every array of the state is committed to the default device
  (:func:`default_device`), as the batches of
  :func:`orchard_jax.data.device_batches` and the outputs of the steps are:
  the training step sees one placement from its first call on and compiles
  once (an uncommitted first state would compile it a second time at the
  next step, whose state the first step returned committed).
  """
  from orchard_jax.models import LinenModel, as_model  # models/ sits beside core/

  policy = parse_policy(precision)
  if not mixup_alpha >= 0:
    raise ValueError(f"mixup_alpha must be >= 0, got mixup_alpha={mixup_alpha!r}")
  input_shape = tuple(int(d) for d in input_shape)
  spec = StepSpec(model=as_model(model), optimizer=optimizer, criterion=criterion, policy=policy,
                  input_shape=input_shape, num_classes=int(num_classes),
                  mixup=bool(mixup_alpha > 0),
                  augment=augmentation_spec(augmentation, input_shape))
  if class_weights is None:
    class_weights = np.ones(num_classes, np.float32)
  class_weights = np.asarray(class_weights, np.float32)
  if class_weights.shape != (num_classes,):
    raise ValueError(f"class_weights must have shape ({num_classes},), got {class_weights.shape}")
  hyper = {"learning_rate": learning_rate, "momentum": momentum, "weight_decay": weight_decay,
           "grad_clip": grad_clip or 0.0, "mixup_alpha": mixup_alpha,
           "label_smoothing": label_smoothing, "focal_gamma": focal_gamma}
  if augmentation is not None:
    hyper |= {k: getattr(augmentation, k) for k in AugmentParams._fields}
  hyper = {k: np.float32(v) for k, v in hyper.items()} | {"class_weights": class_weights}
  seed = np.uint32(int(seed) & 0xFFFFFFFF)  # as jax.random.key(seed) reads an int (without x64)
  device = default_device()
  if not isinstance(spec.model, LinenModel):
    return jax.device_put(_build(spec, seed, hyper), device)
  args = jax.device_put((seed, hyper), device)  # committed: so is every array of the state
  if compiled is None:
    return _jit_build(spec, *args)
  return compiled(_jit_build, args, name="init", static=(spec,), model=spec.model)(*args)

