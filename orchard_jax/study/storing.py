"""Writing to a study's storage patiently, and holding its lock.

A write is retried while the storage is locked or full
(:func:`~orchard_jax.study.storage.is_transient`), for
:data:`STORE_PATIENCE_S` seconds, before the process gives up with the root
cause in one line (:func:`store`). The study lock is taken the same way
(:func:`locked`), and held for one block (:func:`under_lock`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from orchard_jax.errors import StorageFault, root_cause
from orchard_jax.study.locks import StudyLock
from orchard_jax.study.storage import is_transient

logger = logging.getLogger(__name__)

__all__ = ["STORE_PATIENCE_S", "ThreadedLock", "beating", "locked", "store", "under_lock"]

# How long a locked or full storage is retried before the process gives up (its trial is then
# retried by the next run); ORCHARD_JAX_STORE_PATIENCE_S sets it for the command.
STORE_PATIENCE_S = 120.0


def store(action: Callable[[], Any], what: str, patience: float | None = None) -> Any:
  """``action()``, retried while the storage is locked or full, for ``patience`` seconds.

  Raises:
    StorageFault: the storage still failed after ``patience`` seconds; the
      message is one line with the root cause.
  """
  if patience is None:
    patience = float(os.environ.get("ORCHARD_JAX_STORE_PATIENCE_S", STORE_PATIENCE_S))
  deadline, warned = time.monotonic() + patience, False
  while True:
    try:
      return action()
    except Exception as e:  # pylint: disable=broad-except
      if not is_transient(e):
        raise
      if time.monotonic() >= deadline:
        raise StorageFault(f"the study's storage failed while storing {what}: {root_cause(e)} "
                           f"(retried for {patience:.0f} s)") from e
      if not warned:
        logger.warning("The study's storage failed while storing %s: %s; retrying for up to "
                       "%.0f s", what, root_cause(e), patience)
        warned = True
      time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))


def locked(lock: StudyLock, action: Callable[[], Any], what: str) -> Any:
  """``action()`` holding the study ``lock``, returned with the lock still held.

  Taking the lock, ``action`` and the lock's :meth:`~StudyLock.confirm` are
  one attempt, retried as :func:`store` retries a write: an attempt that fails
  lets the lock go (a database lock whose connection broke is gone already)
  and the next takes it afresh. So a restart or failover of a database server
  within the patience is waited out, and what ``action`` decided was decided
  under a lock held throughout.
  """
  def attempt() -> Any:
    lock.acquire()
    try:
      result = action()
      lock.confirm()
    except BaseException:
      lock.release()
      raise
    return result
  return store(attempt, what)


@contextlib.contextmanager
def under_lock(lock: StudyLock, action: Callable[[], Any], what: str) -> Iterator[Any]:
  """The block runs holding ``lock``, taken with :func:`locked` (``action()`` is what the
  block is given); the lock is let go when the block ends, however it ends."""
  result = locked(lock, action, what)
  try:
    yield result
  finally:
    lock.release()


class ThreadedLock(StudyLock):
  """A study lock taken after a lock shared by this process's threads (``optuna.n_jobs``); an
  in-memory study has only the latter."""

  def __init__(self, local: Any, inner: StudyLock):
    self.local, self.inner = local, inner

  def _acquire(self) -> None:
    self.local.acquire()
    try:
      self.inner.acquire()
    except BaseException:  # a database lock that failed is retried by this thread
      self.local.release()
      raise

  def confirm(self) -> None:
    self.inner.confirm()

  def _release(self) -> None:
    self.inner.release()
    self.local.release()


@contextlib.contextmanager
def beating(storage: Any, trial_id: int) -> Iterator[None]:
  """Records Optuna heartbeats of a running trial (database storages with a heartbeat)."""
  interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
  if not interval:
    yield
    return
  stop = threading.Event()

  def beat() -> None:
    while True:
      with contextlib.suppress(Exception):  # one missed beat is within the grace period
        storage.record_heartbeat(trial_id)
      if stop.wait(interval):
        return

  thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
