"""Optimizers built once per structure, with every per-trial scalar in state.

The reference (PyTorch) uses ``torch.optim.SGD`` with *coupled* weight decay
(``wd * param`` added to the gradient before momentum) and ``torch.optim.AdamW``
with *decoupled* decay; both after ``clip_grad_norm_``. Here each is an Optax
chain wrapped in :func:`optax.inject_hyperparams` with float32 hyperparameters,
so that ``learning_rate``, ``momentum``, ``weight_decay`` and ``grad_clip`` are
arrays in the optimizer state. One compiled ``train_step`` then serves every
trial of a study, and the epoch's learning rate is written into the state,
never compiled in.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("sgd", "adamw")
_HYPERPARAMS = ("learning_rate", "momentum", "weight_decay", "grad_clip")


class ClipState(NamedTuple):
  """Stateless: clipping keeps nothing between steps."""


def clip_by_global_norm_like_torch(max_norm: jax.Array | float) -> optax.GradientTransformation:
  """Scales gradients by ``min(1, max_norm / (norm + 1e-6))``, as torch does.

  This is ``torch.nn.utils.clip_grad_norm_``'s formula (Optax's
  ``clip_by_global_norm`` divides by the exact norm instead). A ``max_norm``
  of 0 disables clipping, as in the reference; being an array, ``max_norm``
  can change between trials without recompiling.
  """

  def init_fn(params):
    del params
    return ClipState()

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    coef = jnp.where(max_norm > 0, coef, 1.0)
    updates = jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _sgd(learning_rate, momentum, weight_decay, grad_clip):
  # torch SGD: d = g + wd * p; buf = momentum * buf + d; p -= lr * buf.
  return optax.chain(
      clip_by_global_norm_like_torch(grad_clip),
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate),
  )


def _adamw(learning_rate, momentum, weight_decay, grad_clip):
  # torch AdamW (betas 0.9/0.999, eps 1e-8): p *= 1 - lr * wd, then the Adam step.
  # ``momentum`` is accepted so that both optimizers share one state layout; AdamW ignores it.
  del momentum
  return optax.chain(
      clip_by_global_norm_like_torch(grad_clip),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )


@functools.cache
def optimizer(name: str) -> optax.GradientTransformation:
  """The optimizer of one structure; cached so every trial shares one object.

  Args:
    name: ``"sgd"`` or ``"adamw"``.

  Returns:
    A transformation whose state carries ``hyperparams`` (float32 scalars for
    ``learning_rate``, ``momentum``, ``weight_decay``, ``grad_clip``). Its
    initial hyperparameters are placeholders: set real ones with
    :func:`init_optimizer`.
  """
  factories = {"sgd": _sgd, "adamw": _adamw}
  if name not in factories:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got optimizer={name!r}")
  return optax.inject_hyperparams(factories[name], hyperparam_dtype=jnp.float32)(
      learning_rate=0.0, momentum=0.0, weight_decay=0.0, grad_clip=0.0)


def init_optimizer(name: str, params, *, learning_rate: float, momentum: float,
                   weight_decay: float, grad_clip: float | None) -> optax.OptState:
  """Initial optimizer state with the trial's hyperparameters in it."""
  state = optimizer(name).init(params)
  return set_hyperparams(state, learning_rate=learning_rate, momentum=momentum,
                         weight_decay=weight_decay,
                         grad_clip=0.0 if grad_clip is None else grad_clip)


def set_hyperparams(opt_state: optax.OptState, **values: float) -> optax.OptState:
  """Returns ``opt_state`` with the named hyperparameters replaced (float32)."""
  unknown = set(values) - set(_HYPERPARAMS)
  if unknown:
    raise ValueError(f"unknown optimizer hyperparameter(s) {sorted(unknown)}; allowed: {_HYPERPARAMS}")
  hyperparams = dict(opt_state.hyperparams)
  for key, value in values.items():
    hyperparams[key] = scalar(value, np.float32)
  return opt_state._replace(hyperparams=hyperparams)


def scalar(value, dtype: type[np.generic]) -> jax.Array:
  """``value`` as a ``dtype`` scalar array: traced values under jit, else one host-to-device copy.

  (``jnp.asarray`` of a host value would dispatch a small program, compiled
  once per process.) ``dtype`` is a numpy type: a JAX scalar type would make
  numpy call back into Python for the conversion, where a Ctrl-C turns into
  a ``SystemError``.
  """
  if isinstance(value, jax.Array):
    return jnp.asarray(value, dtype)
  return jax.device_put(np.asarray(value, dtype))


def get_hyperparam(opt_state: optax.OptState, name: str) -> jax.Array:
  """One hyperparameter's current value (an on-device float32 scalar)."""
  return opt_state.hyperparams[name]
