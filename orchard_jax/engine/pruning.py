"""The pruner's view of a study at one cohort epoch: its trials read once, for every member.

A trial alone asks ``trial.should_prune()``, which reads the study's trials back from the
storage. A cohort's members end their epochs together: each reports its value first
(:meth:`~orchard_jax.engine.loop.LoopRun.measure`), then each is judged
(:meth:`~orchard_jax.engine.loop.LoopRun.conclude`) against one :class:`EpochView`, which
reads the trials at the first judgement of the epoch and serves every later one from that
read. What a pruner writes while it judges (successive halving's rung values) goes to the
storage and into the view, so a later member sees it as it would have read it back; every
member sees all the cohort's values of the epoch, whatever its place in the cohort.

:class:`SameEpochPruner` is the rule made for cohorts: a trial is compared with every other
trial at its epoch, running (its cohort's other members), pruned or complete.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any, Container

import optuna
from optuna.trial import TrialState

__all__ = ["EpochView", "SameEpochPruner"]


class _Trials:
  """A storage that answers a study's trials from one read and writes through to ``storage``
  (the rest of the storage interface is ``storage``'s own)."""

  def __init__(self, storage: Any, study_id: int):
    self._storage, self._study_id = storage, study_id
    self._trials = {t._trial_id: copy.copy(t)  # pylint: disable=protected-access
                    for t in storage.get_all_trials(study_id, deepcopy=False)}
    self._names: dict[str, int] = {}

  def get_all_trials(self, study_id: int, deepcopy: bool = True,
                     states: Container[optuna.trial.TrialState] | None = None) -> list:
    if study_id != self._study_id:
      return self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)
    trials = [t for t in self._trials.values() if states is None or t.state in states]
    return copy.deepcopy(trials) if deepcopy else trials

  def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
    trial = self._trials.get(trial_id)
    return self._storage.get_trial(trial_id) if trial is None else trial

  def get_study_id_from_name(self, study_name: str) -> int:
    if study_name not in self._names:  # a hyperband bracket opens the study by its name
      self._names[study_name] = self._storage.get_study_id_from_name(study_name)
    return self._names[study_name]

  def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
    self._storage.set_trial_system_attr(trial_id, key, value)
    trial = self._trials.get(trial_id)
    if trial is not None:
      trial._system_attrs = {**trial.system_attrs, key: value}  # pylint: disable=protected-access

  def __getattr__(self, name: str) -> Any:
    return getattr(self._storage, name)


class EpochView:
  """One cohort epoch's pruning decisions over one read of the study (made at the first)."""

  def __init__(self):
    self._studies: dict[int, tuple[optuna.Study, _Trials]] = {}

  def should_prune(self, trial: optuna.Trial) -> bool:
    """What ``trial.should_prune()`` answers, from this epoch's read of its study."""
    study = trial.study
    if len(study.directions) > 1:
      return trial.should_prune()  # raises as Optuna does
    key = id(study)
    if key not in self._studies:
      trials = _Trials(study._storage, study._study_id)  # pylint: disable=protected-access
      view = copy.copy(study)
      view._storage = trials  # pylint: disable=protected-access
      self._studies[key] = view, trials
    view, trials = self._studies[key]
    return study.pruner.prune(view, trials.get_trial(trial._trial_id))  # pylint: disable=protected-access


class SameEpochPruner(optuna.pruners.BasePruner):
  """Prunes a trial whose value at its epoch is worse than the median of the other trials'
  values there, once at least ``min_trials`` other trials have one.

  A running trial counts with its value at the epoch, if it reported one (a cohort's other
  members have: each reports before any is judged); a finished one (complete or pruned) with
  its value at the epoch or, if it stopped before it, its last value before it. A pruned trial
  so stays in the field it was pruned from: the trials that outlive it are not halved again
  at each epoch among themselves. Optuna's median pruner compares with complete trials only,
  so a study's first cohort, whose members all run at once, is never pruned; this rule lets
  a cohort's members compete at the epoch they share, with every trial that came before
  them. A NaN value is pruned.
  """

  def __init__(self, min_trials: int = 4):
    if isinstance(min_trials, bool) or not isinstance(min_trials, int) or min_trials < 1:
      raise ValueError(f"min_trials must be an int >= 1, got min_trials={min_trials!r}")
    self.min_trials = min_trials

  def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    step = trial.last_step
    if step is None:
      return False
    value = trial.intermediate_values[step]
    if math.isnan(value):
      return True
    others = [v for t in study.get_trials(deepcopy=False) if t.number != trial.number
              for v in [_value_at(t, step)] if v is not None and not math.isnan(v)]
    if len(others) < self.min_trials:
      return False
    median = statistics.median(others)
    return value < median if study.direction == optuna.study.StudyDirection.MAXIMIZE \
        else value > median


def _value_at(trial: optuna.trial.FrozenTrial, step: int) -> float | None:
  """``trial``'s value at ``step``; a finished trial's last one before it if it stopped
  earlier; None for a running trial not there yet (or a failed or waiting one)."""
  values = trial.intermediate_values
  if step in values:
    return values[step] if trial.state in _COUNTED else None
  if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
    return None
  before = [s for s in values if s < step]
  return values[max(before)] if before else None


_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
