"""Cohorts in the engine: each member of a vmapped cohort is the trial run_trial trains alone.

Members are compared with the same trials run one by one by ``run_trial``
(same seed, same data order): their per-epoch values (the monitored
validation loss) within 1e-3, their pruning decisions, their records.
"""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from orchard_jax.engine import run_trial
from orchard_jax.engine.driver import optimize
from orchard_jax.errors import ValidationFailedError
from orchard_jax.models import MLP, MiniCNN
from orchard_jax.records import COHORT

from tests.engine.conftest import batches, synthetic  # noqa: E402  (the engine tests' data)


NUM_CLASSES = 3  # the engine tests' synthetic data (conftest.py)
RATES = (0.02, 0.05, 0.1, 0.2)
LOSS = {"monitor_metric": "loss", "monitor_direction": "minimize"}


def configurator(make_cfg, model=None, **training):
  """``configure(trial)``: the trial's learning rate (and MixUp alpha, when searched) on top of
  ``training``, the validation loss monitored."""
  def configure(trial: optuna.Trial):
    values = {"learning_rate": trial.suggest_float("learning_rate", 0.001, 1.0, log=True)}
    if "mixup_alpha" in trial.params or training.get("mixup_alpha"):
      values["mixup_alpha"] = trial.suggest_float("mixup_alpha", 0.0, 0.5)
    extra = {} if model is None else {"model": model}
    return make_cfg(training={**LOSS, **training, **values}, **extra)
  return configure


def studies(params, pruner=None):
  """Two in-memory studies that will ask ``params`` in order."""
  made = []
  for _ in range(2):
    study = optuna.create_study(direction="minimize",
                                pruner=pruner() if pruner else optuna.pruners.NopPruner())
    for p in params:
      study.enqueue_trial(p)
    made.append(study)
  return made


def solo_and_cohort(configure, params, cohort_size, pruner=None):
  solo, cohort = studies(params, pruner)
  solo.optimize(lambda t: run_trial(t, configure(t)), n_trials=len(params))
  optimize(cohort, configure, n_trials=len(params), cohort_size=cohort_size)
  return solo.trials, cohort.trials


def assert_members_match(solo, cohort, atol=1e-3, early_atol=1e-3):
  """Same states and decisions; each reported value within ``early_atol`` and the last one (the
  3rd epoch's) within ``atol``, or 1e-4 of the value itself for a diverging trial's huge ones."""
  assert len(solo) == len(cohort)
  for a, b in zip(solo, cohort):
    assert (b.number, b.state) == (a.number, a.state), (a.params, b.params)
    assert b.params == a.params
    assert sorted(b.intermediate_values) == sorted(a.intermediate_values)
    last = max(a.intermediate_values, default=None)
    for step, value in a.intermediate_values.items():
      tolerance = atol if step == last else early_atol
      assert b.intermediate_values[step] == pytest.approx(value, rel=1e-4, abs=tolerance), (
          b.number, step)
    if a.state == TrialState.COMPLETE:
      assert b.value == pytest.approx(a.value, abs=atol)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_mlp_members_match_their_solo_trials_with_mixup_and_the_plateau_schedule(make_cfg,
                                                                                  optimizer):
  configure = configurator(make_cfg, optimizer_type=optimizer, scheduler_type="plateau",
                           scheduler_patience=1, mixup_alpha=0.2, mixup_epochs=2)
  rates = RATES if optimizer == "sgd" else (0.001, 0.003, 0.01, 0.03)
  params = [{"learning_rate": lr, "mixup_alpha": a} for lr, a in zip(rates, (0.05, 0.1, 0.2, 0.4))]
  solo, cohort = solo_and_cohort(configure, params, cohort_size=4)
  assert_members_match(solo, cohort)
  assert [t.user_attrs[COHORT] for t in cohort] == [{"size": 4, "slot": i} for i in range(4)]
  assert all(t.state == TrialState.COMPLETE for t in cohort)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_minicnn_members_match_their_solo_trials_with_mixup_and_plateau(make_cfg, optimizer):
  model = MiniCNN(num_classes=NUM_CLASSES, dropout=0.0)
  configure = configurator(make_cfg, model=model, optimizer_type=optimizer,
                           scheduler_type="plateau", scheduler_patience=1, mixup_alpha=0.2,
                           mixup_epochs=2)
  rates = (0.02, 0.1) if optimizer == "sgd" else (0.001, 0.01)
  solo, cohort = solo_and_cohort(configure, [{"learning_rate": lr, "mixup_alpha": a}
                                             for lr, a in zip(rates, (0.1, 0.3))], cohort_size=2)
  # AdamW at 0.01 amplifies the batched convolutions' float rounding in the first epoch (up to
  # 4e-3 of the loss), which its later epochs shrink back (1e-5 at the 3rd)
  assert_members_match(solo, cohort, early_atol=1e-3 if optimizer == "sgd" else 1e-2)


