"""A cohort member reads its own data, in its own epoch order: every member's values are those of
the same trial run alone by ``run_trial`` (same parameters, same seed), bad data fails only the
members that read it, and a member that joins at a refill or after a cohort's forming was cut
short matches its solo run too. The Optuna storage is counted by state.

The data: scikit-learn's digits (64 features), a tiny MLP, shuffled single-process DataLoaders
over TensorDatasets (the loader the README's Python API example builds), shared by every trial
as a user's ``configure`` shares them; and the command line's in-memory arrays (an
``ArraySource``'s numpy ``ArrayLoader`` s, fresh for every trial as the command line makes them).
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset, default_collate

from orchard_jax.config import OptunaConfig, TrainingConfig, TrialConfig
from orchard_jax.data import make_loader
from orchard_jax.engine import cohort_run as engine_cohort
from orchard_jax.engine import run_trial
from orchard_jax.engine.programs import PROGRAMS_ENV
from orchard_jax.engine.driver import optimize
from orchard_jax.engine.cohort_data import data_identity
from orchard_jax.errors import DataError
from orchard_jax.models import MLP
from orchard_jax.records import COHORT, SHARED_ORDER
from orchard_jax.study.sources import array_source

CLASSES = 10
_X, _Y = load_digits(return_X_y=True)
_X = (_X / 16.0).astype(np.float32)
TRAIN = (torch.from_numpy(_X[:384]), torch.from_numpy(_Y[:384]))
VAL = (torch.from_numpy(_X[384:576]), torch.from_numpy(_Y[384:576]))
NARROW, WIDE = MLP(num_classes=CLASSES, hidden=(16,), dropout=0.1), MLP(num_classes=CLASSES,
                                                                        hidden=(24,))


def train_loader(images=TRAIN[0], labels=TRAIN[1], **kwargs):
  return make_loader(TensorDataset(images, labels), batch_size=64, shuffle=True, seed=0, **kwargs)


def val_loader(images=VAL[0], labels=VAL[1]):
  return make_loader(TensorDataset(images, labels), batch_size=96, shuffle=False)


def configurator(loaders=None, epochs=None, width=False, narrow=NARROW):
  """``configure(trial)``: a learning rate, the shared loaders unless ``loaders(number)`` gives a
  trial its own, ``epochs(number)`` epochs (3), a wider MLP for ``width`` 24."""
  shared = train_loader(), val_loader()

  def configure(trial):
    lr = trial.suggest_float("learning_rate", 0.01, 0.5, log=True)
    model = WIDE if width and trial.suggest_categorical("width", [16, 24]) == 24 else narrow
    train, val = (loaders(trial.number) if loaders else None) or shared
    n = epochs(trial.number) if epochs else 3
    return TrialConfig(
        model=model, train_loader=train, val_loader=val, num_classes=CLASSES, log_interval=1,
        training=TrainingConfig(batch_size=64, use_amp=False, use_tqdm=False, learning_rate=lr,
                                momentum=0.9, mixup_alpha=0.0, scheduler_type="none", epochs=n,
                                monitor_metric="loss", monitor_direction="minimize"),
        optuna=OptunaConfig(epochs=n, enable_pruning=False, pruner_type="none",
                            storage="memory"))
  return configure


def solo_and_cohort(configure, params, cohort_size):
  made = []
  for _ in range(2):
    study = optuna.create_study(direction="minimize")
    for p in params:
      study.enqueue_trial(p)
    made.append(study)
  solo, cohort = made
  solo.optimize(lambda t: run_trial(t, configure(t)), n_trials=len(params), catch=(DataError,))
  optimize(cohort, configure, n_trials=len(params), cohort_size=cohort_size)
  return solo, cohort


def states(study) -> collections.Counter:
  """The study's trials by state, as its storage holds them."""
  return collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))


