"""Storage faults, made for real: torn journals, a full disk (a filled tmpfs), SQLite locks
held by another process, a PostgreSQL connection terminated by the server."""

from __future__ import annotations

import logging
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import optuna
import pytest
import sqlalchemy
from optuna.storages.journal import JournalFileBackend

from orchard_jax.study.checks import RecipeError
from orchard_jax.study.storage import (SQLITE_BUSY_TIMEOUT_S, is_transient, open_storage,
                                       root_cause, storage_url)

NO_SPACE = "[Errno 28] No space left on device"
STORAGE_LOGGER = "orchard_jax.study.journal"  # the logger of journal repair


def journal_url(folder: pathlib.Path) -> str:
  return storage_url("sqlite", folder, several=True)  # journal:///<folder>/study.journal


def plain(path: pathlib.Path) -> optuna.storages.JournalStorage:
  """Optuna's own journal storage, as any other process (the optuna CLI, a script) opens it."""
  return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def make_study(storage, n_trials: int = 3) -> list[float]:
  study = optuna.create_study(storage=storage, study_name="s")
  study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=n_trials)
  return [t.value for t in study.trials]


def load(storage) -> optuna.Study:
  return optuna.load_study(storage=storage, study_name="s")


def torn_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(folder.glob("study.journal.torn-*"))


def warnings_of(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.name == STORAGE_LOGGER and r.levelno == logging.WARNING]


def start(script: str, *args: str) -> subprocess.Popen:
  """A real second process running ``script``; returns once it printed its first line."""
  proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  if not line:
    proc.wait(30)
    pytest.fail(f"the helper process died: {proc.stderr.read()[-2000:]}")
  return proc


# ------------------------------------------------------------ torn journals --


def test_a_torn_last_line_is_moved_aside_and_the_journal_keeps_working(tmp_path, caplog):
  url = journal_url(tmp_path)
  path = tmp_path / "study.journal"
  values = make_study(open_storage(url))
  whole = path.read_bytes()
  last_line = whole[:-1].rsplit(b"\n", 1)[-1]
  torn = last_line[:len(last_line) // 2]  # an append cut in the middle
  path.write_bytes(whole + torn)

  with caplog.at_level(logging.WARNING, logger=STORAGE_LOGGER):
    study = load(open_storage(url))

  assert [t.value for t in study.trials] == values
  assert path.read_bytes() == whole
  [aside] = torn_files(tmp_path)
  assert aside.read_bytes() == torn
  [warning] = warnings_of(caplog)
  assert str(path) in warning and str(aside) in warning and f"({len(torn)} bytes" in warning

  study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=2)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=STORAGE_LOGGER):
    assert len(load(open_storage(url)).trials) == 5
  assert warnings_of(caplog) == [] and torn_files(tmp_path) == [aside]
  assert len(load(plain(path)).trials) == 5  # whole for Optuna itself too


def test_a_last_line_that_is_not_json_is_moved_aside(tmp_path):
  url, path = journal_url(tmp_path), tmp_path / "study.journal"
  make_study(open_storage(url))
  whole = path.read_bytes()
  path.write_bytes(whole + b'{"op_code":8,"worker_id\n')
  assert len(load(open_storage(url)).trials) == 3
  assert path.read_bytes() == whole
  assert torn_files(tmp_path)[0].read_bytes() == b'{"op_code":8,"worker_id\n'


def test_a_bad_line_before_the_last_is_left_and_named(tmp_path):
  url, path = journal_url(tmp_path), tmp_path / "study.journal"
  make_study(open_storage(url))
  lines = path.read_bytes().split(b"\n")
  lines[2] = lines[2][:15]
  corrupt = b"\n".join(lines)
  path.write_bytes(corrupt)
  with pytest.raises(RecipeError) as raised:
    open_storage(url, where="optuna.storage")
  message = str(raised.value)
  assert message.startswith(f"optuna.storage: the journal {path} is corrupt at line 3 (not JSON: ")
  assert "\n" not in message
  assert path.read_bytes() == corrupt and torn_files(tmp_path) == []