class ValuePruner(optuna.pruners.BasePruner):
  """Prunes a trial whose last reported loss is above ``limit``: a decision of its own values."""

  def __init__(self, limit: float):
    self.limit = limit

  def prune(self, study, trial) -> bool:
    return trial.intermediate_values[trial.last_step] > self.limit


def test_pruning_decisions_and_refills_match_solo_and_compile_nothing_more(make_cfg,
                                                                           xla_compiles):
  # 6 trials in a cohort of 2: slow learners are pruned at epoch 2 (warmup) and their slots
  # refilled at the epoch boundary by the next trials, which start at their own epoch 1.
  configure = configurator(make_cfg)
  make = make_cfg

  def configure_pruned(trial):
    cfg = configure(trial)
    return cfg.replace(optuna=cfg.optuna.replace(enable_pruning=True, pruning_warmup_epochs=2,
                                                 pruner_type="median"))

  rates = (0.001, 0.2, 0.002, 0.1, 0.3, 0.003)
  params = [{"learning_rate": lr} for lr in rates]
  solo, cohort_study = studies(params, lambda: ValuePruner(0.9))
  solo.optimize(lambda t: run_trial(t, configure_pruned(t)), n_trials=len(params))
  states = [t.state for t in solo.trials]
  assert TrialState.PRUNED in states and TrialState.COMPLETE in states  # the case is exercised
  with xla_compiles() as seen:
    optimize(cohort_study, configure_pruned, n_trials=len(params), cohort_size=2)
  assert_members_match(solo.trials, cohort_study.trials)
  # the first member of each trial pair trains in slot 0; pruned trials were replaced in place
  slots = [t.user_attrs[COHORT]["slot"] for t in cohort_study.trials]
  assert sorted(set(slots)) == [0, 1]
  assert seen.by_name["jit(_cohort_train_step)"] == 1, seen.by_name
  assert seen.by_name["jit(_cohort_eval_step)"] == 1, seen.by_name
  assert seen.by_name["jit(_replace_rows)"] <= 1, seen.by_name
  del make


def test_a_diverging_member_fails_alone_and_the_others_match_their_solo_runs(make_cfg):
  # Inputs x100 without gradient clipping: SGD at 0.9 with momentum 0.99 diverges, at 0.01 not.
  x, y = synthetic(80, seed=0)
  vx, vy = synthetic(48, seed=1)
  configure = configurator(make_cfg, momentum=0.99, grad_clip=0.0)
  train, val = batches(x * 100, y), batches(vx * 100, vy)  # one data: the trials share a cohort

  def configure_scaled(trial):
    return configure(trial).replace(train_loader=train, val_loader=val)

  params = [{"learning_rate": lr} for lr in (0.01, 0.9, 0.02)]
  solo, cohort = solo_and_cohort(configure_scaled, params, cohort_size=3)
  assert_members_match(solo, cohort)
  diverged = cohort[1]
  assert diverged.state == TrialState.COMPLETE and math.isinf(diverged.value)  # the worst value
  assert diverged.user_attrs["error"] == solo[1].user_attrs["error"]
  assert diverged.user_attrs["error"].startswith("RuntimeError: Training diverged: loss=nan")
  assert all(math.isfinite(t.value) for t in (cohort[0], cohort[2]))


