"""A study's SQLite file in write-ahead-log mode: cheaper commits, and none lost to a killed process."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import optuna
import pytest

from orchard_jax.study.storage import open_storage

CHILD = textwrap.dedent("""
    import sys, time
    import optuna
    from orchard_jax.study.storage import open_storage
    storage = open_storage(f"sqlite:///{sys.argv[1]}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask()
    for epoch in range(3):
      trial.report(0.5 + epoch / 10, epoch)
    trial.set_user_attr("epochs", 3)
    print("reported", flush=True)
    time.sleep(600)
""")


def test_a_sqlite_study_commits_to_a_write_ahead_log_without_waiting_for_the_disk(tmp_path):
  storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
  with storage.engine.connect() as connection:
    assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
  optuna.create_study(study_name="s", storage=storage).ask().report(1.0, 0)
  assert (tmp_path / "study.db-wal").exists()
  with sqlite3.connect(tmp_path / "study.db") as other:  # the mode is the file's, for any reader
    assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_what_a_killed_process_committed_is_in_the_study(tmp_path):
  # SIGKILL after the commits, before the process could close or checkpoint anything: the
  # write-ahead log is replayed when the file is next opened.
  db = tmp_path / "study.db"
  child = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE,
                           text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert child.stdout.readline().strip() == "reported"
    assert (tmp_path / "study.db-wal").stat().st_size > 0
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
  (trial,) = optuna.load_study(study_name="s", storage=open_storage(f"sqlite:///{db}")).trials
  assert trial.intermediate_values == pytest.approx({0: 0.5, 1: 0.6, 2: 0.7})
  assert trial.user_attrs == {"epochs": 3}


def test_a_study_file_opened_read_only_is_read_as_it_is(tmp_path):
  db = tmp_path / "study.db"
  with sqlite3.connect(db) as made:
    made.execute("PRAGMA journal_mode=DELETE")
  optuna.create_study(study_name="s", storage=f"sqlite:///{db}").ask().report(1.0, 0)
  storage = open_storage(f"sqlite:///file:{db}?mode=ro&uri=true")  # its mode cannot change
  (trial,) = optuna.load_study(study_name="s", storage=storage).trials
  assert trial.intermediate_values == {0: 1.0}
  with sqlite3.connect(db) as other:
    assert other.execute("PRAGMA journal_mode").fetchone() == ("delete",)
