"""A PostgreSQL server that goes away mid-study and comes back (a restart, a failover): every
process waits it out within the storage patience, and nothing is lost.

The module has its own throwaway server (``postgres_to_restart`` in conftest.py), which the
tests stop with ``pg_ctl stop`` while a trial trains and start again a few seconds later, with
``ORCHARD_JAX_STORE_PATIENCE_S`` well above the outage.
"""

from __future__ import annotations

import re
import threading
import time
import warnings

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from orchard_jax.errors import StorageFault
from orchard_jax.records import RETRY_OF, STORAGE_FAULT
from orchard_jax.study.locks import DatabaseLock
from orchard_jax.study.storage import (Heartbeat, ask_trial, is_transient, open_storage,
                                       root_cause)
from orchard_jax.study.storing import locked

from tests.study.test_faults import check_exact, fault_recipe, finish, load, start, wait_for

PATIENCE_S, DOWN_S = 30, 4
# What the server (or the socket to it) says while it is away: the real cause of the fault.
SERVER_AWAY = re.compile(r"the database system is (shutting down|starting up|in recovery)|"
                         r"Connection refused|server closed the connection unexpectedly|"
                         r"terminating connection due to administrator command")
OPTIMIZE_ONLY = "Heartbeat of storage is supposed to be used with Study.optimize"


def restart_mid_trial(server, proc, seen: list[str], mode: str) -> None:
  """Once ``proc`` trains its first epoch, stops ``server`` (``pg_ctl stop -m mode``) for
  DOWN_S seconds and starts it again."""
  wait_for(proc, " E1/", seen)
  server.stop(mode)
  time.sleep(DOWN_S)
  server.start()


def check_survived(done, trials: list, n_trials: int) -> None:
  """Exit 0, the promise of the fault matrix, every trial the fault stopped retried once, and
  the one line the user sees: the storage's real cause, retried; no error, no traceback."""
  assert done.returncode == 0, done.stderr[-3000:]
  retries = check_exact(trials, n_trials)
  faulted = {t.number for t in trials if t.user_attrs.get(STORAGE_FAULT)}
  assert faulted == {t.user_attrs[RETRY_OF] for t in retries}
  assert not [t for t in trials if t.state == TrialState.RUNNING]
  [line] = [line for line in done.stderr.splitlines() if "retrying for up to" in line]
  assert SERVER_AWAY.search(line) and line.endswith(f"; retrying for up to {PATIENCE_S} s"), line
  for text in ("error:", "Traceback", "InvalidatePoolError", OPTIMIZE_ONLY):
    assert text not in done.stderr, done.stderr[-3000:]


def test_a_worker_waits_out_a_restart_of_the_server(postgres_to_restart, workdir, warm_env,
                                                    command):
  url = postgres_to_restart.create_database()
  output = workdir / "pg_restart_worker"
  path = fault_recipe(workdir, "pg_restart_worker", n_trials=2, epochs=40, storage=url)
  env = {**warm_env, "ORCHARD_JAX_STORE_PATIENCE_S": str(PATIENCE_S)}
  proc, seen = start(command, ["worker", path, "--name", "w"], env, workdir), []
  restart_mid_trial(postgres_to_restart, proc, seen, "fast")
  done = finish(proc, seen)
  trials = load(url, "pg_restart_worker")
  check_survived(done, trials, 2)
  # The trial reports each epoch: the outage stopped it, and its retry completed.
  [faulted] = [t for t in trials if t.user_attrs.get(STORAGE_FAULT)]
  assert faulted.state == TrialState.FAIL and SERVER_AWAY.search(faulted.user_attrs[STORAGE_FAULT])
  assert (output / "trials.csv").is_file() and (output / "best_config.yaml").is_file()


def test_a_launched_worker_waits_out_a_server_that_restarts_while_it_joins(
    postgres_to_restart, workdir, warm_env, command):
  # run --workers opens the study, then starts its workers: a restart in between used to end a
  # worker at its join ("--storage: cannot open ...: the database system is shutting down").
  url = postgres_to_restart.create_database()
  path = fault_recipe(workdir, "pg_restart_join", n_trials=1, epochs=2, storage=url)
  env = {**warm_env, "ORCHARD_JAX_STORE_PATIENCE_S": str(PATIENCE_S)}
  postgres_to_restart.stop("fast")
  try:
    proc, seen = start(command, ["worker", path, "--name", "w", "--launched"], env, workdir), []
    wait_for(proc, "retrying for up to", seen)
  finally:
    postgres_to_restart.start()
  done = finish(proc, seen)
  assert done.returncode == 0, done.stderr[-3000:]
  check_exact(load(url, "pg_restart_join"), 1)
  [line] = [line for line in done.stderr.splitlines() if "retrying for up to" in line]
  assert SERVER_AWAY.search(line) and line.endswith(f"; retrying for up to {PATIENCE_S} s"), line
  for text in ("error:", "Traceback", "InvalidatePoolError"):
    assert text not in done.stderr, done.stderr[-3000:]


