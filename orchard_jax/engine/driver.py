"""The engine's one ask/tell driver: trials one by one, or in cohorts, until the budget is spent.

:func:`run_trials` takes ``ask``, ``configure`` and ``tell`` from its caller
(the study's are :class:`orchard_jax.study.ask_tell.StudyDriver`'s);
:func:`optimize` is the Python API over a plain Optuna study. A trial trained
alone goes through :func:`~orchard_jax.engine.trial.train_trial`, run_trial's
path bit for bit; trials of one structure train together, vmapped, in a
:class:`~orchard_jax.engine.cohort_run.Cohort` that :class:`CohortScheduler` forms
and refills at epoch boundaries.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.config import TrialConfig
from orchard_jax.engine.cohort_run import Cohort
from orchard_jax.engine.member import Member
from orchard_jax.engine.outcome import Outcome, outcome_of
from orchard_jax.engine.programs import devices_of, slots_for
from orchard_jax.engine.trial import train_trial

logger = logging.getLogger(__name__)

__all__ = ["CohortScheduler", "optimize", "run_trials"]


Ask = Callable[[], "optuna.Trial | None"]
Configure = Callable[[optuna.Trial], TrialConfig]
Tell = Callable[[optuna.Trial, Outcome], None]


def _raise_interrupt(outcome: Outcome) -> None:
  """Raises the error of a trial ended by an interrupt (a ``BaseException`` that is no
  ``Exception``), once the trial was told."""
  if outcome.error is not None and not isinstance(outcome.error, Exception):
    raise outcome.error


def _release_frames(error: BaseException | None) -> None:
  """Clears the local variables of the finished frames in the tracebacks of ``error`` and its
  causes (the arrays of the trial it ended); the tracebacks still say where it was raised."""
  seen: set[int] = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    traceback.clear_frames(error.__traceback__)
    error = error.__cause__ or error.__context__


def _trained(trial: optuna.Trial, configure: Configure, log_outcome: bool) -> Outcome:
  """The outcome of ``trial``, configured and trained alone (:func:`train_trial`)."""
  try:
    cfg = configure(trial)
  except BaseException as e:  # pylint: disable=broad-except  # told, then an interrupt raised
    return outcome_of(e, trial, None)
  return train_trial(trial, cfg, log_outcome=log_outcome)


def _one_by_one(ask: Ask, configure: Configure, tell: Tell, log_outcome: bool) -> int:
  """Trains each trial alone until ``ask`` has no more; returns how many were told."""
  told = 0
  while (trial := ask()) is not None:
    started = time.monotonic()
    outcome = _trained(trial, configure, log_outcome)
    # Told without its trained state, which goes first (the caller may give its memory back,
    # and nothing of this trial lives on while the next one starts).
    _release_frames(outcome.error)
    outcome = outcome._replace(result=None, seconds=time.monotonic() - started)
    tell(trial, outcome)
    told += 1
    _raise_interrupt(outcome)
  return told


def _ended(m: Member, error: BaseException) -> Outcome:
  """The outcome of member ``m``, stopped by ``error`` while live: FAIL, its epochs so far."""
  history = () if m.run is None else tuple(m.run.history)
  return Outcome(TrialState.FAIL, error=error, history=history,
                 seconds=time.monotonic() - m.started)


class CohortScheduler:
  """Forms cohorts of up to ``cohort_size`` started members and refills their free slots at
  epoch boundaries, until ``ask`` has no more (see :func:`run_trials`).

  ``waiting``: started members of another structure than the current cohort's,
  already asked; ``forming``: members taken for a cohort not yet formed;
  ``current``: the cohort training; ``told``: trials told so far; ``spent``:
  ``ask`` said the budget is spent.
  """

  def __init__(self, ask: Ask, configure: Configure, tell: Tell, cohort_size: int,
               log_outcome: bool = True):
    self.ask, self.configure, self._tell = ask, configure, tell
    self.cohort_size, self.log_outcome = cohort_size, log_outcome
    self.waiting: collections.deque[Member] = collections.deque()
    self.forming: list[Member] = []
    self.current: Cohort | None = None
    self.told, self.spent = 0, False

  def run(self) -> int:
    """Trains cohorts until the budget is spent and every member ended; returns how many trials
    were told. An interrupt (any exception) tells every live member FAIL, then propagates."""
    try:
      while self.current is not None and self.current.live or self._form():
        self.current.epoch()
        self._end_epoch()
    except BaseException as e:
      self._interrupted(e)
      raise
    return self.told

  def _tell_one(self, trial: optuna.Trial, outcome: Outcome) -> None:
    self._tell(trial, outcome)
    self.told += 1

  def _finish(self, m: Member) -> None:
    self._tell_one(m.trial, m.outcome)

  def _started(self, reseed: bool, input_shape: Any) -> Member | None:
    """A new trial, configured and started, or None when the budget is spent. A trial that
    ends before it can join (its configuration failed, its start failed, its own epoch
    functions cannot be vmapped: trained alone) is told here."""
    while not self.spent:
      trial = self.ask()
      if trial is None:
        self.spent = True
        return None
      try:
        cfg = self.configure(trial)
      except BaseException as e:  # pylint: disable=broad-except
        outcome = outcome_of(e, trial, None)
        if isinstance(e, Exception):  # TrialPruned among them
          self._tell_one(trial, outcome)
          continue
        self._tell(trial, outcome)
        raise
      if cfg.train_epoch_fn is not None or cfg.validate_fn is not None:
        outcome = train_trial(trial, cfg, log_outcome=self.log_outcome)
        self._tell_one(trial, outcome)  # its own epoch functions cannot be vmapped: alone
        _raise_interrupt(outcome)
        continue
      m = Member(trial, cfg, self.log_outcome)
      try:
        m.start(reseed, input_shape)
      except BaseException as e:  # an interrupt while it starts: told, not left RUNNING
        self._tell_one(trial, _ended(m, e))
        raise
      if not m.live:
        self._finish(m)
        continue
      return m
    return None

  def _take(self, key: Any, reseed: bool) -> Member | None:
    """A started member of ``key`` (any key when None): a waiting one first, else one newly
    asked; newly asked ones of another key wait. None when there is none."""
    for m in list(self.waiting):
      if key is None or m.key == key:
        self.waiting.remove(m)
        return m
    m = self._started(reseed, None if key is None else key[0].input_shape)
    if m is None:
      return None
    if key is not None and m.key != key:
      self.waiting.append(m)
      return None
    return m

  def _form(self) -> bool:
    """Forms the next cohort (a first member, then members of its structure up to its slots);
    False when there is no member left to train."""
    first = self._take(None, True)
    if first is None:
      return False
    split = devices_of(first.state)
    self.forming.append(first)
    slots = slots_for(self.cohort_size, split)
    while len(self.forming) < slots:
      m = self._take(first.key, False)
      if m is None:
        break
      self.forming.append(m)
    cohort = Cohort(self.forming, slots)
    self.current, members, self.forming = cohort, self.forming, []
    logger.info("Cohort of %d: trials %s%s", len(members),
                ", ".join(str(m.trial.number) for m in members),
                f" (members split over {split} devices)" if split > 1 else "")
    return True

  def _end_epoch(self) -> None:
    """Tells the members that ended with the epoch, and refills their slots."""
    current = self.current
    for i, m in enumerate(current.slots):
      if m is not None and not m.live:
        self._finish(m)
        current.slots[i] = None
    for i, m in enumerate(current.slots):
      if m is None and current.live:  # refill at the epoch boundary
        new = self._take(current.key, False)
        if new is None:
          break
        current.place(i, new)

  def _interrupted(self, error: BaseException) -> None:
    """Tells every live member (training, forming or waiting) FAIL with ``error``."""
    held = [*(self.current.slots if self.current else ()), *self.forming, *self.waiting]
    for m in {id(m): m for m in held if m is not None and m.live}.values():
      with contextlib.suppress(Exception):
        self._tell_one(m.trial, _ended(m, error))


def run_trials(ask: Ask, configure: Configure, tell: Tell, cohort_size: int = 1, *,
               log_outcome: bool = True) -> int:
  """Runs trials, ``cohort_size`` at a time, until ``ask`` has no more; returns how many.

  Args:
    ask: The next trial (asked of the study), or None when the budget is
      spent. In cohorts, asked once per free slot, at an epoch boundary.
    configure: ``configure(trial) -> TrialConfig``: samples the trial's
      parameters and builds its config (it may raise: the trial fails).
    tell: ``tell(trial, outcome)``: stores how the trial ended (its
      :class:`~orchard_jax.engine.outcome.Outcome`, with its epochs and seconds).
    cohort_size: K, ``>= 1``; 1 trains each trial alone, as run_trial does.
    log_outcome: Whether the engine logs each trial's failure or pruning
      (False: the caller logs each finished trial itself).

  A trial whose structure (:func:`~orchard_jax.engine.member.cohort_key`)
  differs from its cohort's waits, already asked, for a cohort of its own
  kind. ``KeyboardInterrupt`` propagates, after every live trial is told FAIL.
  """
  if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
    raise ValueError(f"cohort_size must be an int >= 1, got cohort_size={cohort_size!r}")
  if cohort_size == 1:  # run_trial's own path, bit for bit
    return _one_by_one(ask, configure, tell, log_outcome)
  return CohortScheduler(ask, configure, tell, cohort_size, log_outcome).run()


def optimize(study: optuna.Study, configure: Configure, n_trials: int, *, cohort_size: int = 1,
             callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()) -> None:
  """Runs ``n_trials`` trials of ``study``, trained in cohorts of ``cohort_size``.

  ``configure(trial) -> TrialConfig`` suggests the trial's values and builds
  its config, as an objective's body does before ``run_trial``. Trials of one
  structure (model, optimizer kind, precision, criterion, batch size, data
  seed, data) train together, vmapped, up to ``cohort_size`` at a time (see
  :mod:`orchard_jax.engine.cohort_data` for the order each reads). Each trial is told its
  value, PRUNED or FAIL, and has the records a :func:`run_trial` trial has.
  ``callbacks(study, frozen_trial)`` run after each tell, as
  ``study.optimize``'s do.

  ``cohort_size=1`` is ``study.optimize(lambda t: run_trial(t, configure(t)),
  n_trials)`` with ask and tell.

  Raises:
    ValueError: ``n_trials`` or ``cohort_size`` is not an int >= 1.
    KeyboardInterrupt: after the running trials are told FAIL.
  """
  if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
    raise ValueError(f"n_trials must be an int >= 1, got n_trials={n_trials!r}")
  asked = 0

  def ask() -> optuna.Trial | None:
    nonlocal asked
    if asked >= n_trials:
      return None
    asked += 1
    return study.ask()

  def tell(trial: optuna.Trial, outcome: Outcome) -> None:
    if outcome.trial_state == TrialState.COMPLETE:
      study.tell(trial, outcome.value)
    else:
      if outcome.error is not None and outcome.trial_state == TrialState.FAIL:
        logger.warning("Trial %d failed: %s: %s", trial.number, type(outcome.error).__name__,
                       outcome.error)
      study.tell(trial, state=outcome.trial_state)
    frozen = study._storage.get_trial(trial._trial_id)  # pylint: disable=protected-access
    for callback in callbacks:
      callback(study, frozen)

  run_trials(ask, configure, tell, cohort_size)