def test_a_trial_of_another_structure_trains_in_a_cohort_of_its_own(make_cfg):
  wide = MLP(num_classes=NUM_CLASSES, hidden=(32,))

  def configure(trial):
    lr = trial.suggest_float("learning_rate", 0.001, 1.0, log=True)
    width = trial.suggest_categorical("width", [16, 32])
    extra = {"model": wide} if width == 32 else {}
    return make_cfg(training={**LOSS, "learning_rate": lr}, **extra)

  params = [{"learning_rate": 0.05, "width": 16}, {"learning_rate": 0.05, "width": 32},
            {"learning_rate": 0.1, "width": 16}, {"learning_rate": 0.1, "width": 32}]
  solo, cohort = solo_and_cohort(configure, params, cohort_size=2)
  assert_members_match(solo, cohort)
  by_width = {}
  for t in cohort:
    by_width.setdefault(t.params["width"], set()).add(t.user_attrs[COHORT]["slot"])
  assert by_width == {16: {0, 1}, 32: {0, 1}}


def test_cohort_size_one_is_run_trial_bit_for_bit(make_cfg):
  configure = configurator(make_cfg, scheduler_type="plateau", scheduler_patience=1)
  solo, cohort = solo_and_cohort(configure, [{"learning_rate": lr} for lr in RATES[:2]],
                                 cohort_size=1)
  for a, b in zip(solo, cohort):
    assert b.intermediate_values == a.intermediate_values and b.value == a.value
    assert COHORT not in b.user_attrs


def test_bad_shared_data_fails_every_member_with_the_datas_message(make_cfg, train_data):
  images, labels = train_data
  images = images.copy()
  images[3, 0, 0, 0] = np.nan
  configure = configurator(make_cfg)

  def configure_bad(trial):
    return configure(trial).replace(train_loader=batches(images, labels))

  study = optuna.create_study(direction="minimize")
  optimize(study, configure_bad, n_trials=2, cohort_size=2)
  assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
  assert all(t.user_attrs["error"].startswith("NonFiniteInputError: training inputs: 1 row")
             for t in study.trials)


def test_members_whose_every_validation_failed_are_fail_as_their_solo_trials(make_cfg):
  vx, vy = synthetic(48, seed=1)
  nan_loader = batches(np.full_like(vx, np.nan), vy)
  configure = configurator(make_cfg)

  def configure_nan(trial):  # 2 epochs of all-NaN validation images: only fallback values
    cfg = configure(trial)
    return cfg.replace(val_loader=nan_loader, optuna=cfg.optuna.replace(epochs=2))

  solo, cohort = studies([{"learning_rate": lr} for lr in RATES[:2]])
  with pytest.raises(ValidationFailedError):
    solo.optimize(lambda t: run_trial(t, configure_nan(t)), n_trials=1)
  optimize(cohort, configure_nan, n_trials=2, cohort_size=2)
  assert [(t.state, t.value) for t in cohort.trials] == [(TrialState.FAIL, None)] * 2
  assert all(COHORT in t.user_attrs for t in cohort.trials)  # members, not solo trials
  reason = ("ValidationFailedError: every validation failed (2 of 2 epochs): ValueError: 48 of "
            "48 validation rows have non-finite logits")
  assert solo.trials[0].state == TrialState.FAIL
  assert [t.user_attrs["error"][:len(reason)] for t in (solo.trials[0], *cohort.trials)] == (
      [reason] * 3)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_optimize_refuses_a_bad_cohort_size(make_cfg, bad):
  study = optuna.create_study()
  with pytest.raises(ValueError, match=f"cohort_size must be an int >= 1, got cohort_size={bad}"):
    optimize(study, configurator(make_cfg), n_trials=1, cohort_size=bad)
  assert not study.trials