def test_a_run_in_cohorts_waits_out_a_crash_of_the_server(postgres_to_restart, workdir,
                                                         warm_env, command):
  url = postgres_to_restart.create_database()
  output = workdir / "pg_restart_cohorts"
  path = fault_recipe(workdir, "pg_restart_cohorts", n_trials=3, epochs=30, storage=url,
                      cohort_size=2)
  env = {**warm_env, "ORCHARD_JAX_STORE_PATIENCE_S": str(PATIENCE_S)}
  proc, seen = start(command, ["run", path], env, workdir), []
  restart_mid_trial(postgres_to_restart, proc, seen, "immediate")
  done = finish(proc, seen)
  trials = load(url, "pg_restart_cohorts")
  check_survived(done, trials, 3)
  assert (output / "trials.csv").is_file() and (output / "best_config.yaml").is_file()


# ---------------------------------------------------------------- the lock --


def test_a_lock_lost_with_its_session_is_known_lost_and_taken_again(postgres_to_restart):
  url = postgres_to_restart.create_database()
  engine = open_storage(url).engine
  lock, other = DatabaseLock(engine, "s"), DatabaseLock(engine, "s")
  lock.acquire()
  lock.confirm()
  with engine.connect() as admin:  # the server ends the lock's session, as a failover does
    pid = lock._execute("SELECT pg_backend_pid()")  # pylint: disable=protected-access
    admin.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
  with pytest.raises(Exception) as raised:
    lock.confirm()
  assert is_transient(raised.value)
  assert SERVER_AWAY.search(root_cause(raised.value)), root_cause(raised.value)
  lock.release()  # the lock went with its session: nothing to say, no error
  other.acquire()  # so another process takes it at once
  other.release()
  lock.acquire()  # and the first takes it again, on a fresh connection
  lock.confirm()
  lock.release()


def test_a_lock_released_by_hand_is_not_confirmed(postgres_to_restart):
  url = postgres_to_restart.create_database()
  engine = open_storage(url).engine
  lock = DatabaseLock(engine, "s")
  lock.acquire()
  lock._execute(lock._unlock)  # pylint: disable=protected-access
  with pytest.raises(StorageFault, match="the study lock was lost"):
    lock.confirm()
  lock.release()


def test_the_study_lock_is_taken_after_the_server_comes_back(postgres_to_restart,
                                                             monkeypatch, caplog):
  url = postgres_to_restart.create_database()
  engine = open_storage(url).engine
  lock = DatabaseLock(engine, "s")
  lock.acquire()
  lock.release()  # its connection is back in the pool, which the stop breaks
  monkeypatch.setenv("ORCHARD_JAX_STORE_PATIENCE_S", str(PATIENCE_S))
  postgres_to_restart.stop("fast")
  restart = threading.Timer(DOWN_S, postgres_to_restart.start)
  restart.start()
  try:
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="orchard_jax.study.storing"):
      assert locked(lock, lambda: "decided", "the study's next trial") == "decided"
    waited = time.monotonic() - started
  finally:
    restart.join()
  lock.confirm()
  lock.release()
  assert DOWN_S - 1 <= waited < PATIENCE_S
  [warning] = [r.getMessage() for r in caplog.records]
  assert SERVER_AWAY.search(warning) and "InvalidatePoolError" not in warning, warning


# ---------------------------------------------------- Optuna's heartbeat warning --


def test_our_own_ask_does_not_warn_that_a_heartbeat_is_for_optimize(tmp_path):
  storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", Heartbeat(1, 3))
  study = optuna.create_study(storage=storage, study_name="s")
  filters = list(warnings.filters)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ask_trial(study)
    study.ask()  # Optuna's own still warns: the filter is narrow, and ours only
  assert [str(w.message) for w in caught] == [OPTIMIZE_ONLY + "."]
  assert warnings.filters == filters


def test_run_with_workers_waits_out_a_restart_of_the_server(postgres_to_restart, workdir,
                                                            warm_env, command):
  url = postgres_to_restart.create_database()
  output = workdir / "pg_restart_workers"
  path = fault_recipe(workdir, "pg_restart_workers", n_trials=3, epochs=40, storage=url)
  env = {**warm_env, "ORCHARD_JAX_STORE_PATIENCE_S": str(PATIENCE_S)}
  proc, seen = start(command, ["run", path, "--workers", "2"], env, workdir), []
  restart_mid_trial(postgres_to_restart, proc, seen, "fast")
  done = finish(proc, seen)
  assert done.returncode == 0, done.stderr[-3000:]
  trials = load(url, "pg_restart_workers")
  retries = check_exact(trials, 3)
  faulted = {t.number for t in trials if t.user_attrs.get(STORAGE_FAULT)}
  assert faulted == {t.user_attrs[RETRY_OF] for t in retries}
  waited = [line for line in done.stderr.splitlines() if "retrying for up to" in line]
  assert waited and all(SERVER_AWAY.search(line) for line in waited), waited  # one a process
  for text in ("error:", "Traceback", "InvalidatePoolError", OPTIMIZE_ONLY):
    assert text not in done.stderr, done.stderr[-3000:]
  assert (output / "trials.csv").is_file() and (output / "best_config.yaml").is_file()
  password = url.split("@")[0].rsplit(":", 1)[1]
  assert password not in done.stderr + done.stdout  # the launcher names the URL masked
