"""An exclusive ``flock`` on a file: the one lock of every file a study's processes lock.

The kernel drops the lock the moment its holder dies, however it dies, so a
lock that can be taken tells a process that is gone. The study lock next to
a file storage (:class:`~orchard_jax.study.locks.FileLock`), a process's
liveness file and a run folder's owner file
(:mod:`~orchard_jax.study.liveness`) are each one of these. ``flock`` locks
of local file systems only (NFS locks are unreliable).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
from typing import Any, Self

__all__ = ["Flock"]


class Flock:
  """An exclusive ``flock`` on ``path``, held from :meth:`acquire` to :meth:`release`.

  Args:
    path: the file locked; created (mode 0644) when missing, unless ``create`` is False.
    create: False: :meth:`acquire` of a missing file raises ``FileNotFoundError``.
  """

  def __init__(self, path: pathlib.Path, *, create: bool = True):
    self.path, self._create = path, create
    self.fd: int | None = None  # the open file while the lock is held

  def acquire(self, blocking: bool = True) -> bool:
    """Opens the file and locks it; True once held.

    Blocks until the lock is free, or, with ``blocking`` False, returns False
    at once (the file closed again) when another process holds it.

    Raises:
      OSError: the file could not be opened or locked (it is closed again).
    """
    flags = os.O_RDWR | (os.O_CREAT if self._create else 0)
    fd = os.open(self.path, flags, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as e:
      os.close(fd)
      if not blocking and isinstance(e, OSError) and e.errno in (errno.EAGAIN, errno.EACCES):
        return False  # held by another process
      raise
    self.fd = fd
    return True

  def release(self) -> None:
    """Unlocks and closes the file; nothing when the lock is not held."""
    fd, self.fd = self.fd, None
    if fd is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_UN)
      finally:
        os.close(fd)

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()
