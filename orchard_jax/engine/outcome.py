"""How a trial ended, and the one rule that turns the exception that ended it into that.

:func:`outcome_of` is the rule of :func:`~orchard_jax.engine.trial.run_trial`, of a cohort's
member (:mod:`orchard_jax.engine.member`) and of the driver
(:mod:`orchard_jax.engine.driver`):

* ``optuna.TrialPruned``: PRUNED (with it);
* a :class:`~orchard_jax.errors.StorageFault` (the study's storage failed, not the trial),
  or a ``BaseException`` that is no ``Exception`` (``KeyboardInterrupt``): FAIL with it,
  nothing logged or recorded;
* bad data (:class:`~orchard_jax.errors.DataError`), a setup or configuration error (they
  would fail every trial the same way), a run whose every validation failed
  (:class:`~orchard_jax.errors.ValidationFailedError`) or, with ``reraise_errors``, any
  other ``Exception``: FAIL, logged and recorded as the trial's ``error`` attribute;
* any other ``Exception`` (divergence, three failed validations): logged and recorded as
  well, and COMPLETE with the worst value, as the reference's objective guard returns it.

A storage fault while recording the error ends the trial FAIL with that fault.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import optuna
from optuna.trial import TrialState

from orchard_jax.config import ConfigError, TrialConfig
from orchard_jax.engine.callbacks import storage_call
from orchard_jax.engine.loop import EpochLog, LoopResult, worst_value
from orchard_jax.errors import DataError, SetupError, StorageFault, ValidationFailedError
from orchard_jax.records import ERROR

logger = logging.getLogger(__name__)

__all__ = ["Outcome", "outcome_of"]


class Outcome(NamedTuple):
  """How a trial ended: what to tell Optuna.

  ``trial_state`` is COMPLETE (with ``value``), PRUNED or FAIL; ``error`` is the
  exception of a FAIL (a :class:`~orchard_jax.errors.StorageFault` or a
  ``KeyboardInterrupt`` among them), of a run-time failure that returned the
  worst value, or the ``TrialPruned`` of a PRUNED (None when a trial is pruned
  without one), None otherwise; ``result`` the loop's result when the trial ran
  to its end; ``history`` its epochs, one per epoch it ended (for a failed,
  pruned or interrupted trial too); ``seconds`` the time from its start to its end.
  """
  trial_state: TrialState
  value: float | None = None
  error: BaseException | None = None
  result: LoopResult | None = None
  history: tuple[EpochLog, ...] = ()
  seconds: float = 0.0


_FAILED_ON = ((DataError, "Trial %d failed on bad data: %s: %s"),
              ((SetupError, ConfigError), "Trial %d failed on its setup: %s: %s"),
              (Exception, "Trial %d failed: %s: %s"))


def outcome_of(error: BaseException, trial: optuna.Trial, cfg: TrialConfig | None, *,
               history: Sequence[EpochLog] = (), log: bool = True) -> Outcome:
  """The outcome of ``trial``, ended by ``error`` (see the module docstring for the rule).

  Args:
    error: What ended the trial.
    trial: The trial; its ``error`` attribute records a failure.
    cfg: Its config (``reraise_errors`` and the monitored direction); None for a trial
      that has none (its configuration raised): PRUNED or FAIL, nothing logged or recorded.
    history: The epochs it ended.
    log: Whether to log the failure (``Trial 3 failed: RuntimeError: ...``); a caller
      that logs each finished trial itself passes False. The error is recorded either way.
  """
  history = tuple(history)
  if isinstance(error, optuna.TrialPruned):
    return Outcome(TrialState.PRUNED, error=error, history=history)
  if cfg is None or isinstance(error, StorageFault) or not isinstance(error, Exception):
    return Outcome(TrialState.FAIL, error=error, history=history)
  line = next(line for kind, line in _FAILED_ON if isinstance(error, kind))
  if log:
    logger.error(line, trial.number, type(error).__name__, error)
  try:
    storage_call(trial.set_user_attr, ERROR, f"{type(error).__name__}: {error}")
  except StorageFault as fault:
    return Outcome(TrialState.FAIL, error=fault, history=history)
  if (isinstance(error, (DataError, SetupError, ConfigError, ValidationFailedError))
      or cfg.reraise_errors):  # no value of its own
    return Outcome(TrialState.FAIL, error=error, history=history)
  return Outcome(TrialState.COMPLETE, worst_value(cfg.training.monitor_direction), error,
                 history=history)
