"""Atomic writes: a file or a folder appears whole under its name, or not at all.

Each writer puts its bytes under a temporary sibling name (same folder, so
the same file system) and renames it into place. A crash, a signal or a full
disk in the middle leaves the old content (or nothing) under the real name.
A write that fails removes its own temporary; one that cannot (the process
was killed) leaves a hidden ``.<name>.tmp-<pid>-<random>`` sibling, which a
later write of that name removes (:func:`remove_stale_temporaries`), as does
:func:`sweep_temporaries` over a whole folder.

A temporary is *stale* -- left by a writer that is gone -- when no process
holds its lock (each writer holds an ``flock`` on its temporary file or
folder until the rename; the kernel releases it when the writer dies) and it
is at least :data:`STALE_AFTER_S` old (a writer creates its temporary a
moment before it locks it). Another process's write in flight is never
removed; where the file system has no ``flock``, nothing is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import stat
import time
import uuid
from collections.abc import Iterator

__all__ = ["STALE_AFTER_S", "atomic_directory", "atomic_write_bytes", "atomic_write_text",
           "remove_stale_temporaries", "sweep_temporaries"]

STALE_AFTER_S = 60.0


def _temporary(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _lock(fd: int) -> None:
  """Marks a temporary as in use for as long as ``fd`` is open (best effort: no ``flock``, no
  mark, and then :func:`_stale` keeps the temporary)."""
  with contextlib.suppress(OSError):
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _stale(path: pathlib.Path, now: float) -> bool:
  """Whether ``path``, a temporary, was left by a writer that is gone."""
  try:
    info = os.lstat(path)
  except OSError:
    return False
  if now - info.st_mtime < STALE_AFTER_S:
    return False
  if stat.S_ISLNK(info.st_mode):
    return True  # no writer of this module leaves a link
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:  # EWOULDBLOCK: a live writer holds it; anything else: cannot tell
    return False
  finally:
    os.close(fd)  # releases the probe's own lock
  return True


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      path.unlink()


def remove_stale_temporaries(path: pathlib.Path) -> None:
  """Removes what interrupted writes of ``path`` left: its stale ``.<name>.tmp-*`` siblings."""
  now = time.time()
  for candidate in path.parent.glob(f".{path.name}.tmp-*"):
    if _stale(candidate, now):
      _remove(candidate)


def sweep_temporaries(folder: str | os.PathLike, legacy_prefix: str | None = None) -> int:
  """Removes the stale temporaries of every name in ``folder`` (and stale entries whose name
  starts with ``legacy_prefix``, an older writer's temporaries); returns how many."""
  folder, now, removed = pathlib.Path(folder), time.time(), 0
  try:
    names = [n for n in os.listdir(folder) if n.startswith(".")]
  except OSError:
    return 0
  for name in names:
    ours = ".tmp-" in name[1:]
    if (ours or (legacy_prefix and name.startswith(legacy_prefix))) and _stale(folder / name, now):
      _remove(folder / name)
      removed += 1
  return removed


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o666) -> pathlib.Path:
  """Writes ``text`` to ``path`` through a temporary sibling and a rename (fsynced)."""
  return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o666) -> pathlib.Path:
  """Writes ``data`` to ``path`` through a temporary sibling and a rename (fsynced).

  ``mode`` is the new file's permissions (less the umask). On any error the
  temporary is removed and the error raised; ``path`` keeps what it held.
  """
  path = pathlib.Path(path)
  remove_stale_temporaries(path)
  temporary = _temporary(path)
  try:
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
      _lock(f.fileno())  # held until the file is closed, after the rename
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
      os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      temporary.unlink()
    raise
  return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields an empty temporary folder that replaces ``path`` when the block succeeds.

  On an exception the temporary folder is removed and ``path`` is left as it
  was. The old ``path`` (if any) is moved aside before the new one is renamed
  in, then deleted, so a reader never sees a half-written folder under
  ``path``.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_temporaries(path)
  temporary = _temporary(path)
  temporary.mkdir()
  old = None
  try:
    fd = os.open(temporary, os.O_RDONLY | os.O_DIRECTORY)
  except BaseException:
    temporary.rmdir()
    raise
  try:
    _lock(fd)
    yield temporary
    if path.exists():
      old = _temporary(path)
      os.replace(path, old)
    os.replace(temporary, path)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  finally:
    os.close(fd)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
