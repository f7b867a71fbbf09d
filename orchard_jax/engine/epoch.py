"""One pass over a loader: ``train_epoch`` and ``evaluate``.

Both are one pass (:mod:`orchard_jax.engine.passes`) of the solo program:
they feed padded, masked, prefetched device batches from
:func:`orchard_jax.data.device_batches` to the jitted steps, accumulate the
metrics on the device, and fetch them once, at the end of the epoch: there is
exactly one host sync per epoch, and the padded last batch neither recompiles
nor counts. A state replicated on a multi-device mesh
(:mod:`orchard_jax.core.sharding`) gets its batches split over that mesh; a
state on one device gets them committed to that device, as its own arrays
are (an array the user wrote into it uncommitted is committed first): a
jitted step compiles again for an argument whose commitment changed, so each
step compiles once per structure and batch shape, at its first batch.

Bad data raise :class:`~orchard_jax.errors.DataError`, never a
``ValueError`` or ``RuntimeError`` (the types a failed validation may be, see
:mod:`orchard_jax.engine.loop`), so no fallback metric ever hides them:

* what the adapter checks on the host before a batch crosses to the device
  (labels, dtypes, shapes, a loader that raises; see
  :func:`orchard_jax.data.device_batches`), named ``training`` or
  ``validation``;
* a per-sample input shape other than the state's (checked on the first
  batch's static shape, before compiling);
* an empty loader: ``"the training loader yielded no batch at epoch 1"``
  (the reference trains on nothing with loss 0.0, or gives NaN metrics; see
  ``docs/differences.md``);
* training rows with a NaN or Inf input, counted inside ``train_step`` and
  read at the epoch's one host sync, before the divergence check.

Non-finite validation logits are a failed validation instead (a
``ValueError``, as the reference's scikit-learn metrics raise on NaN): the
loop's fallback and three-strike rule apply, and a run whose every
validation failed ends with :class:`~orchard_jax.errors.ValidationFailedError`
(see :mod:`orchard_jax.engine.loop`).
"""

from __future__ import annotations

from typing import Iterable

from orchard_jax.core.state import TrainState
from orchard_jax.engine.feed import batches
from orchard_jax.engine.loop import diverged
from orchard_jax.engine.passes import (Solo, compile_pass, first_batch, train_pass,
                                       validation_pass)

__all__ = ["compile_steps", "evaluate", "train_epoch"]


def compile_steps(state: TrainState, train_loader: Iterable, val_loader: Iterable | None = None,
                  *, layout: str = "NCHW") -> None:
  """Compiles (or loads) every program an epoch of ``state`` runs, without training ``state``.

  Takes the first batch of each loader as :func:`train_epoch` and
  :func:`evaluate` do, gets the same programs (see
  :mod:`orchard_jax.engine.executables`) and runs each once, with the packing
  of an epoch's sums for ``len(loader)`` batches. Later epochs of states of
  the same structure then compile nothing. ``state`` is donated to the
  training step: do not use it afterwards. For compiling ahead on a thread
  (:mod:`orchard_jax.study.ahead`).
  """
  for loader, train, role in ((train_loader, True, "training"),
                             (val_loader, False, "validation")):
    if loader is not None:
      stepper = Solo(state, train)
      compile_pass(stepper, first_batch(batches(stepper.state, loader, None, layout, role)),
                   loader, role)
      state = stepper.state  # as train_epoch leaves it


def train_epoch(state: TrainState, loader: Iterable, *, epoch: int | None = None,
                layout: str = "NCHW") -> tuple[TrainState, float]:
  """Runs ``train_step`` over every batch of ``loader``.

  Args:
    state: the trial's state; donated batch by batch (do not reuse it).
    loader: a torch DataLoader or any iterable of ``(inputs, labels)``.
    epoch: the 1-indexed epoch, used in messages.
    layout: ``"NCHW"`` (torch's convention) or ``"NHWC"`` for 4-D inputs.

  Returns:
    ``(state, loss)``: the new state and the epoch's sample-weighted mean
    training loss.

  Raises:
    orchard_jax.errors.DataError: bad data (see the module docstring), among
      them ``EmptyLoaderError`` (``"the training loader yielded no batch at
      epoch 1"``; the reference returns 0.0 with a warning) and
      ``NonFiniteInputError`` (``"training inputs: 3 rows with NaN or Inf at
      epoch 1; fix the data (this is not divergence)"``), which comes before
      the divergence check.
    RuntimeError: ``"Training diverged: loss=… at epoch …"`` if the loss is
      NaN or Inf with finite inputs (checked at the epoch's one host sync,
      not per step).
  """
  stepper = Solo(state, train=True)
  (loss,) = train_pass(stepper, batches(stepper.state, loader, epoch, layout, "training"),
                       loader, epoch=epoch, layout=layout).values()
  divergence = diverged(loss, epoch)
  if divergence is not None:
    raise divergence
  return stepper.state, loss


def evaluate(state: TrainState, loader: Iterable, *, epoch: int | None = None,
             layout: str = "NCHW") -> dict[str, float]:
  """Evaluation-mode pass over ``loader`` with the reference's metrics.

  Returns:
    ``{"loss", "accuracy", "auc", "f1"}``: mean per-sample cross-entropy,
    accuracy, ROC-AUC from softmax probabilities (binary: class 1;
    multiclass: one-vs-rest macro; NaN when undefined) and macro F1 with
    zero_division 0. Padded rows never count.

  Raises:
    ValueError: ``"5 of 48 validation rows have non-finite logits"``: a
      failed validation, as the reference's metrics raise on NaN (the epoch
      loop then uses the fallback metrics); the message adds how many of
      the rows have NaN or Inf inputs, when some have.
    orchard_jax.errors.DataError: bad data (see the module docstring),
      among them ``EmptyLoaderError`` (``"the validation loader yielded no
      batch at epoch 2"``; the reference gives NaN for all four metrics).
  """
  stepper = Solo(state, train=False)
  (validation,) = validation_pass(stepper, batches(stepper.state, loader, epoch, layout,
                                                   "validation"),
                                  loader, epoch=epoch, layout=layout).values()
  return validation.checked()
