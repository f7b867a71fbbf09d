"""``orchard-jax worker`` processes sharing one study in a real PostgreSQL server.

The server is the session's throwaway one (``postgres`` in conftest.py);
every test gets a fresh database. Workers beat every second and count as
lost after three.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import socket
import subprocess

import optuna
import pytest
from optuna.trial import TrialState

from orchard_jax.cli import main
from orchard_jax.records import INTERRUPTED, RETRY_OF
from orchard_jax.study.budget import finished_count
from orchard_jax.study.storage import retried_trial_number, with_driver
from orchard_jax.records import WORKER

HEARTBEAT = ["--heartbeat", "1", "--grace", "3"]
TIMEOUT = 180


@pytest.fixture(scope="module")
def worker(command, warm_env, workdir):
  def start(url: str, recipe, name: str, **popen) -> subprocess.Popen:
    args = ["worker", str(recipe), "--storage", url, "--name", name, "--no-outputs", *HEARTBEAT]
    return subprocess.Popen([*command, *args], env=warm_env, cwd=workdir, text=True, **popen)
  return start


def trials_of(url: str, name: str) -> list:
  study = optuna.load_study(study_name=name, storage=with_driver(url))
  return sorted(study.trials, key=lambda t: t.number)


def read_until(proc: subprocess.Popen, pattern: str) -> list[str]:
  """The worker's stderr lines up to the first that matches ``pattern``."""
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if re.search(pattern, line):
      break
  return lines


def signal_mid_trial(proc: subprocess.Popen, signum: int) -> list[str]:
  """Sends ``signum`` once the worker logs the first epoch of a trial; returns its lines."""
  lines = read_until(proc, r"\] T\d+ E1/")
  proc.send_signal(signum)
  return lines + proc.communicate(timeout=TIMEOUT)[1].splitlines(keepends=True)


def test_three_workers_complete_exactly_n_trials(postgres, workdir, worker, make_recipe):
  url = postgres.create_database()
  recipe = make_recipe(workdir, "three", n_trials=6, save_plots=False)
  procs = [worker(url, recipe, f"w{i}", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(3)]
  outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0, 0], outputs
  trials = trials_of(url, "three")
  assert [t.number for t in trials] == list(range(6))
  assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
  assert {t.user_attrs[WORKER] for t in trials} <= {"w0", "w1", "w2"}


@pytest.fixture(scope="module")
def lost_workers(postgres, workdir, worker, make_recipe):
  """Three workers on 4 trials of 30 epochs: one SIGKILLed and one SIGTERMed in their first
  trial; the third, started once they have joined, finishes the study."""
  url = postgres.create_database()
  recipe = make_recipe(workdir, "lost", n_trials=4, epochs=30, enable_pruning=False,
                      pruner_type="none", save_plots=False)
  pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
  killed = worker(url, recipe, "killed", **pipes)
  termed = worker(url, recipe, "termed", **pipes)
  read_until(killed, "joined")  # both are about to take a trial
  termed_log = "".join(read_until(termed, "joined"))
  survivor = worker(url, recipe, "survivor", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  # Each worker is signalled as soon as its own first epoch shows: waiting for one before
  # reading the other would let the other's short trial run to its end meanwhile.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    killing = pool.submit(signal_mid_trial, killed, signal.SIGKILL)
    terming = pool.submit(signal_mid_trial, termed, signal.SIGTERM)
    killing.result()
    termed_log += "".join(terming.result())
  survivor_log = survivor.communicate(timeout=TIMEOUT)[0]
  assert survivor.returncode == 0, survivor_log
  return {"trials": trials_of(url, "lost"), "killed": killed.returncode,
          "termed": termed.returncode, "termed_log": termed_log, "survivor_log": survivor_log}


def by_worker(trials, name: str):
  return [t for t in trials if t.user_attrs.get(WORKER) == name]


def test_killed_worker_trial_is_failed_after_grace_and_retried_by_a_live_worker(lost_workers):
  assert lost_workers["killed"] == -signal.SIGKILL
  trials = lost_workers["trials"]
  lost = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED)]
  assert len(lost) == 1
  retries = [t for t in trials if retried_trial_number(t) == lost[0].number]
  assert len(retries) == 1
  assert retries[0].state == TrialState.COMPLETE and retries[0].params == lost[0].params
  assert retries[0].user_attrs[WORKER] == "survivor"


