"""One trial in a cohort's slot: run_trial's work for it, one epoch end at a time.

A :class:`Member` starts as :func:`~orchard_jax.engine.trial.run_trial` starts a trial
(:func:`~orchard_jax.engine.start.prepare`: its settings line, callbacks, LR controller, loop
and checked first state), then its cohort (:mod:`orchard_jax.engine.cohort_run`) trains its epochs
and hands each epoch's loss and validation to :meth:`Member.measure`, where its own run of the
loop validates, reports and keeps its best, and then, once every member has reported, judges
it in :meth:`Member.conclude` (pruning, from one :class:`~orchard_jax.engine.pruning.EpochView`
of the study for the whole cohort). Whatever ends it ends it by the outcome rule
of every trial (:func:`~orchard_jax.engine.outcome.outcome_of`). :func:`cohort_key` is what
members of one cohort share.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import jax
import optuna
from optuna.trial import TrialState

from orchard_jax.config import TrainingConfig, TrialConfig
from orchard_jax.core.state import TrainState
from orchard_jax.engine import cohort_data
from orchard_jax.engine.callbacks import OptunaReportPrune
from orchard_jax.engine.loop import EpochLog, LoopRun
from orchard_jax.engine.outcome import Outcome, outcome_of
from orchard_jax.engine.passes import Validation
from orchard_jax.engine.pruning import EpochView
from orchard_jax.engine.start import check_direction, prepare, record_config
from orchard_jax.engine.trial import trial_completed

__all__ = ["Member", "cohort_key"]


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
    self._validation: Validation | None = None
    self._log: EpochLog | None = None  # the epoch measured, to conclude
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
      self._end(outcome_of(e, self.trial, None))
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
    """Its loop's validation: the metrics of the cohort's pass (a failed one raises there, as
    :func:`~orchard_jax.engine.epoch.evaluate` raises)."""
    del state, epoch
    return self._validation.checked()

  def measure(self, state: Any, train_loss: float, validation: Validation) -> None:
    """The first half of run_trial's epoch end, with the cohort's loss and validation for this
    member (a NaN or Inf loss: its loop's divergence): its value, reported to its study."""
    with self._guard():
      self._validation = validation
      self._log = self.run.measure(state, train_loss)

  def conclude(self, state: Any, view: EpochView) -> None:
    """The second half: its callbacks, pruning judged by the cohort epoch's ``view``; a run that
    has ended completes its trial."""
    with self._guard():
      for callback in self.run.callbacks:
        if isinstance(callback, OptunaReportPrune):
          callback.view = view
      self.run.conclude(self._log, state)
      if self.run.done:
        result = self.run.finish(state)
        trial_completed(self.trial, self.training, self.best, result)
        self._end(Outcome(TrialState.COMPLETE, result.best, None, result))

  def fail(self, error: Exception) -> None:
    """Ends the member with ``error`` (bad shared data), as run_trial would end."""
    self._end(outcome_of(error, self.trial, self.cfg, log=self.log_outcome))

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
