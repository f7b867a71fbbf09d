"""Which processes running a study's trials are alive, and who owns a run folder.

Every process that runs trials (``orchard-jax run``, each ``run --workers``
worker, ``orchard-jax worker``) has a unique worker id, ``host:pid:token``,
stored in each trial it starts (user attribute ``worker_id``).

* **On a file storage** (SQLite ``study.db``, Optuna's journal file) the
  process holds an exclusive ``flock`` on ``<storage>.workers/<id>.alive``
  for as long as it lives. The kernel drops that lock the moment the
  process dies, however it dies (SIGKILL included). A RUNNING trial whose
  worker's lock can be taken is therefore a trial of a dead process: the
  next process that looks (under the study lock) marks it FAIL, enqueues its
  parameters again (``retry_of``) and logs that it did. No heartbeat write,
  no grace period.
* **On a database server** (PostgreSQL, MySQL), which workers on several
  machines share, Optuna's heartbeat does the same after its grace period
  (:class:`~orchard_jax.study.storage.Heartbeat`).

A run folder has one owner at a time: ``orchard-jax run`` (and the
``run --workers`` launcher) holds ``<run folder>/.orchard-run.lock``; a second
``run`` on the same folder refuses in one line that names the owner.
Workers of ``orchard-jax worker`` share a study without owning the folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import logging
import os
import pathlib
import re
import signal
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from orchard_jax.records import LOST, WORKER, WORKER_ID
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.flock import Flock

logger = logging.getLogger(__name__)

__all__ = ["LIVENESS_SUFFIX", "Liveness", "RunFolderLock", "die_with_parent", "is_dead",
           "new_worker_id", "reap_dead"]

LIVENESS_SUFFIX = ".workers"
RUN_LOCK = ".orchard-run.lock"


def new_worker_id() -> str:
  """``host:pid:token``, unique per process start (a reused pid gets another token)."""
  return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _host(worker_id: str) -> str:
  return worker_id.rsplit(":", 2)[0]


def _file(folder: pathlib.Path, worker_id: str) -> pathlib.Path:
  return folder / (re.sub(r"[^A-Za-z0-9._-]", "_", worker_id) + ".alive")


class Liveness(Flock):
  """Holds this process's liveness lock in ``folder`` until :meth:`close` (or death), which
  removes its file."""

  def __init__(self, folder: pathlib.Path, worker_id: str):
    folder.mkdir(parents=True, exist_ok=True)
    super().__init__(_file(folder, worker_id))
    self.folder, self.worker_id = folder, worker_id
    self.acquire()

  def release(self) -> None:
    if self.fd is not None:
      with contextlib.suppress(OSError):
        self.path.unlink()
    super().release()

  close = release


def is_dead(folder: pathlib.Path, worker_id: str) -> bool:
  """True when ``worker_id``'s process is known to be gone; False if alive or unknown
  (another host's process, whose lock this machine cannot see)."""
  if _host(worker_id) != socket.gethostname():
    return False
  path = _file(folder, worker_id)
  probe = Flock(path, create=False)
  try:
    if not probe.acquire(blocking=False):
      return False  # held: alive
  except FileNotFoundError:
    return True  # removed on a clean exit (or never written): the process is not running
  probe.release()
  with contextlib.suppress(OSError):
    path.unlink()
  return True


def reap_dead(study: optuna.Study, folder: pathlib.Path | None,
              trials: Sequence[Any] | None = None) -> list[int]:
  """Fails the RUNNING trials of dead processes, with the user attribute ``lost``.

  Call it under the study lock, then
  :func:`~orchard_jax.study.budget.requeue_unfinished`, which enqueues their
  parameters again (so a storage that fails between the two loses no
  retry). A RUNNING trial without a ``worker_id`` (one
  started by a user's own objective) is left alone: nothing tells whether
  its process lives. Returns the numbers of the trials failed.
  """
  if folder is None:
    return []
  trials = study.get_trials(deepcopy=False) if trials is None else trials
  reaped = []
  for t in trials:
    worker_id = t.user_attrs.get(WORKER_ID)
    if t.state != TrialState.RUNNING or worker_id is None or not is_dead(folder, worker_id):
      continue
    who = t.user_attrs.get(WORKER, worker_id)
    # pylint: disable=protected-access
    study._storage.set_trial_user_attr(t._trial_id, LOST, f"its process ({who}) died")
    study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    reaped.append(t.number)
    logger.warning("Trial %d was left RUNNING by %s, which is no longer running: marked FAIL; "
                   "its parameters are retried", t.number, who)
  return reaped


# --------------------------------------------------------- run folder lock --


class RunFolderLock(Flock):
  """Exclusive ownership of a run folder by one ``orchard-jax run`` (non-blocking); its file
  names the owner while held.

  Raises:
    RecipeError: another live process owns the folder; the message names it.
  """

  def __init__(self, run_dir: pathlib.Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    super().__init__(run_dir / RUN_LOCK)
    if not self.acquire(blocking=False):
      with open(self.path, "rb") as f:
        owner = f.read(512).decode(errors="replace").strip() or "another process"
      raise RecipeError(f"{run_dir} is in use by another orchard-jax run ({owner}); wait for it "
                        f"to finish, or join its study with 'orchard-jax worker' (see "
                        f"docs/distributed.md)")
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}".encode(),
              0)

  def release(self) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)
    super().release()


# ------------------------------------------------ children die with parent --

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
  """In a child (``preexec_fn``): the kernel sends it SIGTERM when its parent dies (Linux).

  Elsewhere it does nothing; the launcher still forwards its signals.
  """
  name = ctypes.util.find_library("c")
  if name is None:
    return
  try:
    libc = ctypes.CDLL(name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
  except (OSError, AttributeError):
    pass
