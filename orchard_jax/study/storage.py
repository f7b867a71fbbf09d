"""Where a study lives: storage URLs, opening them, heartbeats, and storage faults.

==================================  ============================================================
``optuna.storage`` / ``--storage``  what it opens
==================================  ============================================================
``sqlite`` (the default)            ``<run folder>/study.db``, or ``<run folder>/study.journal``
                                    when the folder holds one (``run --workers`` writes it)
``memory``                          an in-memory study: nothing is kept
``journal:///abs/path/study.log``   Optuna's journal file (``JournalStorage`` over
                                    ``JournalFileBackend``): several processes of one machine;
                                    liveness locks instead of a heartbeat
``postgresql://user:pw@host/db``,   a database through Optuna's ``RDBStorage``, with a heartbeat
``mysql+pymysql://...``             for workers; the driver must be installed (``pip install
                                    -e '.[postgres]'`` in the project folder gives psycopg2)
``sqlite:///path/study.db``         a SQLite file: liveness locks instead of a heartbeat
==================================  ============================================================

On a file storage (SQLite, journal) each process that runs trials holds a
liveness lock (:mod:`orchard_jax.study.liveness`), which tells a dead
process at once. A *heartbeat* (:class:`Heartbeat`) makes a database
server record, every
``interval`` seconds, that each running trial is alive. A trial whose worker
stopped beating for ``grace`` seconds is marked FAIL by the next worker that
looks, and Optuna's retry callback enqueues its parameters again (at most
``max_retry`` times); the retry's system attribute ``failed_trial`` names the
original (``retried_trial_number``).

A SQLite file is kept in write-ahead-log mode with ``synchronous=NORMAL``
(:func:`write_ahead`): a commit appends to ``study.db-wal`` without waiting
for the disk, so an epoch's report or a trial's tell costs a fraction of
what a rollback journal's two flushes cost. A committed write survives the
crash of any process (the log is replayed when the file is next opened); a
power loss or an operating-system crash may lose the last commits before
the log's next checkpoint, never the file's consistency.

SQLite waits up to :data:`SQLITE_BUSY_TIMEOUT_S` for a lock another
process holds (Optuna's default, sqlite3's 5 s, failed trials whose worker
met a longer write of another one).

A journal file's torn last line is repaired when it is opened
(:mod:`orchard_jax.study.journal`).

:func:`root_cause` and :func:`is_transient` read a storage exception's chain
(Optuna's ``StorageInternalError``, SQLAlchemy's wrappers, the driver's
error): its deepest cause in one line, and whether it is a fault of the
storage (a lock, a full disk, a lost connection) rather than of the trial.

The study lock that workers share is :mod:`orchard_jax.study.locks`'s.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import inspect
import logging
import pathlib
import re
import sqlite3
import warnings
from typing import Any

import optuna

from orchard_jax.errors import DRIVER_MODULES as _DRIVER_MODULES
from orchard_jax.errors import cause_chain as _chain
from orchard_jax.errors import os_error_code as _os_error_code
from orchard_jax.errors import StorageFault, root_cause
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.journal import open_journal

logger = logging.getLogger(__name__)

__all__ = ["Heartbeat", "JOURNAL", "SQLITE_BUSY_TIMEOUT_S", "ask_trial", "disk_fault",
           "is_disk_fault", "is_transient", "masked", "open_storage", "retried_trial_number",
           "root_cause", "storage_url"]

JOURNAL = "journal:"
DB_FILE, JOURNAL_FILE = "study.db", "study.journal"
CONNECT_TIMEOUT_S = 10
# How long SQLite waits for a lock another process holds (sqlite3's ``timeout``) before
# "database is locked": longer than any write of a trial (a heartbeat, a commit).
SQLITE_BUSY_TIMEOUT_S = 60.0
# Retries of a first connection that raced another worker creating Optuna's tables.
_CREATE_ATTEMPTS = 3
# Optuna's warning on each ask of a study whose storage has a heartbeat, outside Study.optimize.
_OPTIMIZE_ONLY = "Heartbeat of storage is supposed to be used with Study.optimize"


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


def ask_trial(study: optuna.Study) -> optuna.Trial:
  """``study.ask()`` for a loop of our own (ask and tell, not ``Study.optimize``), without
  Optuna's warning that a storage's heartbeat is meant for ``Study.optimize``: the loop
  records the heartbeat itself. The filter holds for this call only."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=_OPTIMIZE_ONLY, category=UserWarning)
    return study.ask()


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
  raise ImportError("no PostgreSQL driver is installed: pip install psycopg2-binary (or, in "
                    "orchard_jax's project folder, pip install -e '.[postgres]')")


def _rdb(url: str, heartbeat: Heartbeat | None,
         sqlite_timeout: float = SQLITE_BUSY_TIMEOUT_S) -> optuna.storages.RDBStorage:
  url = with_driver(url)
  engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
  if url.startswith(("postgresql", "mysql")):
    engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
  elif url.startswith("sqlite"):  # SQLAlchemy's pysqlite passes it to sqlite3.connect(timeout=)
    engine_kwargs["connect_args"] = {"timeout": sqlite_timeout}
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
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
      if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        write_ahead(storage.engine)
      return storage
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
      if attempt == _CREATE_ATTEMPTS - 1:  # another worker was creating the tables: try again
        raise
  raise AssertionError("unreachable")


