"""Cohorts in the engine: K Optuna trials trained in one vmapped program, each pruned on its own.

A cohort holds up to ``K`` trials (members) of one program structure: the
same :class:`~orchard_jax.core.state.StepSpec` and state structure (model,
optimizer kind, precision, criterion), the same batch size, data seed and
layout, and the same data (:mod:`orchard_jax.engine.cohort_data`). Their
states are stacked on a leading member axis (:mod:`orchard_jax.core.cohort`),
and each epoch of the cohort is one training pass and one validation pass,
with every member stepped by the vmapped program on every batch. In the
training pass each member reads its own epoch's order where its loader can
serve it (device-resident images of a ``TensorDataset`` or of the command
line's in-memory arrays); else all members read the first member's loader,
in one order.

Each member then runs its own epoch end exactly as :func:`run_trial` does for
one trial (:class:`~orchard_jax.engine.loop.LoopRun`): its own epoch
number, learning rate (scheduled or plateau) and MixUp switch, report and
prune after the warmup, fallback metrics and the three-strike rule, its own
divergence (a non-finite loss fails that member only: nothing in a step
reduces over members), the best state and its checkpoint, its records. A
member that is pruned, fails or finishes leaves its slot at the epoch
boundary; the slot takes the next trial of the same structure, which starts
at its own epoch 1 in the same shapes (:func:`~orchard_jax.core.cohort.
replace_member`): nothing recompiles. A slot with no trial to take is
stepped like the others and its outputs are ignored.

:func:`orchard_jax.engine.driver.optimize` is the Python API and
:func:`~orchard_jax.engine.driver.run_cohorts` the scheduler that forms and refills cohorts.

With ``cohort_size`` 1 nothing here runs: each trial is :func:`run_trial`'s,
bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optuna
from jax.sharding import NamedSharding, PartitionSpec
from optuna.trial import TrialState

from orchard_jax.config import ConfigError, TrainingConfig, TrialConfig
from orchard_jax.core import cohort as core_cohort
from orchard_jax.core.metrics import SUM_KEYS
from orchard_jax.core.sharding import DATA_AXIS
from orchard_jax.core.state import TrainState
from orchard_jax.core.steps import eval_step, train_step
from orchard_jax.data.adapter import device_batches
from orchard_jax.engine import cohort_data
from orchard_jax.engine.callbacks import storage_call
from orchard_jax.engine.epoch import (_check_input_shape, _committed, _compiled, _packed, _sums,
                                      compile_steps, logits_metrics, nonfinite_input_rows,
                                      nonfinite_rows)
from orchard_jax.engine.loop import LoopRun
from orchard_jax.engine.outcome import Outcome, outcome_of
from orchard_jax.engine.start import check_direction, prepare, record_config
from orchard_jax.engine.trial import trial_completed
from orchard_jax.errors import DataError, EmptyLoaderError, NonFiniteInputError
from orchard_jax.records import COHORT

logger = logging.getLogger(__name__)

__all__ = ["Outcome", "cohort_key", "compile_cohort_steps", "programs"]



def cohort_key(cfg: TrialConfig, state: TrainState) -> Any:
  """What trials must share to train in one cohort.

  The state's static structure (its ``spec``: model, optimizer kind,
  precision, criterion, MixUp on or off...; its tree and every leaf's shape
  and dtype) and the data a member reads: batch size, data seed, layout,
  devices and the training and validation data themselves
  (:func:`~orchard_jax.engine.cohort_data.data_identity`).
  """
  leaves, tree = jax.tree.flatten(state)
  shapes = tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
  training = cfg.training
  devices = None if cfg.devices is None else tuple(cfg.devices)
  return (state.spec, tree, shapes, training.batch_size, training.seed, cfg.layout, devices,
          cohort_data.data_identity(cfg.train_loader), cohort_data.data_identity(cfg.val_loader))


# ------------------------------------------------------------- one member ---


class Member:
  """One trial in a cohort's slot: run_trial's work for it, one epoch end at a time.

  ``log_outcome``: whether its failure and pruning are logged (see
  :func:`~orchard_jax.engine.trial.train_trial`). ``outcome`` is None while it is live, and
  holds its epochs and seconds once it ended.
  """

  def __init__(self, trial: optuna.Trial, cfg: TrialConfig, log_outcome: bool = True):
    self.trial, self.cfg, self.log_outcome = trial, cfg, log_outcome
    self.state: TrainState | None = None
    self.key: Any = None
    self.outcome: Outcome | None = None
    self.run: LoopRun | None = None
    self.training: TrainingConfig | None = None
    self._metrics: Any = None
    self.started = time.monotonic()
    self.best, self.stream = None, None

  # Each step below ends the member by the outcome rule, as run_trial ends a trial: see _guard.

  def start(self, reseed: bool, input_shape: tuple[int, ...] | None = None) -> None:
    """Checks, records and builds the trial's state (``reseed``: restart its loader's order;
    ``input_shape``: the cohort's, so that a later member does not read a batch to infer it).
    A loader shuffled by a torch generator, or an array loader, starts as the solo run does:
    its position there is the member's own (``stream``)."""
    if cohort_data.Stream(self.cfg.train_loader).state is not None:
      reseed, input_shape = True, None
    if self.cfg.input_shape is None and input_shape is not None:
      self.cfg = self.cfg.replace(input_shape=tuple(input_shape))
    try:
      check_direction(self.trial, self.cfg)
    except ValueError as e:  # as run_trial: raised before the trial starts
      self._end(Outcome(TrialState.FAIL, error=e))
      return
    with self._guard():
      record_config(self.trial, self.cfg)
      prepared = prepare(self.trial, self.cfg, reseed=reseed, log_pruned=self.log_outcome,
                         validate_fn=self._validated)
      self.training, self.best, self.run = prepared.training, prepared.best, prepared.run
      self.state = prepared.state
      self.stream = cohort_data.Stream(self.cfg.train_loader)
      self.key = cohort_key(self.cfg, self.state)

  @property
  def live(self) -> bool:
    return self.outcome is None

  def _validated(self, state: TrainState, epoch: int) -> dict[str, float]:
    del state, epoch
    if isinstance(self._metrics, BaseException):
      raise self._metrics
    return self._metrics

  def end_epoch(self, state: TrainState, train_loss: float, metrics: Any) -> None:
    """The epoch end of run_trial's loop, with the cohort's loss and metrics for this member
    (an exception: a failed validation)."""
    with self._guard():
      self._metrics = metrics
      self.run.end_epoch(state, train_loss)
      if self.run.done:
        result = self.run.finish(state)
        trial_completed(self.trial, self.training, self.best, result)
        self._end(Outcome(TrialState.COMPLETE, result.best, None, result))

  def fail(self, error: BaseException) -> None:
    """Ends the member with ``error`` (bad shared data), as run_trial would end."""
    with self._guard():
      raise error

  def _end(self, outcome: Outcome) -> None:
    history = () if self.run is None else tuple(self.run.history)
    self.outcome = outcome._replace(history=history, seconds=time.monotonic() - self.started)

  @contextlib.contextmanager
  def _guard(self):
    """Ends the member by the outcome rule (:func:`~orchard_jax.engine.outcome.outcome_of`)
    on what the block raises; an interrupt goes on to the driver, which tells the member."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      self._end(outcome_of(e, self.trial, self.cfg, log=self.log_outcome))


# ------------------------------------------------------------ one cohort ---


class Cohort:
  """K slots of one key: the stacked state, the members in their slots, the shared loaders."""

  def __init__(self, members: Sequence[Member], size: int):
    first = members[0]
    self.key, self.size = first.key, size
    self.cfg = first.cfg  # the loaders every member reads
    self.slots: list[Member | None] = [*members, *[None] * (size - len(members))]
    # K copies of the first state, then each other member in its slot: the same two small
    # programs as every later refill, rather than one stacking program of K states
    mesh = _mesh(first.state)
    # On several devices the member axis is split over them, and every device reads the whole
    # batch: a batch-split vmapped convolution would all-gather the batch (openxla/xla#47945).
    self.members_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    self.batch_sharding = (jax.sharding.SingleDeviceSharding(next(iter(first.state.step.devices())))
                           if mesh is None else NamedSharding(mesh, PartitionSpec()))
    self.serial_train, self.serial_eval = programs(first.state, mesh is not None)
    # each member's own epoch order (resident images), or one shared pass in the first's order
    self.own = mesh is None and cohort_data.own_orders(self.cfg.train_loader)
    self.stream = first.stream
    self.states: list[TrainState | None] = [None] * size  # each member's own (serial_train)
    self.state: TrainState | None = None                  # the stacked members (vmapped)
    if self.serial_train:
      for i, m in enumerate(members):
        self.states[i], m.state = m.state, None
    else:
      self.state = self._split(core_cohort.repeat(first.state, size))
      first.state = None
      for i, m in enumerate(members[1:], start=1):
        self.state = self._split(core_cohort.replace_member(self.state, i, m.state))
        m.state = None  # the cohort holds it now
    self.passes = 0
    for i, m in enumerate(members):
      storage_call(m.trial.set_user_attr, COHORT, {"size": size, "slot": i})
      self._check_order(m)

  @property
  def live(self) -> list[int]:
    return [i for i, m in enumerate(self.slots) if m is not None and m.live]

  def _training_batches(self, live: list[int]):
    """The pass's training batches: each member's own epoch (stacked for the vmapped step, or
    one per member), or the shared pass over the first member's loader."""
    first = self.states[live[0]] if self.serial_train else self.state
    if self.own:
      streams = [self.slots[i].stream if i in live else None for i in range(self.size)]
      epochs = [self.slots[i].run.epoch if i in live else None for i in range(self.size)]
      return cohort_data.member_batches(streams, epochs, first, self.cfg.layout,
                                        not self.serial_train,
                                        next(iter(self.batch_sharding.device_set)))
    return _shared_batches(first, self.cfg.train_loader, self.passes, self.cfg.layout,
                           "training", self.batch_sharding)

  def _split(self, state: TrainState) -> TrainState:
    """``state`` with its member axis split over the devices (as it is: a no-op copy-free put)."""
    if self.members_sharding is None:
      return state
    return jax.device_put(state, self.members_sharding)

  def place(self, i: int, member: Member) -> None:
    """Puts a started member into the free slot ``i`` (no recompile)."""
    if self.serial_train:
      self.states[i] = member.state
    else:
      self.state = self._split(core_cohort.replace_member(self.state, i, member.state))
    member.state = None
    self.slots[i] = member
    storage_call(member.trial.set_user_attr, COHORT, {"size": self.size, "slot": i})
    self._check_order(member)

  def _check_order(self, m: Member) -> None:
    """Records (and warns, once a process) that ``m`` reads the cohort's shared order, not its
    solo run's: a shuffling loader read once per shared pass, joined after the first pass or
    from another position in the shuffling."""
    loader = self.cfg.train_loader
    if self.own or cohort_data.fixed_order(loader) or (
        self.passes == 0 and cohort_data.same_position(m.stream, self.stream)):
      return
    storage_call(m.trial.set_user_attr, cohort_data.SHARED_ORDER,
                 f"joined its cohort at pass {self.passes + 1}: its epochs read the cohort's "
                 f"order of its training loader ({type(loader).__name__}), not its solo run's")
    if type(loader) not in _SHARED_WARNED:
      _SHARED_WARNED.add(type(loader))
      logger.warning(
          "Trial %d joined its cohort at pass %d and reads the cohort's order of its training "
          "loader (%s), not the order it reads alone, so its values may differ from its solo "
          "run's (recorded as its %r); a member reads its own order from a single-process torch "
          "DataLoader over a TensorDataset", m.trial.number, self.passes + 1,
          type(loader).__name__, cohort_data.SHARED_ORDER)

  def epoch(self) -> None:
    """Trains and validates every live member once; each runs its own epoch end."""
    live = self.live
    self.passes += 1
    lrs, mixups = np.zeros(self.size, np.float32), np.zeros(self.size, bool)
    for i in live:
      _, lr, mixup = self.slots[i].run.begin_epoch()
      lrs[i], mixups[i] = lr, mixup
    cfg = self.cfg
    try:
      if self.serial_train:
        for i in live:
          self.states[i] = self.states[i].with_learning_rate(lrs[i]).with_mixup(mixups[i])
      else:
        self.state = core_cohort.with_mixup(core_cohort.with_learning_rates(self.state, lrs),
                                            mixups)
      with contextlib.nullcontext() if self.own else self.stream.active():
        batches = self._training_batches(live)
        if self.serial_train:
          losses = _serial_train_pass(self.states, live, batches, self.passes)
        else:
          self.state, losses = _train_pass(self.state, batches, self.passes)
    except DataError as e:  # the shared data: every member fails on it
      for i in live:
        self.slots[i].fail(e)
      return
    bad_inputs = None
    if any(not math.isfinite(losses[i]) for i in live):
      bad_inputs = nonfinite_input_rows(self.states[live[0]] if self.serial_train else self.state,
                                        cfg.train_loader,
                                        self.passes, cfg.layout, "training")
      if bad_inputs:
        error = NonFiniteInputError(
            f"training inputs: {bad_inputs} row{'s' if bad_inputs != 1 else ''} with NaN or Inf "
            f"at epoch {self.passes}; fix the data (this is not divergence)")
        for i in live:
          self.slots[i].fail(error)
        return
    try:
      if self.serial_eval:
        states = (self.states if self.serial_train else
                  {i: core_cohort.member(self.state, i) for i in live})
        metrics = _serial_validation_pass(states, live, cfg.val_loader, self.passes, cfg.layout,
                                          self.batch_sharding, self.size)
      else:
        metrics = _validation_pass(self.state, cfg.val_loader, self.passes, cfg.layout,
                                   self.batch_sharding)
    except DataError as e:
      for i in live:
        self.slots[i].fail(e)
      return
    for i in live:
      m = self.slots[i]
      m.end_epoch(self.states[i] if self.serial_train else _MemberView(self.state, i),
                  float(losses[i]), metrics[i])  # a NaN or Inf loss: its LoopRun's divergence


