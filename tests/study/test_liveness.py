"""Liveness locks: a RUNNING trial of a dead process is failed and retried; a live one is not.

Real processes hold the locks, and real signals (SIGKILL) end them.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from orchard_jax.records import RETRY_OF, WORKER_ID
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.liveness import Liveness, RunFolderLock, is_dead, new_worker_id, reap_dead
from orchard_jax.study.tables import trial_error
from orchard_jax.study.budget import budget_used, requeue_unfinished

HOLDER = """
import sys, time
from orchard_jax.study.liveness import Liveness
import pathlib
with Liveness(pathlib.Path(sys.argv[1]), sys.argv[2]):
  print("held", flush=True)
  time.sleep(600)
"""


def hold(folder, worker_id) -> subprocess.Popen:
  """A real process that holds ``worker_id``'s liveness lock until killed."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), worker_id],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def running(study, worker_id, x=0.25):
  study.add_trial(create_trial(state=TrialState.RUNNING, params={"x": x},
                               distributions={"x": FloatDistribution(0, 1)},
                               user_attrs={WORKER_ID: worker_id, "worker": "w"}))


def test_a_killed_process_trial_is_failed_and_retried_once_and_a_live_one_is_left(tmp_path,
                                                                                  caplog):
  folder = tmp_path / "study.db.workers"
  study = optuna.create_study(direction="maximize",
                              storage=f"sqlite:///{tmp_path / 'study.db'}")
  dead_id, live_id = new_worker_id(), new_worker_id()
  dead, live = hold(folder, dead_id), hold(folder, live_id)
  try:
    running(study, dead_id, 0.25)
    running(study, live_id, 0.75)
    assert reap_dead(study, folder) == []  # both alive
    before = budget_used(study.trials)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert is_dead(folder, dead_id) and not is_dead(folder, live_id)
    assert reap_dead(study, folder) == [0]
    assert requeue_unfinished(study) == [0] and requeue_unfinished(study) == []
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[2].system_attrs["fixed_params"] == {"x": 0.25}
    assert trials[2].user_attrs[RETRY_OF] == 0
    assert trial_error(trials[0]) == "lost: its process (w) died"
    assert budget_used(trials) == before  # the retry takes the lost trial's place
    assert "Trial 0 was left RUNNING by w, which is no longer running" in caplog.text
    assert reap_dead(study, folder) == []  # retried once, not again
  finally:
    for proc in (dead, live):
      proc.kill()
      proc.wait()


def test_a_trial_without_a_worker_id_is_left_alone(tmp_path):
  study = optuna.create_study()
  study.add_trial(create_trial(state=TrialState.RUNNING, params={}, distributions={}))
  assert reap_dead(study, tmp_path) == []
  assert study.trials[0].state == TrialState.RUNNING


def test_a_clean_exit_removes_the_lock_and_counts_as_gone(tmp_path):
  worker_id = new_worker_id()
  with Liveness(tmp_path, worker_id) as liveness:
    assert liveness.path.exists() and not is_dead(tmp_path, worker_id)
  assert not liveness.path.exists() and is_dead(tmp_path, worker_id)


def test_another_hosts_process_is_never_declared_dead(tmp_path):
  assert not is_dead(tmp_path, "elsewhere.example:123:abcdef")


def test_a_second_owner_of_a_run_folder_is_refused_naming_the_first(tmp_path):
  code = ("import sys, time, pathlib\nfrom orchard_jax.study.liveness import RunFolderLock\n"
          "with RunFolderLock(pathlib.Path(sys.argv[1])):\n  print('held', flush=True)\n"
          "  time.sleep(600)\n")
  owner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                           text=True)
  try:
    assert owner.stdout.readline().strip() == "held"
    with pytest.raises(RecipeError) as error:
      RunFolderLock(tmp_path)
    message = str(error.value)
    assert f"pid {owner.pid} on" in message and "orchard-jax worker" in message
    assert "\n" not in message
  finally:
    owner.kill()
    owner.wait()
  with RunFolderLock(tmp_path):  # the owner died: the folder is free
    pass