def test_a_live_writers_half_written_line_is_waited_for_not_cut(tmp_path):
  url, path = journal_url(tmp_path), tmp_path / "study.journal"
  make_study(open_storage(url))
  # Another process appends with Optuna's lock and format, pausing in the middle of its line.
  writer = start("""
      import json, sys, time
      import optuna
      from optuna.storages.journal import JournalFileBackend
      from optuna.storages.journal._file import get_lock_file

      class Slow(JournalFileBackend):
        def append_logs(self, logs):
          with get_lock_file(self._lock):
            data = ("\\n".join(json.dumps(l, separators=(",", ":")) for l in logs)
                    + "\\n").encode()
            with open(self._file_path, "ab") as f:
              f.write(data[:len(data) // 2])
              f.flush()
              print("half written", flush=True)
              time.sleep(2.0)
              f.write(data[len(data) // 2:])

      storage = optuna.storages.JournalStorage(Slow(sys.argv[1]))
      optuna.load_study(storage=storage, study_name="s").set_user_attr("writer", "done")
      """, path)
  try:
    started = time.monotonic()
    study = load(open_storage(url))
    waited = time.monotonic() - started
  finally:
    assert writer.wait(60) == 0, writer.stderr.read()
  assert study.user_attrs == {"writer": "done"} and waited > 1.0
  assert torn_files(tmp_path) == [] and len(load(plain(path)).trials) == 3


# ------------------------------------------------------ a full disk, journal --


@pytest.fixture
def journal_on_full_disk(tmpfs, disk_filler):
  """``(folder, fill)``: a 512 KiB tmpfs for a journal; ``fill()`` fills it, returns the filler."""
  folder = tmpfs("512k")
  return folder, lambda: disk_filler(folder, leave=0)


def big_attr(trial) -> None:
  trial.set_user_attr("big", "y" * 20000)  # more than the free room of the journal's last page


def test_a_full_disk_mid_append_of_optuna_is_repaired_once_space_is_freed(journal_on_full_disk,
                                                                         caplog):
  folder, fill = journal_on_full_disk
  path = folder / "study.journal"
  storage = plain(path)  # Optuna's backend, as it wrote the journals of the fault matrix
  make_study(storage)
  trial = load(storage).ask()
  if path.stat().st_size % 4096 == 0:  # no room left in the last page: nothing would be torn
    trial.set_user_attr("pad", 1)
  whole = path.read_bytes()
  filler = fill()
  with pytest.raises(OSError) as raised:
    big_attr(trial)
  assert raised.value.errno == 28
  torn = path.read_bytes()[len(whole):]
  assert torn and not torn.endswith(b"\n")  # Optuna left a torn line on the full disk

  filler.unlink()
  with caplog.at_level(logging.WARNING, logger=STORAGE_LOGGER):
    study = load(open_storage(journal_url(folder)))
  assert path.read_bytes() == whole and torn_files(folder)[0].read_bytes() == torn
  assert len(warnings_of(caplog)) == 1
  study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)
  assert [t.state.name for t in load(plain(path)).trials] == [
      "COMPLETE", "COMPLETE", "COMPLETE", "RUNNING", "COMPLETE"]


def test_a_full_disk_mid_append_of_ours_leaves_no_torn_line(journal_on_full_disk):
  folder, fill = journal_on_full_disk
  path = folder / "study.journal"
  storage = open_storage(journal_url(folder))
  make_study(storage)
  trial = load(storage).ask()
  whole = path.read_bytes()
  filler = fill()
  with pytest.raises(OSError) as raised:
    big_attr(trial)
  assert root_cause(raised.value) == NO_SPACE and is_transient(raised.value)
  assert path.read_bytes() == whole  # its own partial line is cut off at once

  filler.unlink()
  trial.set_user_attr("after", 1)  # the same storage goes on once there is room
  trials = load(plain(path)).trials
  assert trials[3].user_attrs == {"after": 1} and torn_files(folder) == []


def test_our_append_moves_another_writers_torn_line_aside_first(journal_on_full_disk):
  folder, fill = journal_on_full_disk
  path = folder / "study.journal"
  ours = open_storage(journal_url(folder))
  make_study(ours)
  other = plain(path)
  other_trial = load(other).ask()
  if path.stat().st_size % 4096 == 0:
    other_trial.set_user_attr("pad", 1)
  filler = fill()
  with pytest.raises(OSError):
    big_attr(other_trial)  # the other process tears the last line
  filler.unlink()

  load(ours).set_user_attr("ours", "after the tear")  # appended by our open storage
  assert load(plain(path)).user_attrs == {"ours": "after the tear"}  # not glued to the tear
  assert len(torn_files(folder)) == 1


# ------------------------------------------------------------- SQLite locks --

HOLD_LOCK = """
    import sqlite3, sys, time
    connection = sqlite3.connect(sys.argv[1], isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    connection.execute("COMMIT")
    """


@pytest.fixture
def sqlite_study(tmp_path):
  """``(db path, url, trial_id)``: a SQLite study with one running trial."""
  db = tmp_path / "study.db"
  url = storage_url("sqlite", tmp_path)
  study = optuna.create_study(storage=open_storage(url), study_name="s")
  return db, url, study.ask()._trial_id