def assert_solo_values(solo, cohort, exact=False):
  """Same state, error and per-epoch values as alone (within the cohort tests' 1e-3)."""
  for a, b in zip(solo.trials, cohort.trials):
    assert (b.number, b.state, b.params) == (a.number, a.state, a.params)
    assert b.user_attrs.get("error") == a.user_attrs.get("error"), b.number
    assert sorted(b.intermediate_values) == sorted(a.intermediate_values), b.number
    for step, value in a.intermediate_values.items():
      got = b.intermediate_values[step]
      assert got == value if exact else got == pytest.approx(value, rel=1e-4, abs=1e-3), (
          b.number, step, got, value)
    assert SHARED_ORDER not in b.user_attrs


RATES = [{"learning_rate": lr} for lr in (0.05, 0.1, 0.2, 0.3)]


def bad_loaders(kind, number):
  """Trial ``number``'s own loaders: a NaN in a training row, or a validation label 12."""
  if kind == "train_nan":
    images = TRAIN[0].clone()
    images[5, 3] = float("nan")
    return train_loader(images), val_loader()
  labels = VAL[1].clone()
  labels[7] = 12
  return train_loader(), val_loader(labels=labels)


@pytest.mark.parametrize("kind", ["train_nan", "val_labels"])
@pytest.mark.parametrize("bad", [2, 0])
def test_a_member_with_bad_data_of_its_own_fails_alone_with_its_data_error(kind, bad):
  own = bad_loaders(kind, bad)
  configure = configurator(loaders=lambda number: own if number == bad else None)
  solo, cohort = solo_and_cohort(configure, RATES, cohort_size=4)
  assert states(solo) == states(cohort) == {"COMPLETE": 3, "FAIL": 1}
  failed = cohort.trials[bad]
  assert failed.state == TrialState.FAIL
  want = ("NonFiniteInputError: training inputs: 1 row with NaN or Inf at epoch 1"
          if kind == "train_nan" else
          "DataError: validation labels must be in [0, 10), got 12 in batch 0 (epoch 1)")
  assert failed.user_attrs["error"].startswith(want), failed.user_attrs["error"]
  assert_solo_values(solo, cohort)


def check_the_refilled_member(configure, programs, xla_compiles):
  """Three trials in cohorts of 2, trial 2 taking trial 1's slot: every value is its solo run's
  (bit for bit when members are stepped in turn), and a vmapped cohort compiles its training
  step once, refill included."""
  with xla_compiles() as seen:
    solo, cohort = solo_and_cohort(configure, RATES[:3], cohort_size=2)
  assert states(solo) == states(cohort) == {"COMPLETE": 3}
  assert [t.user_attrs[COHORT]["slot"] for t in cohort.trials] == [0, 1, 1]
  assert_solo_values(solo, cohort, exact=programs == "serial")  # serial: the solo program
  if programs == "auto":  # vmapped, each member its own rows: one program, refill included
    assert seen.by_name["jit(_cohort_train_step)"] == 1, seen.by_name


@pytest.mark.parametrize("programs", ["auto", "serial"])
def test_a_member_that_joins_at_a_refill_reads_its_own_order_and_matches_its_solo_run(
    monkeypatch, programs, xla_compiles):
  # trial 1 trains one epoch; trial 2 takes its slot at the cohort's second pass, at its own
  # epoch 1 while trial 0 is at its epoch 2: the two read different orders of one loader
  monkeypatch.setenv(PROGRAMS_ENV, programs)
  configure = configurator(epochs=lambda number: 1 if number == 1 else 3)
  check_the_refilled_member(configure, programs, xla_compiles)


@pytest.mark.parametrize("programs, shape_given, width", [("auto", True, 12),
                                                         ("serial", True, 12),
                                                         ("auto", False, 13)])
