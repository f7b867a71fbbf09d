"""Where a study lives: storage URLs, opening them, heartbeats, and the study lock.

==================================  ============================================================
``optuna.storage`` / ``--storage``  what it opens
==================================  ============================================================
``sqlite`` (the default)            ``<run folder>/study.db``, or ``<run folder>/study.journal``
                                    when the folder holds one (``run --workers`` writes it)
``memory``                          an in-memory study: nothing is kept
``journal:///abs/path/study.log``   Optuna's journal file (``JournalStorage`` over
                                    ``JournalFileBackend``): several processes of one machine;
                                    no heartbeat
``postgresql://user:pw@host/db``,   a database through Optuna's ``RDBStorage``, with a heartbeat
``mysql+pymysql://...``,            for workers; the driver must be installed (``pip install
``sqlite:///path/study.db``         'orchard_jax[postgres]'`` gives psycopg2)
==================================  ============================================================

A *heartbeat* (:class:`Heartbeat`) makes a database storage record, every
``interval`` seconds, that each running trial is alive. A trial whose worker
stopped beating for ``grace`` seconds is marked FAIL by the next worker that
looks, and Optuna's retry callback enqueues its parameters again (at most
``max_retry`` times); the retry's system attribute ``failed_trial`` names the
original (``retried_trial_number``).

The *study lock* (:func:`study_lock`) is held by a worker while it counts the
stored trials and asks for the next one, so that workers together start
exactly ``n_trials`` trials: a PostgreSQL advisory lock, a MySQL named lock,
or an ``fcntl`` lock on a file next to a SQLite database or journal.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import inspect
import logging
import os
import pathlib
import re
import warnings
import zlib
from typing import Any

import optuna

from orchard_jax.study.checks import RecipeError

logger = logging.getLogger(__name__)

__all__ = ["Heartbeat", "JOURNAL", "StudyLock", "masked", "open_storage", "retried_trial_number",
           "storage_url", "study_lock"]

JOURNAL = "journal:"
DB_FILE, JOURNAL_FILE = "study.db", "study.journal"
CONNECT_TIMEOUT_S = 10
# Retries of a first connection that raced another worker creating Optuna's tables.
_CREATE_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class Heartbeat:
  """Optuna's heartbeat settings for a database storage (seconds; ``max_retry`` None: no limit)."""
  interval: int = 30
  grace: int = 120
  max_retry: int | None = 2

  def __post_init__(self):
    if self.interval < 1 or self.grace < 1:
      raise RecipeError(f"heartbeat interval and grace period must be >= 1 s, got "
                        f"interval={self.interval}, grace={self.grace}")
    if self.grace <= self.interval:
      raise RecipeError(f"the heartbeat grace period must be longer than its interval, got "
                        f"grace={self.grace} <= interval={self.interval}")
    if self.max_retry is not None and self.max_retry < 0:
      raise RecipeError(f"max_retry must be >= 0, got {self.max_retry}")


def masked(url: str | None) -> str:
  """The URL without its password (``memory`` for None)."""
  return "memory" if url is None else re.sub(r"//[^/@]*@", "//***@", url)


def storage_url(storage: str, run_dir: pathlib.Path, *, several: bool = False) -> str | None:
  """The storage URL of ``OptunaConfig.storage`` for a run folder (None: in memory).

  ``'sqlite'`` is the run folder's ``study.db``, or its ``study.journal`` when
  that exists (or, with ``several``, when no ``study.db`` does): a journal is
  safe for several worker processes, SQLite is not.

  Raises:
    RecipeError: ``several`` processes asked for an in-memory study, or for a
      folder whose study is in ``study.db``.
  """
  if storage == "memory":
    if several:
      raise RecipeError("optuna.storage 'memory' cannot be shared by several worker processes; "
                        "use 'sqlite' (a journal file in the run folder) or a database URL")
    return None
  if storage != "sqlite":
    return storage
  db, journal = run_dir / DB_FILE, run_dir / JOURNAL_FILE
  if journal.exists() or (several and not db.exists()):
    return f"{JOURNAL}//{journal.absolute()}"
  if several:
    raise RecipeError(f"{db} holds this study in SQLite, which several worker processes cannot "
                      f"share safely; continue it without --workers, use another output folder, "
                      f"or set optuna.storage to a database URL")
  return f"sqlite:///{db.absolute()}"


def journal_path(url: str) -> pathlib.Path:
  """The file of a ``journal:///abs/path`` (or ``journal:relative/path``) URL."""
  path = url[len(JOURNAL):]
  return pathlib.Path(path[2:] if path.startswith("//") else path)


def _driver_message(e: BaseException) -> str:
  """The database driver's own message (SQLAlchemy wraps it with SQL and a link)."""
  text = str(getattr(e, "orig", None) or e)
  return " ".join(text.split())[:300]


