"""The ask/tell driver of the engine: trials one by one, or in cohorts, until the budget is spent.

:func:`run_cohorts` takes ``ask``, ``configure`` and ``tell`` from its caller;
:func:`optimize` is the Python API over a plain Optuna study.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchard_jax.config import TrialConfig
from orchard_jax.engine.cohort import Outcome, _Cohort, _Member, _slots, devices_of
from orchard_jax.engine.trial import run_trial

logger = logging.getLogger(__name__)

__all__ = ["optimize", "run_cohorts"]


Ask = Callable[[], "optuna.Trial | None"]
Configure = Callable[[optuna.Trial], TrialConfig]
Tell = Callable[[optuna.Trial, Outcome], None]


def _solo(trial: optuna.Trial, cfg: TrialConfig) -> Outcome:
  """A trial that cannot join a cohort, trained alone by run_trial."""
  try:
    value = run_trial(trial, cfg)
  except optuna.TrialPruned:
    return Outcome(TrialState.PRUNED)
  except Exception as e:  # pylint: disable=broad-except
    return Outcome(TrialState.FAIL, error=e)
  return Outcome(TrialState.COMPLETE, value)




def _one_by_one(ask: Ask, configure: Configure, tell: Tell) -> int:
  told = 0
  while (trial := ask()) is not None:
    started = time.monotonic()
    try:
      outcome = _solo(trial, configure(trial))
    except optuna.TrialPruned:
      outcome = Outcome(TrialState.PRUNED)
    except Exception as e:  # pylint: disable=broad-except
      outcome = Outcome(TrialState.FAIL, error=e)
    except BaseException as e:
      tell(trial, Outcome(TrialState.FAIL, error=e, seconds=time.monotonic() - started))
      raise
    tell(trial, outcome._replace(seconds=time.monotonic() - started))
    told += 1
  return told


def run_cohorts(ask: Ask, configure: Configure, tell: Tell, cohort_size: int) -> int:
  """Runs trials in cohorts of up to ``cohort_size`` until ``ask`` has no more; returns how many.

  Args:
    ask: The next trial (asked of the study), or None when the budget is
      spent. Asked once per free slot, at an epoch boundary.
    configure: ``configure(trial) -> TrialConfig``: samples the trial's
      parameters and builds its config (it may raise: the trial fails).
    tell: ``tell(trial, outcome)``: stores how the trial ended.
    cohort_size: K, ``>= 1``.

  A trial whose structure (:func:`cohort_key`) differs from its cohort's
  waits, already asked, for a cohort of its own kind. ``KeyboardInterrupt``
  propagates, after every live member is told FAIL.
  """
  if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
    raise ValueError(f"cohort_size must be an int >= 1, got cohort_size={cohort_size!r}")
  if cohort_size == 1:  # run_trial's own path, bit for bit
    return _one_by_one(ask, configure, tell)
  waiting: collections.deque[_Member] = collections.deque()
  forming: list[_Member] = []  # taken for a cohort not yet formed
  told, spent = 0, False
  current: _Cohort | None = None

  def close(trial: optuna.Trial, outcome: Outcome) -> None:
    nonlocal told
    tell(trial, outcome)
    told += 1

  def finish(m: _Member) -> None:
    history = tuple(m.run.history) if m.run is not None else ()
    close(m.trial, m.outcome._replace(history=history, seconds=time.monotonic() - m.started))

  def started(reseed: bool, input_shape: Any) -> _Member | None:
    """A new trial, configured and started, or None when the budget is spent."""
    nonlocal spent
    while not spent:
      trial = ask()
      if trial is None:
        spent = True
        return None
      try:
        cfg = configure(trial)
      except KeyboardInterrupt as e:
        tell(trial, Outcome(TrialState.FAIL, error=e))
        raise
      except optuna.TrialPruned:
        close(trial, Outcome(TrialState.PRUNED))
        continue
      except Exception as e:  # pylint: disable=broad-except
        close(trial, Outcome(TrialState.FAIL, error=e))
        continue
      if cfg.train_epoch_fn is not None or cfg.validate_fn is not None:
        close(trial, _solo(trial, cfg))  # its own epoch functions cannot be vmapped: alone
        continue
      m = _Member(trial, cfg)
      try:
        m.start(reseed, input_shape)
      except BaseException as e:  # an interrupt while it starts: told, not left RUNNING
        m.outcome = Outcome(TrialState.FAIL, error=e)
        finish(m)
        raise
      if not m.live:
        finish(m)
        continue
      return m
    return None

  def take(key: Any, reseed: bool) -> _Member | None:
    """A started member of ``key`` (any key when None): a waiting one first, else one newly
    asked; newly asked ones of another key wait. None when there is none."""
    for m in list(waiting):
      if key is None or m.key == key:
        waiting.remove(m)
        return m
    m = started(reseed, None if key is None else key[0].input_shape)
    if m is None:
      return None
    if key is not None and m.key != key:
      waiting.append(m)
      return None
    return m

  try:
    while True:
      if current is None or not current.live:
        first = take(None, True)
        if first is None:
          break
        split = devices_of(first.state)
        forming.append(first)
        slots = _slots(cohort_size, split)
        while len(forming) < slots:
          m = take(first.key, False)
          if m is None:
            break
          forming.append(m)
        current = _Cohort(forming, slots)
        logger.info("Cohort of %d: trials %s%s", len(forming),
                    ", ".join(str(m.trial.number) for m in forming),
                    f" (members split over {split} devices)" if split > 1 else "")
        forming = []
      current.epoch()
      for i, m in enumerate(current.slots):
        if m is not None and not m.live:
          finish(m)
          current.slots[i] = None
      for i, m in enumerate(current.slots):
        if m is None and current.live:  # refill at the epoch boundary
          new = take(current.key, False)
          if new is None:
            break
          current.place(i, new)
  except BaseException as e:
    held = [*(current.slots if current else ()), *forming, *waiting]
    for m in {id(m): m for m in held if m is not None and m.live}.values():
      m.outcome = Outcome(TrialState.FAIL, error=e)
      with contextlib.suppress(Exception):
        finish(m)
    raise
  return told


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
    if outcome.state == TrialState.COMPLETE:
      study.tell(trial, outcome.value)
    else:
      if outcome.error is not None and outcome.state == TrialState.FAIL:
        logger.warning("Trial %d failed: %s: %s", trial.number, type(outcome.error).__name__,
                       outcome.error)
      study.tell(trial, state=outcome.state)
    frozen = study._storage.get_trial(trial._trial_id)  # pylint: disable=protected-access
    for callback in callbacks:
      callback(study, frozen)

  run_cohorts(ask, configure, tell, cohort_size)