def write_ahead(engine: Any) -> None:
  """Puts ``engine``'s SQLite file in write-ahead-log mode (kept in the file) and makes each of
  its connections commit with ``synchronous=NORMAL`` (see the module docstring)."""
  import sqlalchemy
  import sqlalchemy.exc

  def normal(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()

  sqlalchemy.event.listen(engine, "connect", normal)
  engine.dispose()  # the connections Optuna made at its start had no such setting
  try:
    with engine.connect() as connection:  # waits out another process's lock, as writes do
      mode = connection.exec_driver_sql("PRAGMA journal_mode=WAL").scalar()
  except sqlalchemy.exc.OperationalError as e:
    if "readonly" not in str(e).replace(" ", "").lower():
      raise
    mode = "unchanged (read-only)"  # a study that is only read keeps its file as it is
  if str(mode).lower() != "wal":
    logger.debug("SQLite kept journal mode %s for %s", mode, engine.url)


def open_storage(url: str | None, heartbeat: Heartbeat | None = None,
                 where: str = "optuna.storage", *,
                 sqlite_timeout: float = SQLITE_BUSY_TIMEOUT_S) -> Any:
  """Opens the storage of ``url`` (None: in memory, returned as None).

  File storages get their folder created. A database storage gets the
  ``heartbeat`` (journal files have none); SQLite waits ``sqlite_timeout``
  seconds for another process's lock. A journal's torn last line is moved
  aside first (:func:`repair_journal`). Nothing is written to a database
  that cannot be reached or refuses the credentials.

  Raises:
    RecipeError: one line naming ``where``, the URL without its password and
      the driver's reason (a missing driver, an unreachable host, a refused
      password, ...), or the file and line of a journal corrupt before its
      last line.
  """
  if url is None:
    return None
  try:
    if url.startswith(JOURNAL):
      return open_journal(journal_path(url), where)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
      pathlib.Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return _rdb(url, heartbeat, sqlite_timeout)
  except RecipeError:
    raise
  except Exception as e:  # a driver missing, a host unreachable, a password refused, ...
    if is_disk_fault(e):
      raise disk_fault(where, url, e) from e
    raise RecipeError(f"{where}: cannot open {masked(url)}: {type(e).__name__}: "
                      f"{_driver_message(e)}") from None


# -------------------------------------------------- storage fault causes --

_SQLITE_TRANSIENT = ("locked", "busy", "full", "disk i/o error", "unable to open")
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
# tensorstore (orbax's writer) reports an OS error as ValueError("... [os_error_code='28']")


def _is_driver_error(e: BaseException, names: tuple[str, ...]) -> bool:
  return any(cls.__module__.split(".")[0] in _DRIVER_MODULES and cls.__name__ in names
             for cls in type(e).__mro__)


def _transient_one(e: BaseException) -> bool:
  if isinstance(e, StorageFault):
    return True
  if isinstance(e, sqlite3.Error):
    return any(word in str(e).lower() for word in _SQLITE_TRANSIENT)
  if _os_error_code(e) in _TRANSIENT_ERRNOS:
    return True
  if _is_driver_error(e, ("OperationalError", "InterfaceError")):
    return True  # PostgreSQL / MySQL: a lost or refused connection, a lock or statement timeout
  import sqlalchemy.exc
  if isinstance(e, sqlalchemy.exc.DisconnectionError):
    return True
  if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
    return True
  # SQLAlchemy's OperationalError: decided by the driver's error under it where there is one
  # (sqlite3 raises OperationalError for "no such table" too)
  return isinstance(e, sqlalchemy.exc.OperationalError) and not isinstance(e.orig, BaseException)


def is_disk_fault(e: BaseException) -> bool:
  """Whether ``e``'s chain holds a full or failing disk under a file storage: an OS error
  ENOSPC, EDQUOT or EIO, or SQLite's "database or disk is full" / "disk I/O error"."""
  return any(_os_error_code(link) in _TRANSIENT_ERRNOS or (
      isinstance(link, sqlite3.Error) and any(w in str(link).lower() for w in ("full", "disk i/o")))
             for link in _chain(e))


def disk_fault(where: str, url: str, e: BaseException) -> Exception:
  """The :class:`~orchard_jax.errors.StorageFault` of a storage that could not be opened or
  created because its disk is full or failing (:func:`is_disk_fault`): a failure of the storage
  (the command exits 1), not of the recipe that names it."""
  return StorageFault(f"{where}: the study's storage {masked(url)} could not be written: "
                      f"{root_cause(e)}")


def is_transient(e: BaseException) -> bool:
  """Whether ``e`` is a fault of the study's storage rather than of the trial's work.

  True when its chain (``__cause__``, ``__context__``, SQLAlchemy's ``.orig``)
  holds: a ``sqlite3`` error saying locked, busy, full, disk I/O error or
  unable to open; an OS error ENOSPC, EDQUOT or EIO; a psycopg2 / psycopg /
  MySQL driver ``OperationalError`` or ``InterfaceError`` (a lost connection);
  SQLAlchemy's ``DisconnectionError``, an invalidated connection, or an
  ``OperationalError`` with no driver error under it; a
  :class:`~orchard_jax.errors.StorageFault`. Optuna's ``StorageInternalError``
  is transient exactly when its chain holds one of these. Anything else (a
  ``ValueError`` of a model, a bad SQL statement) is not.
  """
  return any(_transient_one(link) for link in _chain(e))
