"""The study lock: one worker at a time counts a study's trials and asks for the next one.

The *study lock* (:func:`study_lock`) is held by a worker while it counts the
stored trials and asks for the next one, so that workers together start
exactly ``n_trials`` trials: a PostgreSQL advisory lock, a MySQL named lock,
or an ``flock`` on a file next to a SQLite database or journal
(:class:`~orchard_jax.study.flock.Flock`).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import zlib
from typing import Any

from orchard_jax.errors import StorageFault
from orchard_jax.study.flock import Flock
from orchard_jax.study.storage import JOURNAL, journal_path

logger = logging.getLogger(__name__)

__all__ = ["DatabaseLock", "FileLock", "StudyLock", "study_lock"]


class StudyLock:
  """A lock over one study, shared by every worker of it, on any machine.

  ``acquire`` blocks; ``release`` is idempotent, so a worker may release it
  early (as soon as its trial exists) and again in a ``finally``. ``confirm``
  raises a :class:`~orchard_jax.errors.StorageFault` when a lock taken is no
  longer held (a database lock dies with its connection).
  """

  held = False

  def acquire(self) -> None:
    self._acquire()
    self.held = True

  def release(self) -> None:
    if self.held:
      self.held = False
      self._release()

  def confirm(self) -> None:
    pass

  def _acquire(self) -> None:
    pass

  def _release(self) -> None:
    pass


class FileLock(StudyLock):
  """A blocking :class:`~orchard_jax.study.flock.Flock` on ``path`` (local file systems; NFS
  locks are unreliable)."""

  def __init__(self, path: pathlib.Path):
    self.path, self._flock = path, Flock(path)

  def _acquire(self) -> None:
    self._flock.acquire()

  def _release(self) -> None:
    self._flock.release()


class DatabaseLock(StudyLock):
  """A PostgreSQL advisory lock or a MySQL named lock, on a connection of its own.

  The lock belongs to the server's session: the server releases it when the
  worker dies, and when the connection breaks (a restart, a failover). So the
  connection is the engine pool's, checked out only while the lock is held
  (the pool's pre-ping replaces one that a restart broke, before the lock is
  asked for); an ``acquire`` that fails drops its connection, and the
  caller's retry (:func:`orchard_jax.study.storing.store`) takes the lock
  afresh on a new one. ``release`` never fails: when the unlock cannot be
  said, the connection is closed, and the lock ends with its session.
  ``confirm`` asks the server whether this session still holds the lock.
  """

  _SQL = {"postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)",
                         "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                         "AND pid = pg_backend_pid() AND classid = 0 AND objid::bigint = :key "
                         "AND objsubid = 1"),
          "mysql": ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)",
                    "SELECT IS_USED_LOCK(:name) = CONNECTION_ID()")}

  def __init__(self, engine: Any, study_name: str):
    self.engine, self._connection = engine, None
    key = zlib.crc32(f"orchard_jax/{study_name}".encode())
    self._params = {"key": key, "name": f"orchard_jax/{key}"}
    self._lock, self._unlock, self._holds = self._SQL[engine.dialect.name]

  def _execute(self, sql: str) -> Any:
    import sqlalchemy
    return self._connection.execute(sqlalchemy.text(sql), self._params).scalar()

  def _drop(self) -> None:
    """Closes the lock's connection for good (never back to the pool): its session ends, and
    with it any lock it held."""
    connection, self._connection = self._connection, None
    if connection is not None:
      with contextlib.suppress(Exception):
        connection.invalidate()
      with contextlib.suppress(Exception):
        connection.close()

  def _acquire(self) -> None:
    self._drop()  # never a second lock on a session that may hold one
    try:
      self._connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
      self._execute(self._lock)
    except BaseException:
      self._drop()
      raise

  def _release(self) -> None:
    try:
      self._execute(self._unlock)
    except Exception:  # pylint: disable=broad-except
      self._drop()  # a broken connection took the lock with it; a live one ends its session
      return
    connection, self._connection = self._connection, None
    connection.close()  # back to the pool, holding nothing

  def confirm(self) -> None:
    held = self.held and self._connection is not None and self._execute(self._holds)
    if not held:
      raise StorageFault("the study lock was lost with its database session")


def _backend(storage: Any) -> Any:
  """The storage under Optuna's cache wrapper (``study._storage`` is a ``_CachedStorage``)."""
  return getattr(storage, "_backend", storage)


def study_lock(storage: Any, url: str, study_name: str) -> StudyLock:
  """The lock workers of ``study_name`` in ``storage`` (opened from ``url``) share.

  Other databases get no lock (with a warning): workers may then start a few
  more than ``n_trials`` trials between them.
  """
  if url.startswith(JOURNAL):
    path = journal_path(url)
    return FileLock(path.with_name(path.name + ".orchard-lock"))
  engine = getattr(_backend(storage), "engine", None)
  dialect = getattr(getattr(engine, "dialect", None), "name", None)
  if dialect == "sqlite":
    return FileLock(pathlib.Path(url[len("sqlite:///"):] + ".orchard-lock"))
  if dialect in DatabaseLock._SQL:
    return DatabaseLock(engine, study_name)
  logger.warning("No study lock for %s databases: workers may start a few trials more than "
                 "optuna.n_trials", dialect)
  return StudyLock()