TWO_DEVICES = r"""
import collections, json, sys
import jax, optuna
from tests.engine.conftest import batches, synthetic
from orchard_jax.config import OptunaConfig, TrainingConfig, TrialConfig
from orchard_jax.engine import run_trial
from orchard_jax.engine import cohort_run as engine_cohort
from orchard_jax.engine.driver import optimize
from orchard_jax.models import MiniCNN
optuna.logging.set_verbosity(optuna.logging.WARNING)
compiles, specs = collections.Counter(), []
def listener(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    compiles[kwargs.get("fun_name")] += 1
jax.monitoring.register_event_duration_secs_listener(listener)
train_pass = engine_cohort._train_pass
def spied(cohort, *args):
  specs.append([str(leaf.sharding.spec) for leaf in jax.tree.leaves(cohort)])
  return train_pass(cohort, *args)
engine_cohort._train_pass = spied
tr, va = synthetic(80, 0), synthetic(48, 1)
def configure(trial, devices=None):
  lr = trial.suggest_float("lr", 0.01, 0.3, log=True)
  return TrialConfig(model=MiniCNN(num_classes=3, dropout=0.0), train_loader=batches(*tr),
      val_loader=batches(*va), num_classes=3, log_interval=1, devices=devices,
      training=TrainingConfig(batch_size=16, use_amp=False, use_tqdm=False, learning_rate=lr,
                              mixup_alpha=0.0, scheduler_type="none", epochs=2,
                              monitor_metric="loss", monitor_direction="minimize"),
      optuna=OptunaConfig(epochs=2, enable_pruning=False, pruner_type="none", storage="memory"))
rates = [0.02, 0.05, 0.1, 0.2]
solo, cohort = (optuna.create_study(direction="minimize") for _ in range(2))
for study in (solo, cohort):
  for lr in rates:
    study.enqueue_trial({"lr": lr})
solo.optimize(lambda t: run_trial(t, configure(t, devices=1)), n_trials=len(rates))
compiles.clear()
optimize(cohort, configure, n_trials=len(rates), cohort_size=2)
print(json.dumps({"devices": jax.device_count(), "specs": specs, "compiles": compiles,
                  "solo": [t.value for t in solo.trials],
                  "cohort": [t.value for t in cohort.trials]}))
"""


