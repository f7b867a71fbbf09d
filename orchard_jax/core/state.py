"""The one pytree a trial trains: parameters, optimizer, loss scale, RNG, hyperparameters.

Everything that differs between trials of a study is an array in
:class:`TrainState`; only the *structure* (model, optimizer kind, criterion,
precision policy, input shape) is static, in :class:`StepSpec`. Two trials with
equal specs therefore share one compiled ``train_step``, and states of equal
spec can be stacked and vmapped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from orchard_jax.core import optim
from orchard_jax.core.losses import CRITERIA
from orchard_jax.core.precision import LossScale, Policy, loss_scale_for, parse_policy


class Hyperparams(NamedTuple):
  """Per-trial scalars the step reads (the optimizer's live in ``opt_state``)."""
  mixup_alpha: jax.Array      # float32 []
  mixup_on: jax.Array         # bool []; switched off after ``mixup_epochs``
  label_smoothing: jax.Array  # float32 []
  focal_gamma: jax.Array      # float32 []
  class_weights: jax.Array    # float32 [num_classes]; ones when unweighted


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What a compiled step depends on. Hashable; equal specs share compiled code."""
  model: Any                    # an ``orchard_jax.models.Model`` (hashable, compares by value)
  optimizer: str                # "sgd" | "adamw"
  criterion: str                # "cross_entropy" | "focal"
  policy: Policy
  input_shape: tuple[int, ...]  # per-sample shape, e.g. (28, 28, 1)
  num_classes: int

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
    """The same state with the epoch's learning rate written into the optimizer."""
    return self.replace(opt_state=optim.set_hyperparams(self.opt_state, learning_rate=learning_rate))

  def with_mixup(self, enabled: bool) -> "TrainState":
    """The same state with MixUp switched on or off (no recompilation)."""
    return self.replace(hparams=self.hparams._replace(mixup_on=jnp.asarray(enabled, jnp.bool_)))


def _init(model, key, sample):
  """``model.init``, compiled once per model structure when that is safe.

  Eager Linen initialisation dispatches (and compiles) op by op, which costs
  seconds for a CNN; one jitted call, cached on the hashable model, costs a
  fraction of that and nothing for the next trial. Other models (NNX modules
  carry their initial weights, which a cache keyed on structure would reuse)
  are initialised eagerly.
  """
  from orchard_jax.models import LinenModel

  if isinstance(model, LinenModel):
    return _jit_init(model, key, sample)
  return model.init(key, sample)


_jit_init = jax.jit(lambda model, key, sample: model.init(key, sample), static_argnums=0)


def create_train_state(model, *, input_shape, num_classes: int, seed: int = 42,
                       optimizer: str = "sgd", learning_rate: float = 0.008, momentum: float = 0.9,
                       weight_decay: float = 5e-4, grad_clip: float | None = 1.0,
                       criterion: str = "cross_entropy", label_smoothing: float = 0.0,
                       mixup_alpha: float = 0.0, focal_gamma: float = 2.0,
                       class_weights=None, precision: str | Policy = "float32") -> TrainState:
  """Initialises a model and its optimizer into a :class:`TrainState`.

  Args:
    model: anything :func:`orchard_jax.models.as_model` accepts (a Linen or
      NNX module, or a ``Model``).
    input_shape: the per-sample input shape, e.g. ``(28, 28, 1)`` (NHWC).
    num_classes: the number of classes the logits cover.
    seed: seeds parameter initialisation, dropout and MixUp.
    class_weights: ``[num_classes]`` weights for the loss; ``None`` means ones.
    precision: a :class:`Policy` or a string :func:`parse_policy` accepts.

  The remaining arguments mirror :class:`orchard_jax.TrainingConfig`.
  """
  from orchard_jax.models import as_model  # models/ sits beside core/, imported lazily

  policy = parse_policy(precision)
  spec = StepSpec(model=as_model(model), optimizer=optimizer, criterion=criterion, policy=policy,
                  input_shape=tuple(int(d) for d in input_shape), num_classes=int(num_classes))
  init_key, train_key = jax.random.split(jax.random.key(seed))
  sample = jnp.zeros((1, *spec.input_shape), jnp.float32)
  params, model_state = _init(spec.model, init_key, sample)
  params = policy.cast_to_param(params)
  opt_state = optim.init_optimizer(optimizer, params, learning_rate=learning_rate, momentum=momentum,
                                   weight_decay=weight_decay, grad_clip=grad_clip)
  if class_weights is None:
    class_weights = np.ones(num_classes, np.float32)
  class_weights = jnp.asarray(class_weights, jnp.float32)
  if class_weights.shape != (num_classes,):
    raise ValueError(f"class_weights must have shape ({num_classes},), got {class_weights.shape}")
  hparams = Hyperparams(
      mixup_alpha=jnp.asarray(mixup_alpha, jnp.float32),
      mixup_on=jnp.asarray(mixup_alpha > 0, jnp.bool_),
      label_smoothing=jnp.asarray(label_smoothing, jnp.float32),
      focal_gamma=jnp.asarray(focal_gamma, jnp.float32),
      class_weights=class_weights)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=opt_state, loss_scale=loss_scale_for(policy), rng=train_key,
                    hparams=hparams, spec=spec)


def state_from_config(model, cfg, *, input_shape, num_classes: int, class_weights=None,
                      backend: str | None = None) -> TrainState:
  """:func:`create_train_state` with every value taken from a ``TrainingConfig``."""
  from orchard_jax.config import resolve_precision

  return create_train_state(
      model, input_shape=input_shape, num_classes=num_classes, seed=cfg.seed,
      optimizer=cfg.optimizer_type, learning_rate=cfg.learning_rate, momentum=cfg.momentum,
      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, criterion=cfg.criterion_type,
      label_smoothing=cfg.label_smoothing, mixup_alpha=cfg.mixup_alpha, focal_gamma=cfg.focal_gamma,
      class_weights=class_weights,
      precision=resolve_precision(cfg, backend or jax.default_backend()))
