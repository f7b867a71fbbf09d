"""Atomic writes: a file or a folder appears whole under its name, or not at all.

Each writer puts its bytes under a temporary sibling name (same folder, so
the same file system) and renames it into place. A crash, a signal or a full
disk in the middle leaves the old content (or nothing) under the real name,
and only a hidden ``.<name>.tmp-*`` sibling, which the next write of that
name removes.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_text",
           "remove_stale_temporaries"]


def _temporary(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_temporaries(path: pathlib.Path) -> None:
  """Removes what interrupted writes of ``path`` left (``.<name>.tmp-*`` siblings)."""
  for stale in path.parent.glob(f".{path.name}.tmp-*"):
    if stale.is_dir() and not stale.is_symlink():
      shutil.rmtree(stale, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        stale.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes ``text`` to ``path`` through a temporary sibling and a rename (fsynced)."""
  return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes ``data`` to ``path`` through a temporary sibling and a rename (fsynced)."""
  path = pathlib.Path(path)
  remove_stale_temporaries(path)
  temporary = _temporary(path)
  try:
    with open(temporary, "wb") as f:
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
  try:
    yield temporary
    old = None
    if path.exists():
      old = _temporary(path)
      os.replace(path, old)
    os.replace(temporary, path)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
