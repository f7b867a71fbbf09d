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

:mod:`orchard_jax.engine.member` holds one member, :mod:`orchard_jax.engine.programs` the choice
of programs (vmapped, or each member's solo program in turn) and
:mod:`orchard_jax.engine.passes` the passes themselves;
:func:`orchard_jax.engine.driver.optimize` is the Python API and
:func:`~orchard_jax.engine.driver.run_trials` the driver whose scheduler forms and refills cohorts.

With ``cohort_size`` 1 nothing here runs: each trial is :func:`run_trial`'s,
bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from orchard_jax.core import cohort as core_cohort
from orchard_jax.core.sharding import DATA_AXIS
from orchard_jax.core.state import TrainState
from orchard_jax.engine import cohort_data
from orchard_jax.engine.callbacks import storage_call
from orchard_jax.engine.epoch import compile_steps
from orchard_jax.engine.feed import batches
from orchard_jax.engine.member import Member
from orchard_jax.engine.passes import (InTurn, Solo, Stacked, compile_pass, first_batch,
                                       train_pass, validation_pass)
from orchard_jax.engine.programs import mesh_of, programs, slots_for
from orchard_jax.engine.pruning import EpochView
from orchard_jax.errors import DataError
from orchard_jax.records import COHORT, SHARED_ORDER

logger = logging.getLogger(__name__)

__all__ = ["Cohort", "compile_cohort_steps"]


class Cohort:
  """K slots of one key: the stacked state, the members in their slots, the shared loaders."""

  def __init__(self, members: Sequence[Member], size: int):
    first = members[0]
    self.key, self.size = first.key, size
    self.cfg = first.cfg  # the loaders every member reads
    self.slots: list[Member | None] = [*members, *[None] * (size - len(members))]
    # K copies of the first state, then each other member in its slot: the same two small
    # programs as every later refill, rather than one stacking program of K states
    mesh = mesh_of(first.state)
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
    return batches(first, self.cfg.train_loader, self.passes, self.cfg.layout, "training",
                   self.batch_sharding)

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
    storage_call(m.trial.set_user_attr, SHARED_ORDER,
                 f"joined its cohort at pass {self.passes + 1}: its epochs read the cohort's "
                 f"order of its training loader ({type(loader).__name__}), not its solo run's")
    if type(loader) not in _SHARED_WARNED:
      _SHARED_WARNED.add(type(loader))
      logger.warning(
          "Trial %d joined its cohort at pass %d and reads the cohort's order of its training "
          "loader (%s), not the order it reads alone, so its values may differ from its solo "
          "run's (recorded as its %r); a member reads its own order from a single-process torch "
          "DataLoader over a TensorDataset", m.trial.number, self.passes + 1,
          type(loader).__name__, SHARED_ORDER)

  def epoch(self) -> None:
    """Trains and validates every live member once; each runs its own epoch end, in two halves:
    every member's value is reported before any member is judged."""
    live, cfg = self.live, self.cfg
    self.passes += 1
    lrs, mixups = np.zeros(self.size, np.float32), np.zeros(self.size, bool)
    for i in live:
      _, lrs[i], mixups[i] = self.slots[i].run.begin_epoch()
    try:
      if self.serial_train:
        for i in live:
          self.states[i] = self.states[i].with_learning_rate(lrs[i]).with_mixup(mixups[i])
      else:
        self.state = core_cohort.with_mixup(core_cohort.with_learning_rates(self.state, lrs),
                                            mixups)
      with contextlib.nullcontext() if self.own else self.stream.active():
        training = self._training_batches(live)
        if self.serial_train:
          losses = train_pass(InTurn(self.states, live, True), training, cfg.train_loader,
                              epoch=self.passes, layout=cfg.layout)
        else:
          self.state, losses = _train_pass(self.state, live, training, cfg.train_loader,
                                           self.passes, cfg.layout)
      if self.serial_eval:
        states = (self.states if self.serial_train else
                  {i: core_cohort.member(self.state, i) for i in live})
        stepper = InTurn(states, live, False)
      else:
        stepper = Stacked(self.state, live, False)
      validations = validation_pass(
          stepper, batches(stepper.first, cfg.val_loader, self.passes, cfg.layout, "validation",
                           self.batch_sharding),
          cfg.val_loader, epoch=self.passes, layout=cfg.layout)
    except DataError as e:  # the shared data (their non-finite inputs too): every member fails
      for i in live:
        self.slots[i].fail(e)
      return
    states = {i: self.states[i] if self.serial_train else _MemberView(self.state, i)
              for i in live}
    for i in live:  # each reports first (a NaN or Inf loss: that member's divergence)
      self.slots[i].measure(states[i], losses[i], validations[i])
    view = EpochView()  # then each is judged, from one read of the study
    for i in live:
      if self.slots[i].live:
        self.slots[i].conclude(states[i], view)


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


def _train_pass(cohort: TrainState, live: list[int], training: Any, loader: Iterable, epoch: int,
                layout: str) -> tuple[TrainState, dict[int, float]]:
  """One pass of the vmapped training program over ``training`` (a closing iterator): the
  trained cohort and each live member's mean loss."""
  stepper = Stacked(cohort, live, True)
  losses = train_pass(stepper, training, loader, epoch=epoch, layout=layout)
  return stepper.state, losses


def compile_cohort_steps(state: TrainState, train_loader: Iterable, val_loader: Iterable, *,
                         layout: str, cohort_size: int) -> None:
  """Compiles the programs a cohort of ``cohort_size`` members of ``state``'s structure runs,
  without training anything a study keeps (for compiling ahead, :mod:`orchard_jax.study.ahead`).

  Those of a cohort's formation and refill, its training and evaluation steps (vmapped, or each
  member's solo program where :func:`~orchard_jax.engine.programs.programs` says so) on the
  first batch of each loader, the packing of an epoch's sums and a best-state copy. ``state``
  is donated.
  """
  mesh = mesh_of(state)
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
  stepper = Stacked(cohort, list(range(slots)), True)
  if own:  # the member-axis batch of each member's own rows
    batch = cohort_data.first_member_batch(train_loader, cohort, slots, layout, True, device)
  else:
    batch = first_batch(batches(cohort, train_loader, 1, layout, "training", sharding))
  compile_pass(stepper, batch, train_loader, "training")
  cohort = stepper.state
  stepper = (Solo(core_cohort.member(cohort, 0), False) if serial_eval else
             Stacked(cohort, list(range(slots)), False))
  compile_pass(stepper, first_batch(batches(cohort, val_loader, 1, layout, "validation",
                                            sharding)), val_loader, "validation")
  jax.block_until_ready(core_cohort.member_arrays(cohort, 0))


_SHARED_WARNED: set[type] = set()
