"""A study's journal file: a torn last line repaired, appends that never leave one.

A journal file whose last line is torn (a full disk or a killed process in
the middle of an append) is repaired when it is opened and before each
append: the torn bytes are moved to ``<journal>.torn-<UTC time>`` and the file
is cut back to its last complete line, under the lock Optuna's
``JournalFileBackend`` takes for its appends (:func:`repair_journal`). An
append of this module's backend that fails (``ENOSPC``) cuts its own partial
line off at once. A bad line *followed by others* is a real corruption: it is
left alone and named in a :class:`~orchard_jax.study.checks.RecipeError`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pathlib
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend

from orchard_jax.errors import root_cause
from orchard_jax.study.checks import RecipeError

logger = logging.getLogger(__name__)

__all__ = ["RepairingJournalFileBackend", "open_journal", "repair_journal"]


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


def open_journal(path: pathlib.Path, where: str) -> Any:
  """Optuna's ``JournalStorage`` of the journal ``path`` (its folder created), on a
  :class:`RepairingJournalFileBackend`, its torn last line moved aside first.

  Raises:
    RecipeError: the journal is corrupt before its last line (the file, the line and why,
      after ``where``).
  """
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