def test_sqlite_gets_the_busy_timeout(sqlite_study):
  _, url, _ = sqlite_study
  for storage, ms in ((open_storage(url), SQLITE_BUSY_TIMEOUT_S * 1000),
                      (open_storage(url, sqlite_timeout=0.25), 250)):
    with storage.engine.connect() as connection:  # what sqlite3 itself was told
      assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == ms


def test_a_write_waits_for_a_lock_another_process_holds(sqlite_study):
  db, url, trial_id = sqlite_study
  storage = open_storage(url)
  hold = 8.0  # longer than sqlite3's (and Optuna's) default 5 s
  holder = start(HOLD_LOCK, db, hold)
  started = time.monotonic()
  storage.set_trial_user_attr(trial_id, "k", "v")
  elapsed = time.monotonic() - started
  assert holder.wait(30) == 0
  assert elapsed >= hold - 1.0
  assert storage.get_trial(trial_id).user_attrs == {"k": "v"}


# ------------------------------------------------- causes of real exceptions --


def test_database_is_locked_is_transient(sqlite_study):
  db, url, trial_id = sqlite_study
  storage = open_storage(url, sqlite_timeout=0.2)
  holder = start(HOLD_LOCK, db, 3.0)
  try:
    with pytest.raises(optuna.exceptions.StorageInternalError) as raised:
      storage.set_trial_user_attr(trial_id, "k", "v")
  finally:
    holder.wait(30)
  assert root_cause(raised.value) == "database is locked" and is_transient(raised.value)


def test_database_or_disk_is_full_is_transient(tmpfs, disk_filler):
  folder = tmpfs("512k")
  storage = open_storage(storage_url("sqlite", folder))
  trial_id = optuna.create_study(storage=storage, study_name="s").ask()._trial_id
  disk_filler(folder, leave=0)
  with pytest.raises(optuna.exceptions.StorageInternalError) as raised:
    for i in range(20):
      storage.set_trial_user_attr(trial_id, f"k{i}", "x" * 20000)
  assert "exceeding max length" in str(raised.value)  # Optuna's wrapper, blaming the data
  assert root_cause(raised.value) == "database or disk is full" and is_transient(raised.value)


def test_a_sql_error_of_sqlite_is_not_transient(sqlite_study):
  _, url, trial_id = sqlite_study
  storage = open_storage(url)
  with storage.engine.begin() as connection:
    connection.execute(sqlalchemy.text("DROP TABLE trial_user_attributes"))
  with pytest.raises(optuna.exceptions.StorageInternalError) as raised:
    storage.set_trial_user_attr(trial_id, "k", "v")
  assert root_cause(raised.value) == "no such table: trial_user_attributes"
  assert not is_transient(raised.value)


def test_a_model_error_is_not_transient():
  try:
    try:
      raise KeyError("lr")
    except KeyError as e:
      raise ValueError("learning rate missing") from e
  except ValueError as e:
    error = e
  assert not is_transient(error) and root_cause(error) == "KeyError: 'lr'"
  assert root_cause(ValueError("x" * 500)) == "ValueError: " + "x" * 285 + "..."


def test_a_lost_postgresql_connection_is_transient(postgres):
  import psycopg2
  url = postgres.create_database()
  storage = open_storage(url)
  trial_id = optuna.create_study(storage=storage, study_name="s").ask()._trial_id
  admin = psycopg2.connect(url)
  admin.autocommit = True
  blocker = psycopg2.connect(url)
  with blocker.cursor() as cursor:  # our write waits for this lock, on a live connection
    cursor.execute("LOCK TABLE trial_user_attributes IN ACCESS EXCLUSIVE MODE")
  errors: list[BaseException] = []

  def write():
    try:
      storage.set_trial_user_attr(trial_id, "k", "v")
    except BaseException as e:  # noqa: BLE001
      errors.append(e)

  thread = threading.Thread(target=write)
  thread.start()
  with admin.cursor() as cursor:
    for _ in range(200):
      cursor.execute("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                     "AND datname = current_database()")
      waiting = [row[0] for row in cursor.fetchall()]
      if waiting:
        break
      time.sleep(0.05)
    assert waiting, "the write never waited for the lock"
    cursor.execute("SELECT pg_terminate_backend(%s)", (waiting[0],))  # the server drops it
  thread.join(30)
  blocker.close()
  admin.close()
  [error] = errors
  assert isinstance(error, optuna.exceptions.StorageInternalError)  # "... exceeding max length"
  assert is_transient(error)
  assert root_cause(error).startswith("server closed the connection unexpectedly")