def test_sigterm_stops_a_worker_at_once_and_its_trial_is_retried(lost_workers):
  assert lost_workers["termed"] == 143
  assert "Traceback" not in lost_workers["termed_log"]
  assert "E30/30" not in lost_workers["termed_log"]
  trials = lost_workers["trials"]
  (stopped,) = [t for t in trials if t.user_attrs.get(INTERRUPTED)]
  assert stopped.state == TrialState.FAIL
  (retry,) = [t for t in trials if t.user_attrs.get(RETRY_OF) == stopped.number]
  assert retry.state == TrialState.COMPLETE and retry.params == stopped.params
  assert retry.user_attrs[WORKER] == "survivor"


def test_lost_and_stopped_trials_do_not_use_the_budget(lost_workers):
  trials = lost_workers["trials"]
  assert finished_count(trials) == 4 and len(trials) == 6
  assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
  assert len(by_worker(trials, "survivor")) == 4


# --------------------------------------------------------------- bad input --


def run_worker_in_process(recipe, url: str, output, capsys) -> tuple[int, str]:
  code = main(["worker", str(recipe), "--storage", url, "--output", str(output),
               "--set", "telemetry.compilation_cache=null"])
  return code, capsys.readouterr().err


def tables(postgres, url: str) -> list[str]:
  import psycopg2
  database = url.rsplit("/", 1)[1]
  with psycopg2.connect(host="127.0.0.1", port=postgres.port, user="orchard",
                        password="orchard-test-pw", dbname=database) as connection:
    with connection.cursor() as cursor:
      cursor.execute("SELECT table_name FROM information_schema.tables "
                     "WHERE table_schema = 'public'")
      return [row[0] for row in cursor.fetchall()]


def test_unreachable_database_is_a_one_line_error_and_nothing_is_written(postgres, workdir,
                                                                          make_recipe, capsys):
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"postgresql://orchard:secret@127.0.0.1:{port}/study"
  output = workdir / "unreachable"
  code, err = run_worker_in_process(make_recipe(workdir, "unreachable"), url, output, capsys)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert err.startswith(f"orchard-jax: error: --storage: cannot open "
                        f"postgresql://***@127.0.0.1:{port}/study: OperationalError:")
  assert "Connection refused" in err and "secret" not in err
  assert not output.exists()


def test_wrong_credentials_are_a_one_line_error_and_nothing_is_written(postgres, workdir,
                                                                        make_recipe, capsys):
  url = postgres.create_database()
  wrong = url.replace(":orchard-test-pw@", ":wrong@")
  output = workdir / "wrong"
  code, err = run_worker_in_process(make_recipe(workdir, "wrong"), wrong, output, capsys)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert 'password authentication failed for user "orchard"' in err
  assert tables(postgres, url) == [] and not output.exists()


def test_study_of_the_other_direction_is_refused_and_nothing_is_written(postgres, workdir,
                                                                        make_recipe, capsys):
  url = postgres.create_database()
  optuna.create_study(study_name="other_way", storage=with_driver(url), direction="minimize")
  output = workdir / "other_way"
  code, err = run_worker_in_process(make_recipe(workdir, "other_way"), url, output, capsys)
  assert code == 2 and len(err.splitlines()) == 1, err
  assert ("the stored study 'other_way' was created to minimize, but "
          "training.monitor_direction is 'maximize'") in err
  assert optuna.get_all_study_names(with_driver(url)) == ["other_way"]
  assert trials_of(url, "other_way") == [] and not output.exists()
