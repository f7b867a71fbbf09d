"""Workers sharing a study: the budget, the study lock, per-device launching, signals.

The end-to-end test runs ``orchard-jax run --workers all`` on 4 forced host
devices: four single-device worker processes on one journal file.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from orchard_jax.cli import main
from orchard_jax.records import INTERRUPTED, RETRY_OF, WORKER
from orchard_jax.study.budget import Budget, budget_used
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.launch import _Forward, _worker_count, device_env, parse_workers
from orchard_jax.study.locks import FileLock
from orchard_jax.study.recipe import parse_recipe
from orchard_jax.study.storage import Heartbeat, storage_url, with_driver
from orchard_jax.study.signals import GracefulInterrupt

TIMEOUT = 180


def add(study, state, number_attrs=None, **user_attrs):
  study.add_trial(create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                               params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                               user_attrs=user_attrs, system_attrs=number_attrs or {}))


# ------------------------------------------------------------------ budget --


def test_budget_counts_running_and_waiting_but_not_retried_failures():
  study = optuna.create_study()
  add(study, TrialState.COMPLETE)
  add(study, TrialState.FAIL, error="ValueError: x")               # a failure: uses the budget
  add(study, TrialState.FAIL)                                      # lost, retried by heartbeat
  add(study, TrialState.FAIL, **{INTERRUPTED: True})               # interrupted
  add(study, TrialState.WAITING, {"failed_trial": 2, "retry_history": [2]})
  add(study, TrialState.RUNNING, **{RETRY_OF: 3})
  add(study, TrialState.RUNNING)
  assert budget_used(study.trials) == 5


def recipe_with(n_trials: int):
  return parse_recipe({"optuna": {"n_trials": n_trials, "sampler_type": "random",
                                  "enable_early_stopping": False}})


@pytest.mark.parametrize("heartbeat, expected", [(True, "wait"), (False, "done")])
def test_spent_budget_waits_for_running_trials_only_when_they_beat(heartbeat, expected):
  study = optuna.create_study(direction="maximize")
  add(study, TrialState.COMPLETE)
  add(study, TrialState.RUNNING, **{WORKER: "elsewhere"})
  assert Budget(recipe_with(2), study, None, heartbeat).next_step() == expected


def test_worker_runs_a_waiting_retry_even_when_the_budget_is_spent():
  study = optuna.create_study(direction="maximize")
  add(study, TrialState.COMPLETE)
  add(study, TrialState.FAIL, **{INTERRUPTED: True})
  assert Budget(recipe_with(1), study, None, False).next_step() == "run"
  assert [t.state for t in study.trials][-1] == TrialState.WAITING  # requeued under the lock


def test_worker_starts_trials_until_the_budget_is_spent():
  study = optuna.create_study(direction="maximize")
  add(study, TrialState.COMPLETE)
  assert Budget(recipe_with(2), study, None, False).next_step() == "run"
  add(study, TrialState.RUNNING, **{WORKER: "w1"})
  assert Budget(recipe_with(2), study, None, False).next_step() == "done"


# -------------------------------------------------------- storage and lock --


def test_several_workers_share_a_journal_and_never_sqlite_or_memory(tmp_path):
  assert storage_url("sqlite", tmp_path, several=True) == (
      f"journal://{(tmp_path / 'study.journal').absolute()}")
  (tmp_path / "study.journal").touch()
  assert storage_url("sqlite", tmp_path).startswith("journal:")  # one worker resumes it
  other = tmp_path / "other"
  other.mkdir()
  (other / "study.db").touch()
  with pytest.raises(RecipeError, match="study.db holds this study in SQLite"):
    storage_url("sqlite", other, several=True)
  with pytest.raises(RecipeError, match="'memory' cannot be shared"):
    storage_url("memory", tmp_path, several=True)


def test_file_lock_excludes_a_second_holder_until_released(tmp_path):
  first, second = FileLock(tmp_path / "lock"), FileLock(tmp_path / "lock")
  first.acquire()
  thread = threading.Thread(target=second.acquire)
  thread.start()
  thread.join(0.3)
  assert thread.is_alive()
  first.release()
  thread.join(5)
  assert not thread.is_alive() and second.held
  second.release()
  second.release()  # idempotent


def test_heartbeat_grace_must_exceed_the_interval():
  with pytest.raises(RecipeError, match="grace period must be longer than its interval"):
    Heartbeat(interval=5, grace=5)


# ------------------------------------------------------- per-device launch --


def test_each_worker_sees_only_its_device():
  gpu = device_env({"CUDA_VISIBLE_DEVICES": "2,5,7"}, 1, "gpu")
  assert gpu["CUDA_VISIBLE_DEVICES"] == gpu["HIP_VISIBLE_DEVICES"] == "5"
  assert device_env({}, 3, "gpu")["CUDA_VISIBLE_DEVICES"] == "3"
  tpu = device_env({}, 2, "tpu")
  assert tpu["TPU_VISIBLE_CHIPS"] == "2" and tpu["TPU_PROCESS_BOUNDS"] == "1,1,1"
  assert tpu["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1" and tpu["TPU_PROCESS_PORT"] == "8478"
  flags = "--xla_force_host_platform_device_count=4 --xla_cpu_enable_fast_math=false"
  assert device_env({"XLA_FLAGS": flags}, 0, "cpu")["XLA_FLAGS"] == (
      "--xla_cpu_enable_fast_math=false")
  assert "XLA_FLAGS" not in device_env(
      {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, 0, "cpu")


def test_worker_count_is_checked_against_the_devices():
  assert parse_workers("all") is None and parse_workers("3") == 3
  with pytest.raises(RecipeError, match="--workers must be a number .* got '0'"):
    parse_workers("0")
  with pytest.raises(RecipeError, match="--workers 9: this machine has 8 gpu devices"):
    _worker_count(9, "gpu", 8)
  assert _worker_count(None, "tpu", 4) == 4 and _worker_count(6, "cpu", 1) == 6


def test_launcher_forwards_sigterm_to_every_worker():
  procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True) for _ in range(2)]
  with _Forward(procs) as forward:
    os.kill(os.getpid(), signal.SIGTERM)
  assert [p.wait(10) for p in procs] == [-signal.SIGTERM] * 2
  assert forward.signum == signal.SIGTERM


def test_sigterm_stops_at_once_inside_a_trial_and_before_the_next_otherwise():
  study = optuna.create_study()

  def objective(trial):
    interrupt.in_trial = True
    try:
      os.kill(os.getpid(), signal.SIGTERM)
      return 1.0
    finally:
      interrupt.in_trial = False

  with pytest.raises(KeyboardInterrupt), GracefulInterrupt(study) as interrupt:
    study.optimize(objective, n_trials=3)
  assert [t.state for t in study.trials] == [TrialState.FAIL]
  assert interrupt.exit_status == 143
  between = optuna.create_study()
  with GracefulInterrupt(between) as interrupt:
    between.optimize(lambda trial: 1.0, n_trials=3,
                     callbacks=[lambda study, trial: os.kill(os.getpid(), signal.SIGTERM)])
  assert [t.state for t in between.trials] == [TrialState.COMPLETE] and interrupt.requested


def test_worker_command_has_help(capsys):
  with pytest.raises(SystemExit) as info:
    main(["worker", "--help"])
  out = capsys.readouterr().out
  assert info.value.code == 0 and "usage: orchard-jax worker" in out and "--heartbeat" in out


def test_plain_postgresql_urls_name_the_installed_driver():
  pytest.importorskip("psycopg2")
  assert with_driver("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
  assert with_driver("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
  assert with_driver("mysql+pymysql://u@h/db") == "mysql+pymysql://u@h/db"


@pytest.mark.parametrize("argv, message", [
    (["run", "--workers", "two"], "--workers must be a number of worker processes"),
    (["worker", "--set", "optuna.storage=memory"], "worker needs a storage shared with"),
])
def test_bad_worker_options_are_one_line_errors(argv, message, capsys):
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and message in err


def test_four_per_device_workers_complete_the_study(workdir, warm_env, command, make_recipe):
  recipe = make_recipe(workdir, "per_device", n_trials=6, save_plots=False)
  env = {**warm_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([*command, "run", str(recipe), "--workers", "all"], env=env,
                        cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Starting 4 worker(s), one per cpu device" in proc.stderr
  # Names are unique per launch: cpu<i>.<launch token>, one token for the four.
  joined = re.findall(r"\[(cpu\d)\.(\w{6})\] Worker \1\.\2 joined study 'per_device' "
                      r"\(1 cpu device\)", proc.stderr)
  assert sorted(name for name, _ in joined) == ["cpu0", "cpu1", "cpu2", "cpu3"]
  (launch,) = {token for _, token in joined}
  run_dir = workdir / "per_device"
  url = f"journal://{run_dir / 'study.journal'}"
  from orchard_jax.study.storage import open_storage
  trials = optuna.load_study(study_name="per_device", storage=open_storage(url)).trials
  assert sorted(t.number for t in trials) == list(range(6))
  assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
  assert {t.user_attrs[WORKER] for t in trials} <= {f"cpu{i}.{launch}" for i in range(4)}
  assert len(list(csv.DictReader(open(run_dir / "trials.csv")))) == 6
  assert not (run_dir / "study.db").exists() and "Best validation accuracy" in proc.stdout


def test_stop_signals_are_restored_on_exit_and_left_alone_off_the_main_thread():
  from orchard_jax.study.signals import StopSignals  # pylint: disable=import-outside-toplevel

  class Seen(StopSignals):
    def _handle(self, signum, frame):
      pass

  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with Seen() as seen:
    assert all(signal.getsignal(s) == seen._handle for s in before)
  assert {s: signal.getsignal(s) for s in before} == before
  entered = []
  thread = threading.Thread(target=lambda: entered.append(Seen().__enter__()._previous))
  thread.start()
  thread.join()
  assert entered == [{}]
  assert {s: signal.getsignal(s) for s in before} == before