def test_on_two_devices_members_are_split_over_them_and_match_single_device_runs():
  import json, os, pathlib, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  root = pathlib.Path(__file__).resolve().parents[2]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
  proc = subprocess.run([sys.executable, "-c", TWO_DEVICES], env=env, cwd=root, text=True,
                        capture_output=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 2
  # every leaf of the cohort, every epoch, split over the devices along the member axis
  assert out["specs"] and all(spec == "P('data',)" for epoch in out["specs"] for spec in epoch)
  assert out["cohort"] == pytest.approx(out["solo"], abs=1e-3)
  # two cohorts of 2 in turn (refilled after the first two finish): one program each
  assert out["compiles"]["jit(_cohort_train_step)"] == 1, out["compiles"]
  assert out["compiles"]["jit(_cohort_eval_step)"] == 1, out["compiles"]


class ConvNet(__import__("flax").linen.Module):
  """A user's Linen CNN with flax's own (XLA) convolution."""

  @__import__("flax").linen.compact
  def __call__(self, x, train: bool = False):
    nn = __import__("flax").linen
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(NUM_CLASSES)(x.reshape((x.shape[0], -1)))


def test_the_program_rule_steps_xla_convolutions_member_by_member_on_cpu(make_cfg, monkeypatch):
  from orchard_jax.engine.programs import PROGRAMS_ENV, programs  # pylint: disable=import-outside-toplevel
  from orchard_jax.engine.trial import initial_state  # pylint: disable=import-outside-toplevel
  from orchard_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from orchard_jax.models import as_model  # pylint: disable=import-outside-toplevel
  state = lambda model: initial_state(make_cfg(model=model, input_shape=(8, 8, 1)))
  assert programs(state(MLP(num_classes=NUM_CLASSES, hidden=(16,)))) == (False, False)
  # MiniCNN trains with im2col on XLA:CPU (vmapped); its evaluation's first convolution is XLA's
  assert programs(state(MiniCNN(num_classes=NUM_CLASSES))) == (False, True)
  conv = state(as_model(ConvNet()))
  assert programs(conv) == (True, True)
  assert programs(conv, several_devices=True) == (False, False)
  monkeypatch.setenv(PROGRAMS_ENV, "vmap")
  assert programs(conv) == (False, False)
  monkeypatch.setenv(PROGRAMS_ENV, "grouped")
  with pytest.raises(ConfigError, match="^ORCHARD_JAX_COHORT_PROGRAMS must be 'auto', 'vmap' or "
                                        "'serial', got 'grouped'$"):
    programs(conv)


@pytest.mark.parametrize("kind", ["serial", "auto"])
def test_members_stepped_in_turn_are_their_solo_trials_bit_for_bit(make_cfg, monkeypatch, kind,
                                                                   xla_compiles):
  # serial forced on an MLP; auto on a user's CNN with XLA convolutions (the rule's choice)
  from orchard_jax.engine.programs import PROGRAMS_ENV  # pylint: disable=import-outside-toplevel
  from orchard_jax.models import as_model  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(PROGRAMS_ENV, kind)
  model = MLP(num_classes=NUM_CLASSES, hidden=(16,)) if kind == "serial" else as_model(ConvNet())
  configure = configurator(make_cfg, model=model, scheduler_type="plateau", scheduler_patience=1,
                           mixup_alpha=0.2, mixup_epochs=2)
  params = [{"learning_rate": lr, "mixup_alpha": 0.1} for lr in (0.02, 0.05, 0.1)]
  solo, cohort_study = studies(params)
  solo.optimize(lambda t: run_trial(t, configure(t)), n_trials=len(params))
  with xla_compiles() as seen:
    optimize(cohort_study, configure, n_trials=len(params), cohort_size=2)
  for a, b in zip(solo.trials, cohort_study.trials):
    assert b.intermediate_values == a.intermediate_values and b.value == a.value
  assert not [name for name in seen.by_name if "cohort" in name], seen.by_name


def test_an_interrupt_while_a_cohort_forms_tells_every_asked_trial(make_cfg):
  configure = configurator(make_cfg)

  def interrupted(trial):
    if trial.number == 1:
      raise KeyboardInterrupt
    return configure(trial)

  study = optuna.create_study(direction="minimize")
  with pytest.raises(KeyboardInterrupt):
    optimize(study, interrupted, n_trials=4, cohort_size=2)
  # trial 0 was started and waiting for its cohort; trial 1 was being configured
  assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_a_trial_with_its_own_epoch_functions_trains_alone_through_run_trial(make_cfg):
  from orchard_jax.engine import train_epoch  # pylint: disable=import-outside-toplevel
  configure = configurator(make_cfg)
  calls = []

  def own_train(state, loader, *, epoch, layout):
    calls.append(epoch)
    return train_epoch(state, loader, epoch=epoch, layout=layout)

  def configure_own(trial):
    cfg = configure(trial)
    return cfg.replace(train_epoch_fn=own_train) if trial.number == 1 else cfg

  params = [{"learning_rate": lr} for lr in (0.05, 0.1, 0.2)]
  solo, cohort = solo_and_cohort(configure_own, params, cohort_size=2)
  assert_members_match(solo, cohort)
  assert calls == [1, 2, 3] * 2  # its solo run, then its run beside the cohort: its own epochs
  assert COHORT not in cohort[1].user_attrs
  assert cohort[0].user_attrs[COHORT] == {"size": 2, "slot": 0}
