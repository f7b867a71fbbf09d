"""One pass over a loader, whatever steps it: every training and validation pass of the engine.

A pass feeds device batches (:mod:`orchard_jax.engine.feed`) to a *stepper*:

* :class:`Solo` -- one state, its solo program (``train_step`` or ``eval_step`` of the
  executable cache): :func:`~orchard_jax.engine.epoch.train_epoch` and
  :func:`~orchard_jax.engine.epoch.evaluate`, and a cohort's compile ahead;
* :class:`Stacked` -- a cohort's stacked members, the vmapped program
  (:mod:`orchard_jax.core.cohort`);
* :class:`InTurn` -- a cohort's members' own states, each stepped by the solo program in
  turn, on a shared batch or on its own.

The first batch's per-sample shape is checked against the state's and the step compiled (or
loaded) for it; each batch's sums stay on the device in a :class:`Sums` per track (the
stepper's one, or one per member stepped in turn) and are fetched, packed, at the pass's
end with the validation's logits: exactly one host sync per pass, summed in float64 on the
host. An empty loader is bad data (``"the training loader yielded no batch at epoch 1"``).

Non-finite results are told apart here, once for every stepper: a NaN or Inf training loss
with NaN or Inf input rows in the loader is bad data
(:class:`~orchard_jax.errors.NonFiniteInputError`, ``"training inputs: 3 rows with NaN or
Inf at epoch 1; fix the data (this is not divergence)"``), else divergence (the loop's, see
:func:`~orchard_jax.engine.loop.diverged`); a member's non-finite validation logits are a
failed :class:`Validation` (``"5 of 48 validation rows have non-finite logits (5 have NaN or
Inf inputs)"``). The input rows are counted on the host, only when a result is non-finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax.core import cohort as core_cohort
from orchard_jax.core.metrics import SUM_KEYS, classification_metrics
from orchard_jax.core.state import TrainState
from orchard_jax.core.steps import eval_step, train_step
from orchard_jax.engine.feed import (at_epoch, check_input_shape, committed, compiled,
                                     nonfinite_input_rows)
from orchard_jax.errors import EmptyLoaderError, NonFiniteInputError

__all__ = ["InTurn", "Solo", "Stacked", "Sums", "Validation", "compile_pass", "first_batch",
           "logits_metrics", "nonfinite_rows", "softmax_rows", "train_pass", "validation_pass"]

_GROUP = 16  # batches whose sums one _stack call packs, at most


@jax.jit
def _stack(per_batch: list[dict[str, jax.Array]]) -> jax.Array:
  """``[len(per_batch), len(SUM_KEYS), ...]``: a group of batches' sums in one array."""
  return jnp.stack([jnp.stack([jnp.asarray(m[key], jnp.float32) for key in SUM_KEYS])
                    for m in per_batch])


def _packed(per_batch: list[dict[str, jax.Array]]) -> list[jax.Array]:
  """The batches' sums packed into a few arrays, still on the device.

  Fetching three scalars per batch costs a transfer each, and adding them on
  the device one more dispatch per batch; packing groups of a power-of-two
  size (at most :data:`_GROUP`) costs a few dispatches per epoch and compiles
  at most five small programs, whatever the epoch's length.
  """
  packed, start = [], 0
  while start < len(per_batch):
    size = min(_GROUP, 1 << ((len(per_batch) - start).bit_length() - 1))
    packed.append(_stack(per_batch[start:start + size]))
    start += size
  return packed


def _sums(packed: list[np.ndarray]) -> dict[str, np.ndarray]:
  """A pass's sums, in float64 on the host, of the batches' fetched float32 packs (per key a
  scalar, or ``[K]`` for stacked members)."""
  totals = np.concatenate(packed).astype(np.float64).sum(axis=0)
  return dict(zip(SUM_KEYS, totals))


class Sums:
  """One track's sums over a pass, in CLU's metric shape: :meth:`empty`, :meth:`merge`,
  :meth:`compute`. Each batch's sums stay on the device; :meth:`packed` is what the pass's one
  host fetch takes, and :meth:`compute` sums what it fetched."""

  def __init__(self, per_batch: list[Mapping[str, jax.Array]]):
    self.per_batch = per_batch

  @classmethod
  def empty(cls) -> "Sums":
    return cls([])

  @classmethod
  def of(cls, out: Mapping[str, jax.Array]) -> "Sums":
    """One batch's sums, of a step's output (its ``SUM_KEYS``)."""
    return cls([{key: out[key] for key in SUM_KEYS}])

  def merge(self, other: "Sums") -> "Sums":
    """Both accumulators' batches (this one, extended in place: a pass's batches in order)."""
    self.per_batch.extend(other.per_batch)
    return self

  def packed(self) -> list[jax.Array]:
    return _packed(self.per_batch)

  @staticmethod
  def compute(fetched: list[np.ndarray]) -> dict[str, np.ndarray]:
    return _sums(fetched)


