"""A cohort epoch's pruning: every member reports before any is judged, from one read of the
study; the same-epoch rule lets a cohort's members compete at the epoch they share."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from orchard_jax.engine.driver import optimize
from orchard_jax.engine.pruning import EpochView, SameEpochPruner

PRUNERS = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
    "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=6),
    "same_epoch": lambda: SameEpochPruner(3),
}
# Finished trials' curves (higher is better), then 6 running trials' values at steps 0..2.
FINISHED = [[0.5, 0.6, 0.7, 0.8], [0.2, 0.3, 0.35, 0.4], [0.6, 0.7, 0.75, 0.9]]
RUNNING = [[0.1, 0.2, 0.25], [0.55, 0.65, 0.72], [0.3, 0.2, 0.1], [0.6, 0.8, 0.9],
           [0.45, 0.5, 0.55], [0.7, 0.71, 0.72]]


def _study(pruner):
  # one name for both studies: hyperband's brackets hash it with the trial number
  study = optuna.create_study(study_name="s", direction="maximize", pruner=pruner)
  for curve in FINISHED:
    trial = study.ask()
    for step, value in enumerate(curve):
      trial.report(value, step)
    study.tell(trial, curve[-1])
  running = [study.ask() for _ in RUNNING]
  return study, running


def _counted(study, monkeypatch):
  reads = []
  storage = study._storage
  original = storage.get_all_trials
  monkeypatch.setattr(storage, "get_all_trials",
                      lambda *a, **k: reads.append(1) or original(*a, **k))
  return reads


@pytest.mark.parametrize("kind", sorted(PRUNERS))
def test_an_epoch_view_judges_as_should_prune_from_one_read(kind, monkeypatch):
  # Both studies: each running trial reports its value at a step, then each is judged in
  # turn, by trial.should_prune() in one and by one EpochView per step in the other. Same
  # decisions and same stored rung values (successive halving's and hyperband's writes).
  alone, alone_trials = _study(PRUNERS[kind]())
  viewed, viewed_trials = _study(PRUNERS[kind]())
  reads = _counted(viewed, monkeypatch)
  for step in range(3):
    for a, b, curve in zip(alone_trials, viewed_trials, RUNNING):
      a.report(curve[step], step)
      b.report(curve[step], step)
    reads.clear()
    view = EpochView()
    got = [view.should_prune(t) for t in viewed_trials]
    assert len(reads) == 1, (step, len(reads))
    assert got == [t.should_prune() for t in alone_trials], step
  attrs = lambda study: [t.system_attrs for t in study.get_trials()]
  assert attrs(viewed) == attrs(alone)


def test_the_same_epoch_rule_compares_with_every_trial_at_the_epoch():
  study, running = _study(SameEpochPruner(3))
  for trial, curve in zip(running, RUNNING):
    trial.report(curve[0], 0)
  # at step 0 the others: 0.5, 0.2, 0.6 (finished) and the 5 other running values
  decisions = [t.should_prune() for t in running]
  for trial, curve, pruned in zip(running, RUNNING, decisions):
    others = [c[0] for c in FINISHED] + [c[0] for c in RUNNING if c is not curve]
    others.sort()
    median = (others[3] + others[4]) / 2
    assert pruned == (curve[0] < median), trial.number
  assert decisions == [True, False, True, False, True, False]


def test_the_same_epoch_rule_counts_a_finished_trial_at_later_epochs_with_its_last_value():
  # Two trials pruned at step 0 stay in the field at step 1 with their step-0 values, so the
  # survivors are not halved again among themselves; a running trial behind counts not yet.
  study = optuna.create_study(direction="maximize", pruner=SameEpochPruner(3))
  for value in (0.1, 0.2):
    pruned = study.ask()
    pruned.report(value, 0)
    study.tell(pruned, state=TrialState.PRUNED)
  survivors = [study.ask() for _ in range(3)]
  behind = study.ask()
  behind.report(0.9, 0)
  for trial, value in zip(survivors, (0.5, 0.6, 0.7)):
    trial.report(value, 0)
    trial.report(value, 1)
  # the first survivor's field at step 1: 0.1, 0.2 (carried), 0.6, 0.7: median 0.4 < 0.5
  assert [t.should_prune() for t in survivors] == [False, False, False]
  # at step 2 only the two finished trials count (the running ones are not there yet): too few
  survivors[0].report(0.15, 2)
  assert not survivors[0].should_prune()


def test_the_same_epoch_rule_waits_for_enough_trials_and_prunes_nan():
  study = optuna.create_study(direction="minimize", pruner=SameEpochPruner(2))
  first, second, third = (study.ask() for _ in range(3))
  first.report(5.0, 0)
  second.report(1.0, 0)
  assert not first.should_prune()  # one other value: too few to judge
  third.report(3.0, 0)
  assert first.should_prune() and not second.should_prune()  # minimize: 5 > median(1, 3)
  third.report(math.nan, 1)
  assert third.should_prune()
  with pytest.raises(ValueError, match="min_trials must be an int >= 1, got min_trials=0"):
    SameEpochPruner(0)


LOSS = {"monitor_metric": "loss", "monitor_direction": "minimize"}


def test_a_cohort_s_first_member_is_judged_against_all_its_peers_at_their_epoch(make_cfg):
  # Every member reports before any is judged: the first member, the worst learner, sees the
  # three others' values of epoch 1 and is pruned there; judged before they reported, it would
  # have had no other trial at its epoch and run on.
  rates = (1e-4, 0.1, 0.2, 0.3)

  def configure(trial):
    lr = trial.suggest_float("learning_rate", 1e-5, 1.0, log=True)
    return make_cfg(training={**LOSS, "learning_rate": lr},
                    optuna={"enable_pruning": True, "pruning_warmup_epochs": 1,
                            "pruner_type": "same_epoch"})

  study = optuna.create_study(direction="minimize", pruner=SameEpochPruner(3))
  for lr in rates:
    study.enqueue_trial({"learning_rate": lr})
  optimize(study, configure, n_trials=4, cohort_size=4)
  first = study.trials[0]
  assert first.state == TrialState.PRUNED and first.last_step == 1, first
  values = {t.number: t.intermediate_values[1] for t in study.trials}
  assert values[0] == max(values.values())
