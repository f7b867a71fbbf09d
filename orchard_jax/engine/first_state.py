"""A trial's first state, built as the engine builds it.

* :func:`create_train_state` -- :func:`orchard_jax.core.state.create_train_state`
  with its build program kept by the executable cache
  (:mod:`orchard_jax.engine.executables`): a later trial of the same structure
  compiles nothing, nor does a later process while the cache has a directory.
  This is ``orchard_jax.create_train_state``.
* :func:`state_from_config` -- the same with every value taken from a
  ``TrainingConfig``.

They live here rather than in ``orchard_jax.core`` because the cache keeps
files and threads, and the config is a layer above the core.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from orchard_jax.config import resolve_precision
from orchard_jax.core import state as core_state
from orchard_jax.core.state import TrainState
from orchard_jax.engine import executables

__all__ = ["create_train_state", "state_from_config"]


def create_train_state(model, **kwargs) -> TrainState:
  """:func:`orchard_jax.core.state.create_train_state` (the same arguments), with a Linen
  model's build program from :func:`orchard_jax.engine.executables.compiled`.

  ``compiled=`` may still be given, e.g. ``None`` for ``jax.jit``'s own cache alone.
  """
  kwargs.setdefault("compiled", executables.compiled)
  return core_state.create_train_state(model, **kwargs)


def state_from_config(model, cfg, *, input_shape, num_classes: int, class_weights=None,
                      backend: str | None = None,
                      compiled: Callable[..., Callable[..., Any]] | None = executables.compiled
                      ) -> TrainState:
  """:func:`create_train_state` with every value taken from a ``TrainingConfig``.

  With ``mixup_epochs=0`` MixUp is never switched on, so the state is built
  without it (as with ``mixup_alpha=0``). ``cfg.augmentation`` (None: none) is the
  state's augmentation. ``compiled`` is
  :func:`orchard_jax.core.state.create_train_state`'s (default: the executable
  cache).
  """
  return create_train_state(
      model, input_shape=input_shape, num_classes=num_classes, seed=cfg.seed,
      optimizer=cfg.optimizer_type, learning_rate=cfg.learning_rate, momentum=cfg.momentum,
      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, criterion=cfg.criterion_type,
      label_smoothing=cfg.label_smoothing,
      mixup_alpha=cfg.mixup_alpha if cfg.mixup_epochs > 0 else 0.0, focal_gamma=cfg.focal_gamma,
      class_weights=class_weights,
      precision=resolve_precision(cfg, backend or jax.default_backend()),
      augmentation=cfg.augmentation, compiled=compiled)