# ----------------------------------------------------------------- steppers ---


def _solo_program(train: bool, state: TrainState, batch: Any):
  """The solo training or evaluation step's executable for ``state`` and ``batch``'s shapes."""
  fn, name = (train_step, "train_step") if train else (eval_step, "eval_step")
  return compiled(fn, name, state, batch)


class Solo:
  """One state, stepped by its solo program; ``state`` is the state after the last step (a
  training stepper donates it to each step)."""
  stacked = False

  def __init__(self, state: TrainState, train: bool):
    self.state, self.train, self.live, self._step = committed(state), train, [0], None

  @property
  def first(self) -> TrainState:
    """The state a pass places its batches by."""
    return self.state

  def _program(self, batch: Any):
    return _solo_program(self.train, self.state, batch)

  def start(self, batch: Any, role: str, epoch: int | None) -> None:
    """Checks the pass's first batch and compiles (or loads) the step for its shapes."""
    check_input_shape(self.state, batch, role, epoch)
    self._step = self._program(batch)

  def step(self, batch: Any) -> dict[int, Mapping[str, jax.Array]]:
    """The step's outputs of ``batch``, by track."""
    if self.train:
      self.state, sums = self._step(self.state, batch)
      return {0: sums}
    return {0: self._step(self.state, batch)}


class Stacked(Solo):
  """A cohort's stacked members (``live``: the slots that count), stepped by the vmapped
  program; its one track's sums and logits have a leading member axis."""
  stacked = True

  def __init__(self, cohort: TrainState, live: list[int], train: bool):
    super().__init__(cohort, train)
    self.live = live

  def _program(self, batch: Any):
    return core_cohort.cohort_train_step if self.train else core_cohort.cohort_eval_step


def _each_own(batch: Any) -> bool:
  """Whether ``batch`` is a plain tuple of each slot's own batch (a shared batch may be an
  ``IndexedBatch``, a named tuple)."""
  return type(batch) is tuple  # pylint: disable=unidiomatic-typecheck


class InTurn:
  """Each live member's own state (``states``, updated in place), stepped by the solo program
  in turn: on a shared batch, or on its own of a tuple of each slot's batch. One track per
  member."""
  stacked = False

  def __init__(self, states: Any, live: list[int], train: bool):
    self.states, self.live, self.train, self._step = states, live, train, None
    for i in live:
      states[i] = committed(states[i])

  @property
  def first(self) -> TrainState:
    return self.states[self.live[0]]

  def start(self, batch: Any, role: str, epoch: int | None) -> None:
    batch = batch[self.live[0]] if _each_own(batch) else batch
    check_input_shape(self.first, batch, role, epoch)
    self._step = _solo_program(self.train, self.first, batch)

  def step(self, batch: Any) -> dict[int, Mapping[str, jax.Array]]:
    own, outs = (batch if _each_own(batch) else None), {}
    for i in self.live:
      if self.train:
        self.states[i], outs[i] = self._step(self.states[i], own[i] if own else batch)
      else:
        outs[i] = self._step(self.states[i], batch)
    return outs


# ------------------------------------------------------------------- passes ---


def _pass(stepper: Any, batches: Any, role: str, epoch: int | None):
  """Steps every batch of ``batches`` (a closing iterator); returns each track's sums, the
  validation's logits by track and the batches' labels and masks, after one host fetch."""
  sums: dict[int, Sums] = {}
  logits: dict[int, list] = {}
  labels, masks = [], []
  with batches as stream:
    for batch in stream:
      if not sums:
        stepper.start(batch, role, epoch)
      out: Mapping[str, jax.Array] = {}
      for key, out in stepper.step(batch).items():
        sums.setdefault(key, Sums.empty()).merge(Sums.of(out))
        if not stepper.train:
          logits.setdefault(key, []).append(out["logits"])
      if not stepper.train:
        labels.append(out["label"])
        masks.append(out["mask"])
  if not sums:
    raise EmptyLoaderError(f"the {role} loader yielded no batch{at_epoch(epoch)}")
  packed, logits, labels, masks = jax.device_get((
      {key: s.packed() for key, s in sums.items()}, logits, labels, masks))  # the one host sync
  return {key: Sums.compute(p) for key, p in packed.items()}, logits, labels, masks


def _members(stepper: Any, tracks: dict[int, Any]) -> dict[int, Any]:
  """Each live member's part of the tracks (a stacked track's row of each member)."""
  if not stepper.stacked:
    return tracks
  (whole,) = tracks.values()
  return {i: jax.tree.map(lambda a, i=i: a[i], whole) for i in stepper.live}


def _input_rows_text(bad: int, epoch: int | None) -> str:
  return (f"training inputs: {bad} row{'s' if bad != 1 else ''} with NaN or Inf"
          f"{at_epoch(epoch)}; fix the data (this is not divergence)")


