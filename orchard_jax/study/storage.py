"""Where a study lives: storage URLs, opening them, heartbeats, and the study lock.

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

SQLite waits up to :data:`SQLITE_BUSY_TIMEOUT_S` for a lock another
process holds (Optuna's default, sqlite3's 5 s, failed trials whose worker
met a longer write of another one).

A journal file whose last line is torn (a full disk or a killed process in
the middle of an append) is repaired when it is opened and before each
append: the torn bytes are moved to ``<journal>.torn-<UTC time>`` and the file
is cut back to its last complete line, under the lock Optuna's
``JournalFileBackend`` takes for its appends (:func:`repair_journal`). An
append of this module's backend that fails (``ENOSPC``) cuts its own partial
line off at once. A bad line *followed by others* is a real corruption: it is
left alone and named in a :class:`RecipeError`.

:func:`root_cause` and :func:`is_transient` read a storage exception's chain
(Optuna's ``StorageInternalError``, SQLAlchemy's wrappers, the driver's
error): its deepest cause in one line, and whether it is a fault of the
storage (a lock, a full disk, a lost connection) rather than of the trial.

The *study lock* (:func:`study_lock`) is held by a worker while it counts the
stored trials and asks for the next one, so that workers together start
exactly ``n_trials`` trials: a PostgreSQL advisory lock, a MySQL named lock,
or an ``fcntl`` lock on a file next to a SQLite database or journal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import importlib.util
import inspect
import json
import logging
import os
import pathlib
import re
import sqlite3
import warnings
import zlib
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend

from orchard_jax.errors import DRIVER_MODULES as _DRIVER_MODULES
from orchard_jax.errors import cause_chain as _chain
from orchard_jax.errors import os_error_code as _os_error_code
from orchard_jax.errors import StorageFault, root_cause
from orchard_jax.study.checks import RecipeError

logger = logging.getLogger(__name__)

__all__ = ["DatabaseLock", "Heartbeat", "JOURNAL", "SQLITE_BUSY_TIMEOUT_S", "StudyLock",
           "ask_trial", "disk_fault", "is_disk_fault", "is_transient", "masked", "open_storage",
           "repair_journal", "retried_trial_number", "root_cause", "storage_url", "study_lock"]

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
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
      if attempt == _CREATE_ATTEMPTS - 1:  # another worker was creating the tables: try again
        raise
  raise AssertionError("unreachable")


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
      return _open_journal(journal_path(url), where)
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


# --------------------------------------------------------- journal files --


def _journal_lock(path: pathlib.Path) -> Any:
  """The lock of Optuna's ``JournalFileBackend`` appends to ``path`` (its default
  ``lock_obj``: a symlink ``<path>.lock``, taken around each append)."""
  from optuna.storages.journal import JournalFileSymlinkLock
  return JournalFileSymlinkLock(str(path))


@contextlib.contextmanager
def _held(lock: Any) -> Any:
  from optuna.storages.journal._file import get_lock_file
  with get_lock_file(lock):
    yield


def _torn_tail(f: Any, size: int) -> int | None:
  """The offset where the torn last line of the open journal ``f`` starts (None: not torn).

  Torn: the file does not end with a newline, or its last line is not a JSON
  object (what Optuna's appends write).
  """
  if size == 0:
    return None
  f.seek(size - 1)
  ends_with_newline = f.read(1) == b"\n"
  end = size - 1 if ends_with_newline else size  # the last line, without its newline
  start, chunk = end, 1 << 16
  while start > 0:  # back to the newline before the last line
    lo = max(0, start - chunk)
    f.seek(lo)
    block = f.read(start - lo)
    i = block.rfind(b"\n")
    if i >= 0:
      start = lo + i + 1
      break
    start = lo
  if not ends_with_newline:
    return start
  f.seek(start)
  return None if _is_record(f.read(end - start)) else start


def _is_record(line: bytes) -> bool:
  try:
    record = json.loads(line)
  except ValueError:  # JSONDecodeError, UnicodeDecodeError
    return False
  return isinstance(record, dict) and "op_code" in record


def _torn_name(path: pathlib.Path) -> pathlib.Path:
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  candidate, n = path.with_name(f"{path.name}.torn-{stamp}"), 1
  while candidate.exists():
    n += 1
    candidate = path.with_name(f"{path.name}.torn-{stamp}-{n}")
  return candidate


def _cut_torn_tail(path: pathlib.Path) -> pathlib.Path | None:
  """:func:`repair_journal`'s work; the caller holds the journal's append lock."""
  try:
    f = open(path, "r+b")  # pylint: disable=consider-using-with
  except FileNotFoundError:
    return None
  with f:
    size = os.fstat(f.fileno()).st_size
    start = _torn_tail(f, size)
    if start is None:
      return None
    f.seek(start)
    torn = f.read(size - start)
    aside = _torn_name(path)
    try:
      with open(aside, "xb") as out:
        out.write(torn)
        out.flush()
        os.fsync(out.fileno())
    except BaseException:
      with contextlib.suppress(OSError):
        aside.unlink()
      raise
    f.truncate(start)
    f.flush()
    os.fsync(f.fileno())
  logger.warning("The journal %s ended with a torn line (%d bytes, an interrupted append); "
                 "moved it to %s and cut the journal back to its last complete line",
                 path, len(torn), aside)
  return aside


def repair_journal(path: str | os.PathLike, lock: Any = None) -> pathlib.Path | None:
  """Moves a torn last line of the journal ``path`` aside; returns where (None: not torn).

  Appends are sequential, so only the last line can be torn: a full disk or a
  killed process left it without its newline, or (rarely) not a JSON record.
  Its bytes go to ``<path>.torn-<UTC time>`` and ``path`` is cut back to its
  last complete line, with a warning naming both files and the byte count.
  The check and the cut hold ``lock`` (default: Optuna's ``JournalFileBackend``
  lock of ``path``, the one its appends take), so the line of an append in
  progress in another process is never taken for a torn one.

  Raises:
    OSError: the torn bytes could not be written aside (a disk still full);
      the journal is then left as it was.
  """
  path = pathlib.Path(path)
  try:
    if path.stat().st_size == 0:
      return None
    with open(path, "rb") as f:  # unlocked first look: most journals are whole
      if _torn_tail(f, os.fstat(f.fileno()).st_size) is None:
        return None
  except FileNotFoundError:
    return None
  with _held(_journal_lock(path) if lock is None else lock):
    return _cut_torn_tail(path)


class RepairingJournalFileBackend(JournalFileBackend):
  """Optuna's ``JournalFileBackend`` whose appends never leave or extend a torn line.

  Each append, under the backend's lock, first moves a torn last line aside
  (another process's interrupted append: appending to it would glue the new
  record to it and corrupt the journal for good), then writes the records as
  Optuna does, and if that fails (a full disk) cuts its own partial line off
  before the error propagates.
  """

  def append_logs(self, logs: list[dict[str, Any]]) -> None:
    path = pathlib.Path(self._file_path)
    data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs)
            + "\n").encode("utf-8")
    with _held(self._lock):
      _cut_torn_tail(path)
      fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:
        size, written = os.fstat(fd).st_size, 0
        try:
          while written < len(data):
            written += os.write(fd, data[written:])
        except BaseException:
          with contextlib.suppress(OSError):  # freeing blocks needs no space
            os.ftruncate(fd, size)
          raise
        os.fsync(fd)
      finally:
        os.close(fd)


def _bad_journal_line(path: pathlib.Path) -> tuple[int, str] | None:
  """The first line (1-based) of ``path`` that is not a journal record, and why."""
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      if not line.endswith(b"\n"):
        return number, "it has no newline"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        return number, f"not JSON: {e.msg} at character {e.pos + 1}"
      except ValueError as e:  # UnicodeDecodeError
        return number, f"not JSON: {e}"
      if not isinstance(record, dict) or "op_code" not in record:
        return number, "it is JSON but not an Optuna journal record"
  return None


def _open_journal(path: pathlib.Path, where: str) -> Any:
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    repair_journal(path)
  except OSError as e:  # no room for the torn bytes: Optuna's reads skip a torn last line
    logger.warning("The journal %s ends with a torn line that could not be moved aside (%s); "
                   "it is left in place and moved before the next append", path, root_cause(e))
  backend = RepairingJournalFileBackend(str(path))
  try:
    return optuna.storages.JournalStorage(backend)
  except Exception as e:
    bad = _bad_journal_line(path)
    if bad is None:
      raise
    number, why = bad
    raise RecipeError(f"{where}: the journal {path} is corrupt at line {number} ({why}) and "
                      f"lines follow it, so it is no torn last append: restore the file from a "
                      f"copy, or cut it off before that line to keep the trials above it") from e


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


# ------------------------------------------------------------ study lock --


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

  The lock belongs to the server's session: the server releases it when the
  worker dies, and when the connection breaks (a restart, a failover). So the
  connection is the engine pool's, checked out only while the lock is held
  (the pool's pre-ping replaces one that a restart broke, before the lock is
  asked for); an ``acquire`` that fails drops its connection, and the
  caller's retry (:func:`orchard_jax.study.workers.store`) takes the lock
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
