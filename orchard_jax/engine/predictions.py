"""A final evaluation's predictions: one validation pass that keeps its probabilities, plain
or with the test-time-augmentation ensemble.

:func:`predictions` is the engine's one validation pass
(:func:`~orchard_jax.engine.passes.validation_pass`, as
:func:`~orchard_jax.engine.epoch.evaluate` runs it), returning the whole
:class:`~orchard_jax.engine.passes.Validation`: the metrics and the unpadded rows'
probabilities and labels, which a test report needs for its per-class figures and confusion
matrix. With ``tta`` (a :class:`orchard_jax.core.tta.TTASpec`) each batch goes through
:func:`tta_eval_step` instead of ``eval_step``: the ensemble of every view of
:func:`orchard_jax.core.tta.tta_probabilities` in one jitted program, its probabilities the
mean of the views' softmax, and its loss their negative log-likelihood.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from orchard_jax.core.batches import materialize
from orchard_jax.core.state import TrainState
from orchard_jax.core.steps import check_batch, eval_logits, eval_outputs
from orchard_jax.engine.feed import batches
from orchard_jax.engine.passes import Solo, Validation, validation_pass

__all__ = ["predictions", "tta_eval_step"]

_TINY = float(jnp.finfo(jnp.float32).tiny)  # the floor of a probability before its log


def _tta_eval_step(tta: Any, state: TrainState, batch: Any) -> dict[str, jax.Array]:
  from orchard_jax.core.tta import tta_probabilities  # pylint: disable=import-outside-toplevel

  batch = materialize(batch)
  check_batch(state.spec, batch)
  labels_B, mask_B = batch["label"].astype(jnp.int32), batch["mask"]
  probs_BxC = tta_probabilities(functools.partial(eval_logits, state), batch["image"], tta)
  # log(mean probability): its softmax is the ensemble's probabilities again, and its
  # cross-entropy the ensemble's negative log-likelihood
  logits_BxC = jnp.log(jnp.maximum(probs_BxC.astype(jnp.float32), _TINY))
  return eval_outputs(logits_BxC, labels_B, mask_B)


tta_eval_step = jax.jit(_tta_eval_step, static_argnums=0)
tta_eval_step.__doc__ = """``eval_step``'s outputs for the TTA ensemble ``tta`` (static: one
compile per spec and batch shape): ``logits`` are the log of the views' mean softmax."""


class _TTA(Solo):
  """One state, stepped by :func:`tta_eval_step` of ``tta``."""

  def __init__(self, state: TrainState, tta: Any):
    super().__init__(state, train=False)
    self.tta = tta

  def _program(self, batch: Any):
    return functools.partial(tta_eval_step, self.tta)


def predictions(state: TrainState, loader: Iterable, *, layout: str = "NCHW",
                tta: Any = None) -> Validation:
  """One evaluation pass of ``state`` over ``loader``, keeping its probabilities.

  Returns:
    The pass's :class:`~orchard_jax.engine.passes.Validation`: ``metrics`` (loss, accuracy,
    auc, f1, as :func:`~orchard_jax.engine.epoch.evaluate` gives them), ``probs``
    (float64 ``[N, C]``) and ``labels`` of the unpadded rows in the loader's order.

  Raises:
    ValueError: non-finite logits (the validation failed).
    orchard_jax.errors.DataError: bad data, an empty loader among them.
  """
  stepper = Solo(state, train=False) if tta is None else _TTA(state, tta)
  (validation,) = validation_pass(stepper, batches(stepper.state, loader, None, layout, "validation"),
                                  loader, epoch=None, layout=layout).values()
  validation.checked()
  return validation