def train_pass(stepper: Any, batches: Any, loader: Iterable, *, epoch: int | None,
               layout: str) -> dict[int, float]:
  """Each live member's sample-weighted mean training loss over one pass (member 0 for
  :class:`Solo`); the stepper holds the trained state(s).

  Raises:
    orchard_jax.errors.NonFiniteInputError: a loss is NaN or Inf and ``loader`` has input
      rows with a NaN or Inf (a NaN or Inf loss with finite inputs is the caller's divergence).
    orchard_jax.errors.DataError: bad data, an empty loader among them.
  """
  totals = _pass(stepper, batches, "training", epoch)[0]
  losses = {i: float(t["loss_sum"] / max(t["count"], 1.0))
            for i, t in _members(stepper, totals).items()}
  if not all(math.isfinite(loss) for loss in losses.values()):
    bad = nonfinite_input_rows(stepper.first, loader, epoch, layout, "training")
    if bad:
      raise NonFiniteInputError(_input_rows_text(bad, epoch))
  return losses


class Validation(NamedTuple):
  """A member's validation over one pass: its metrics, or why it failed (``failure``); and
  the probabilities its metrics came from, with their labels (the unpadded rows, in the
  loader's order), for a report that needs more than the metrics."""
  metrics: dict[str, float] | None
  failure: str | None = None
  probs: np.ndarray | None = None   # float64 [N, C]; None for a failed validation
  labels: np.ndarray | None = None  # int [N]

  def checked(self) -> dict[str, float]:
    """The metrics; raises ``ValueError(failure)`` for a failed validation, as the reference's
    metrics raise on NaN (the epoch loop then uses its fallback metrics)."""
    if self.failure is not None:
      raise ValueError(self.failure)
    return self.metrics


def validation_pass(stepper: Any, batches: Any, loader: Iterable, *, epoch: int | None,
                    layout: str) -> dict[int, Validation]:
  """Each live member's validation of one pass (member 0 for :class:`Solo`): the reference's
  metrics, or the failure of its non-finite logits (the message adds how many of the rows
  have NaN or Inf inputs, when some have).

  Raises:
    orchard_jax.errors.DataError: bad data, an empty loader among them.
  """
  totals, logits, labels, masks = _pass(stepper, batches, "validation", epoch)
  axis = 1 if stepper.stacked else 0  # a stacked track's batches: [K, B, ...]
  labels, mask = np.concatenate(labels, axis=axis), np.concatenate(masks, axis=axis)
  if stepper.stacked:  # the batch's own, repeated per member
    labels, mask = labels[0], mask[0]
  tracks = {key: (totals[key], np.concatenate(logits[key], axis=axis).astype(np.float64))
            for key in totals}
  results, inputs = {}, None
  for i, (sums, rows) in _members(stepper, tracks).items():
    nonfinite = nonfinite_rows(rows, mask)
    if not nonfinite:
      probs = softmax_rows(rows[mask])
      results[i] = Validation(classification_metrics(probs, labels[mask],
                                                     float(sums["loss_sum"]),
                                                     float(sums["count"])),
                              probs=probs, labels=labels[mask])
      continue
    if inputs is None:  # counted once for the pass
      inputs = nonfinite_input_rows(stepper.first, loader, epoch, layout, "validation")
    results[i] = Validation(None, f"{nonfinite} of {int(sums['count'])} validation rows have "
                            f"non-finite logits"
                            + (f" ({inputs} have NaN or Inf inputs)" if inputs else ""))
  return results


def first_batch(batches: Any) -> Any:
  """The first batch of ``batches`` (a closing iterator), None for an empty one."""
  with batches as stream:
    return next(stream, None)


def compile_pass(stepper: Any, batch: Any, loader: Iterable, role: str) -> None:
  """Compiles (or loads) what a pass of ``stepper`` over ``loader`` runs, without a pass: the
  step, run once on the pass's first ``batch`` (None: nothing), and the packing of
  ``len(loader)`` batches' sums."""
  if batch is None:
    return
  stepper.start(batch, role, None)
  try:
    count = max(len(loader), 1)
  except TypeError:
    count = 1
  jax.block_until_ready([_packed(Sums.of(out).per_batch * count)
                         for out in stepper.step(batch).values()])


def nonfinite_rows(logits: np.ndarray, mask: np.ndarray) -> int:
  """Unpadded rows of ``[N, C]`` host ``logits`` that hold a NaN or Inf."""
  return int((mask & ~np.isfinite(logits).all(axis=1)).sum())


def softmax_rows(logits: np.ndarray) -> np.ndarray:
  """The softmax of each row of finite float64 ``[N, C]`` host logits."""
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  return probs / probs.sum(axis=1, keepdims=True)


def logits_metrics(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray, loss_sum: float,
                   count: float) -> dict[str, float]:
  """The validation metrics of finite float64 ``[N, C]`` host logits (softmax, then
  :func:`~orchard_jax.core.metrics.classification_metrics`)."""
  return classification_metrics(softmax_rows(logits), labels, loss_sum, count, mask=mask)