def test_a_command_line_member_that_joins_at_a_refill_reads_its_own_pass_of_in_memory_arrays(
    monkeypatch, programs, shape_given, width, xla_compiles):
  # the command line's in-memory source: fresh numpy ArrayLoaders for every trial, their pass k
  # in the order default_rng((seed, k)) draws; trial 2 joins at the cohort's second pass, at its
  # own pass 0 while trial 0 reads its pass 1. The command line gives the input shape; without
  # it a trial reads a first batch (a pass) to infer it, and a member does so as it would alone.
  # A width of its own: the vmapped step compiles in this test.
  monkeypatch.setenv(PROGRAMS_ENV, programs)
  source = array_source("digits", {"train_images": _X[:384], "train_labels": _Y[:384],
                                   "val_images": _X[384:576], "val_labels": _Y[384:576]},
                        CLASSES, eval_batch_size=96)
  configured = configurator(loaders=lambda number: source.loaders(64, 0)[:2],
                            epochs=lambda number: 1 if number == 1 else 3,
                            narrow=MLP(num_classes=CLASSES, hidden=(width,), dropout=0.1))

  def configure(trial):
    cfg = configured(trial)
    return cfg.replace(input_shape=source.input_shape) if shape_given else cfg

  check_the_refilled_member(configure, programs, xla_compiles)


def test_a_trial_of_another_structure_cutting_a_cohorts_forming_short_changes_no_value():
  # trial 1 is wider: the first cohort forms with trial 0 alone, trials 2-4 join it at refills,
  # trials 1 and 5 train in a cohort of their own
  params = [{"learning_rate": lr, "width": w}
            for lr, w in ((0.05, 16), (0.1, 24), (0.1, 16), (0.2, 16), (0.3, 16), (0.2, 24))]
  solo, cohort = solo_and_cohort(configurator(width=True, epochs=lambda number: 2), params,
                                 cohort_size=4)
  assert states(solo) == states(cohort) == {"COMPLETE": 6}
  assert_solo_values(solo, cohort)


def test_a_loader_read_once_per_shared_pass_records_the_member_that_reads_its_order(
    monkeypatch, caplog):
  # a collate function of the user's: the loader is iterated as it is, once per shared pass
  monkeypatch.setattr(engine_cohort, "_SHARED_WARNED", set())
  shared = train_loader(collate_fn=lambda rows: default_collate(rows)), val_loader()
  configure = configurator(loaders=lambda number: shared,
                           epochs=lambda number: 1 if number == 1 else 2)
  with caplog.at_level(logging.WARNING, logger="orchard_jax.engine.cohort_run"):
    _, cohort = solo_and_cohort(configure, RATES, cohort_size=2)
  assert states(cohort) == {"COMPLETE": 4}
  records = {t.number: t.user_attrs.get(SHARED_ORDER) for t in cohort.trials}
  joined = ("joined its cohort at pass {}: its epochs read the cohort's order of its training "
            "loader (DataLoader), not its solo run's")
  # trial 2 takes trial 1's slot at the second pass, trial 3 trial 0's at the third
  assert records == {0: None, 1: None, 2: joined.format(2), 3: joined.format(3)}
  warnings = [r.getMessage() for r in caplog.records if SHARED_ORDER in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith("Trial 2 joined its cohort at pass 2 and "
                                                       "reads the cohort's order")


def test_data_identity_names_the_data_not_the_loader_object():
  same = train_loader(), train_loader(), train_loader(TRAIN[0], TRAIN[1])
  assert len({data_identity(loader) for loader in same}) == 1
  other = train_loader(TRAIN[0].clone()), make_loader(TensorDataset(*TRAIN), batch_size=32,
                                                      shuffle=True)
  assert len({data_identity(loader) for loader in (same[0], *other)}) == 3
  x, y = _X[:64], _Y[:64]
  views = [[(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)] for _ in range(2)]
  assert data_identity(views[0]) == data_identity(views[1])
  assert data_identity(views[0]) != data_identity([(a.copy(), b) for a, b in views[0]])
  # a TensorDataset is its tensors; any other dataset is itself
  plain = DataLoader(TensorDataset(*TRAIN), batch_size=64)
  assert data_identity(plain) == data_identity(DataLoader(TensorDataset(*TRAIN), batch_size=64))
  rows = list(zip(*TRAIN))
  assert data_identity(DataLoader(rows, batch_size=64)) != data_identity(
      DataLoader(list(rows), batch_size=64))