class _MemberView:
  """What a member's epoch-end callbacks read of its state: its ``params`` and ``model_state``,
  copied out of the cohort on first use only (a best-state copy, on an improving epoch)."""

  def __init__(self, cohort: TrainState, i: int):
    self._cohort, self._i, self._arrays = cohort, i, None

  def _get(self):
    if self._arrays is None:
      self._arrays = core_cohort.member_arrays(self._cohort, self._i)
    return self._arrays

  @property
  def params(self):
    return self._get()[0]

  @property
  def model_state(self):
    return self._get()[1]


def _mesh(state: TrainState) -> Any:
  """The multi-device mesh ``state`` is replicated on, or None on one device."""
  sharding = getattr(state.step, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


def devices_of(state: TrainState) -> int:
  """How many devices a cohort of ``state`` s splits its members over."""
  mesh = _mesh(state)
  return 1 if mesh is None else mesh.size


def _shared_batches(cohort: TrainState, loader: Iterable, epoch: int, layout: str, role: str,
                    sharding: Any):
  """The batches every member reads, whole on every device."""
  return contextlib.closing(device_batches(loader, num_classes=cohort.spec.num_classes,
                                           layout=layout, epoch=epoch, sharding=sharding,
                                           indexed=True, role=role))


def _train_pass(cohort: TrainState, batches: Any, epoch: int) -> tuple[TrainState, np.ndarray]:
  """One pass of every member over ``batches`` (a closing iterator); the members' mean losses,
  ``[K]``."""
  cohort, per_batch, first = _committed(cohort), [], True
  with batches as batches:
    for batch in batches:
      if first:
        _check_input_shape(cohort, batch, "training", epoch)
        first = False
      cohort, sums = core_cohort.cohort_train_step(cohort, batch)
      per_batch.append(sums)
  if not per_batch:
    raise EmptyLoaderError(f"the training loader yielded no batch at epoch {epoch}")
  totals = _member_sums(per_batch)
  return cohort, totals["loss_sum"] / np.maximum(totals["count"], 1.0)


def _member_sums(per_batch: list[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
  """Each member's sums over the batches, float64 ``[K]`` per key, in one host fetch."""
  packed = jax.device_get(_packed(per_batch))  # each [n, len(SUM_KEYS), K]
  totals = np.concatenate(packed).astype(np.float64).sum(axis=0)
  return dict(zip(SUM_KEYS, totals))


def _validation_pass(cohort: TrainState, loader: Iterable, epoch: int, layout: str,
                     sharding: Any) -> list[Any]:
  """Every member's validation metrics (or the ``ValueError`` of its non-finite logits)."""
  per_batch, logits, labels, masks, first = [], [], [], [], True
  with _shared_batches(cohort, loader, epoch, layout, "validation", sharding) as batches:
    for batch in batches:
      if first:
        _check_input_shape(cohort, batch, "validation", epoch)
        first = False
      out = core_cohort.cohort_eval_step(cohort, batch)
      per_batch.append({key: out[key] for key in SUM_KEYS})
      logits.append(out["logits"])
      labels.append(out["label"])
      masks.append(out["mask"])
  if not per_batch:
    raise EmptyLoaderError(f"the validation loader yielded no batch at epoch {epoch}")
  sums = _member_sums(per_batch)
  logits, labels, masks = jax.device_get((logits, labels, masks))  # the pass's one host sync
  logits = np.concatenate(logits, axis=1).astype(np.float64)  # [K, N, C]
  labels = np.concatenate(labels, axis=1)[0]  # the batch's own, repeated per member
  mask = np.concatenate(masks, axis=1)[0]
  return [_member_metrics(logits[i], labels, mask, sums["loss_sum"][i], sums["count"][i])
          for i in range(logits.shape[0])]


def _member_metrics(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray, loss_sum: float,
                    count: float) -> Any:
  """One member's validation metrics, as ``evaluate`` computes them (or the ``ValueError`` of
  its non-finite logits)."""
  nonfinite = nonfinite_rows(logits, mask)
  if nonfinite:
    return ValueError(f"{nonfinite} of {int(count)} validation rows have non-finite logits")
  return logits_metrics(logits, labels, mask, loss_sum, count)


# A member stepped alone runs the solo program, as run_trial's epoch does: the same executable.

def _serial_train_pass(states: list, live: list[int], batches: Any, epoch: int) -> np.ndarray:
  """One pass over ``batches`` (a closing iterator of shared batches, or of tuples of each
  member's own) in which each live member takes its solo step on its batch, in turn; ``states``
  is updated in place. The members' mean losses, ``[K]`` (0 for a free slot)."""
  per_member, step = {i: [] for i in live}, None
  for i in live:
    states[i] = _committed(states[i])
  first = states[live[0]]
  with batches as batches:
    for batch in batches:
      own = batch if isinstance(batch, tuple) else None
      if step is None:
        batch0 = own[live[0]] if own else batch
        _check_input_shape(first, batch0, "training", epoch)
        step = _compiled(train_step, "train_step", first, batch0)
      for i in live:
        states[i], sums = step(states[i], own[i] if own else batch)
        per_member[i].append(sums)
  if step is None:
    raise EmptyLoaderError(f"the training loader yielded no batch at epoch {epoch}")
  fetched = jax.device_get({i: _packed(rows) for i, rows in per_member.items()})
  losses = np.zeros(len(states))
  for i, packed in fetched.items():
    sums = _sums(packed)
    losses[i] = sums["loss_sum"] / max(sums["count"], 1.0)
  return losses


def _serial_validation_pass(states: Any, live: list[int], loader: Iterable, epoch: int,
                            layout: str, sharding: Any, size: int) -> list[Any]:
  """Each live member's validation metrics, its solo evaluation program on every batch of one
  shared pass; None for a free slot."""
  per_member = {i: ([], []) for i in live}  # sums, logits
  labels, masks, step, first = [], [], None, states[live[0]]
  with _shared_batches(first, loader, epoch, layout, "validation", sharding) as batches:
    for batch in batches:
      if step is None:
        _check_input_shape(first, batch, "validation", epoch)
        step = _compiled(eval_step, "eval_step", first, batch)
      for i in live:
        out = step(states[i], batch)
        per_member[i][0].append({key: out[key] for key in SUM_KEYS})
        per_member[i][1].append(out["logits"])
      labels.append(out["label"])
      masks.append(out["mask"])
  if step is None:
    raise EmptyLoaderError(f"the validation loader yielded no batch at epoch {epoch}")
  fetched, labels, masks = jax.device_get((
      {i: (_packed(sums), logits) for i, (sums, logits) in per_member.items()}, labels, masks))
  labels, mask = np.concatenate(labels), np.concatenate(masks)
  results: list[Any] = [None] * size
  for i, (packed, logits) in fetched.items():
    totals = _sums(packed)
    results[i] = _member_metrics(np.concatenate(logits).astype(np.float64), labels, mask,
                                 totals["loss_sum"], totals["count"])
  return results


def compile_cohort_steps(state: TrainState, train_loader: Iterable, val_loader: Iterable, *,
                         layout: str, cohort_size: int) -> None:
  """Compiles the programs a cohort of ``cohort_size`` members of ``state``'s structure runs,
  without training anything a study keeps (for compiling ahead, :mod:`orchard_jax.study.ahead`).

  Those of a cohort's formation and refill, its training and evaluation steps (vmapped, or each
  member's solo program where :func:`programs` says so) on the first batch of each loader, the
  packing of an epoch's sums and a best-state copy. ``state`` is donated.
  """
  mesh = _mesh(state)
  serial_train, serial_eval = programs(state, mesh is not None)
  slots, device = slots_for(cohort_size, 1), next(iter(state.step.devices()))
  own = mesh is None and cohort_data.own_orders(train_loader)  # each member's own rows
  if serial_train or mesh is not None:  # the solo programs; a split cohort compiles at its start
    if own:  # and what makes a member's own batch
      cohort_data.first_member_batch(train_loader, state, slots, layout, False, device)
    compile_steps(state, train_loader, val_loader, layout=layout)
    return
  sharding = jax.sharding.SingleDeviceSharding(device)
  cohort = core_cohort.repeat(state, slots)
  cohort = core_cohort.replace_member(cohort, slots - 1, state)
  cohort = core_cohort.with_mixup(
      core_cohort.with_learning_rates(cohort, np.zeros(slots, np.float32)), np.zeros(slots, bool))
  for loader, role in ((train_loader, "training"), (val_loader, "validation")):
    if own and role == "training":  # the member-axis batch of each member's own rows
      batch = cohort_data.first_member_batch(loader, cohort, slots, layout, True, device)
    else:
      with _shared_batches(cohort, loader, 1, layout, role, sharding) as batches:
        batch = next(batches, None)
    if batch is None:
      continue
    try:
      count = max(len(loader), 1)
    except TypeError:
      count = 1
    if role == "training":
      cohort, sums = core_cohort.cohort_train_step(_committed(cohort), batch)
    elif serial_eval:
      solo = core_cohort.member(cohort, 0)
      out = _compiled(eval_step, "eval_step", solo, batch)(solo, batch)
      sums = {key: out[key] for key in SUM_KEYS}
    else:
      out = core_cohort.cohort_eval_step(cohort, batch)
      sums = {key: out[key] for key in SUM_KEYS}
    jax.block_until_ready(_packed([sums] * count))
  jax.block_until_ready(core_cohort.member_arrays(cohort, 0))


PROGRAMS_ENV = "ORCHARD_JAX_COHORT_PROGRAMS"
_PROGRAMS: dict[Any, tuple[bool, bool]] = {}


def _has_xla_conv(state: TrainState, train: bool) -> bool:
  """Whether the model's forward pass (training or evaluation mode) holds an XLA convolution;
  traced once, on a batch of 2 (no compile, no computation)."""
  spec = state.spec
  sample = jax.ShapeDtypeStruct((2, *spec.input_shape), jnp.float32)
  jaxpr = jax.make_jaxpr(
      lambda params, model_state, x: spec.model.apply(params, model_state, x, train=train,
                                                      rng=jax.random.key(0)))(
      state.params, state.model_state, sample)
  return "conv_general_dilated" in str(jaxpr)


def programs(state: TrainState, several_devices: bool = False) -> tuple[bool, bool]:
  """``(serial_train, serial_eval)``: which of a cohort's two programs step each member's solo
  program in turn instead of one vmapped program.

  The rule, from ``benchmarks/cohort_trials.py``: on XLA:CPU a program with an XLA
  convolution steps its members in turn (vmapped over weights, a convolution becomes a grouped
  one, about 6x slower per member there); every other program, and every program on other
  backends or split over several devices, is vmapped. ``ORCHARD_JAX_COHORT_PROGRAMS=vmap`` or
  ``serial`` forces one kind for both (``auto``, the default, is the rule).
  """
  forced = os.environ.get(PROGRAMS_ENV, "auto")
  if forced not in ("auto", "vmap", "serial"):
    raise ConfigError(f"{PROGRAMS_ENV} must be 'auto', 'vmap' or 'serial', got {forced!r}")
  if several_devices or forced == "vmap":
    return False, False
  if forced == "serial":
    return True, True
  if jax.default_backend() != "cpu":
    return False, False
  if state.spec not in _PROGRAMS:
    train = _has_xla_conv(state, train=True)
    _PROGRAMS[state.spec] = (train, train or _has_xla_conv(state, train=False))
  return _PROGRAMS[state.spec]

def slots_for(cohort_size: int, devices: int) -> int:
  """A cohort's slots: ``cohort_size`` rounded up to a multiple of the devices it splits over."""
  slots = -(-cohort_size // devices) * devices
  if slots != cohort_size and slots not in _ROUNDED:
    _ROUNDED.add(slots)
    logger.warning("cohort_size %d on %d devices: cohorts of %d members, %d per device",
                   cohort_size, devices, slots, slots // devices)
  return slots


_ROUNDED: set[int] = set()
_SHARED_WARNED: set[type] = set()