def _stale_callback_keyword() -> str:
  """Optuna >= 4.9 names it ``heartbeat_stale_trial_callback``, before ``failed_trial_callback``."""
  parameters = inspect.signature(optuna.storages.RDBStorage).parameters
  return ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in parameters
          else "failed_trial_callback")


def _retry_callback(max_retry: int | None) -> Any:
  cls = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
         or optuna.storages.RetryFailedTrialCallback)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return cls(max_retry=max_retry)


def retried_trial_number(trial: Any) -> int | None:
  """The trial a heartbeat retry repeats (Optuna's ``failed_trial`` system attribute)."""
  return trial.system_attrs.get("failed_trial")


def with_driver(url: str) -> str:
  """``postgresql://`` names the installed driver: psycopg2, else psycopg 3 (SQLAlchemy's
  default differs between versions: psycopg2 before 2.1, psycopg from 2.1)."""
  if not url.startswith("postgresql://"):
    return url
  for driver in ("psycopg2", "psycopg"):
    if importlib.util.find_spec(driver) is not None:
      return f"postgresql+{driver}://{url[len('postgresql://'):]}"
  raise ImportError("no PostgreSQL driver is installed: pip install 'orchard_jax[postgres]' "
                    "(psycopg2-binary)")


def _rdb(url: str, heartbeat: Heartbeat | None) -> optuna.storages.RDBStorage:
  url = with_driver(url)
  engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
  if url.startswith(("postgresql", "mysql")):
    engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
  kwargs: dict[str, Any] = {}
  if heartbeat is not None:
    kwargs = {"heartbeat_interval": heartbeat.interval, "grace_period": heartbeat.grace,
              _stale_callback_keyword(): _retry_callback(heartbeat.max_retry)}
  import sqlalchemy.exc
  for attempt in range(_CREATE_ATTEMPTS):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
      if attempt == _CREATE_ATTEMPTS - 1:  # another worker was creating the tables: try again
        raise
  raise AssertionError("unreachable")


def open_storage(url: str | None, heartbeat: Heartbeat | None = None,
                 where: str = "optuna.storage") -> Any:
  """Opens the storage of ``url`` (None: in memory, returned as None).

  File storages get their folder created. A database storage gets the
  ``heartbeat`` (journal files have none). Nothing is written to a database
  that cannot be reached or refuses the credentials.

  Raises:
    RecipeError: one line naming ``where``, the URL without its password and
      the driver's reason (a missing driver, an unreachable host, a refused
      password, ...).
  """
  if url is None:
    return None
  try:
    if url.startswith(JOURNAL):
      from optuna.storages.journal import JournalFileBackend
      path = journal_path(url)
      path.parent.mkdir(parents=True, exist_ok=True)
      return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
      pathlib.Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return _rdb(url, heartbeat)
  except Exception as e:  # a driver missing, a host unreachable, a password refused, ...
    raise RecipeError(f"{where}: cannot open {masked(url)}: {type(e).__name__}: "
                      f"{_driver_message(e)}") from None


# ------------------------------------------------------------ study lock --


class StudyLock:
  """A lock over one study, shared by every worker of it, on any machine.

  ``acquire`` blocks; ``release`` is idempotent, so a worker may release it
  early (as soon as its trial exists) and again in a ``finally``.
  """

  held = False

  def acquire(self) -> None:
    self._acquire()
    self.held = True

  def release(self) -> None:
    if self.held:
      self.held = False
      self._release()

  def _acquire(self) -> None:
    pass

  def _release(self) -> None:
    pass


class FileLock(StudyLock):
  """An ``fcntl`` lock on ``path`` (local file systems; NFS locks are unreliable)."""

  def __init__(self, path: pathlib.Path):
    self.path, self._fd = path, None

  def _acquire(self) -> None:
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(self._fd, fcntl.LOCK_EX)

  def _release(self) -> None:
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


class DatabaseLock(StudyLock):
  """A PostgreSQL advisory lock or a MySQL named lock, on a connection of its own.

  The server releases it if the worker dies, with its connection.
  """

  _SQL = {"postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
          "mysql": ("SELECT GET_LOCK(:name, -1)", "SELECT RELEASE_LOCK(:name)")}

  def __init__(self, engine: Any, study_name: str):
    self.engine, self._connection = engine, None
    key = zlib.crc32(f"orchard_jax/{study_name}".encode())
    self._params = {"key": key, "name": f"orchard_jax/{key}"}
    self._lock, self._unlock = self._SQL[engine.dialect.name]

  def _execute(self, sql: str) -> None:
    import sqlalchemy
    if self._connection is None:
      self._connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    self._connection.execute(sqlalchemy.text(sql), self._params)

  def _acquire(self) -> None:
    self._execute(self._lock)

  def _release(self) -> None:
    self._execute(self._unlock)


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
