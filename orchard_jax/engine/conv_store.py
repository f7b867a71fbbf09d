"""The convolution lowerings chosen on this machine, kept beside the compiled executables.

:mod:`orchard_jax.models.conv_choice` measures a layer once per process; attached to the
executables' directory (:func:`attach`, which the executable key does), a choice is also
written to ``conv_lowering.json`` there and read back by later processes, which then
measure nothing. The table only grows: a choice, once written, is never changed, so an
executable compiled with it is keyed (by the table's ``id``) with what a later process
would choose. Entries are keyed by the CPU too. Writes hold a lock (``flock`` on
``.conv_lowering.lock``) and read the table again first, so when two processes measure
the same layer at once, the first written wins and the other uses it. A file that cannot be
read as such a table is one warning, and a new table (with a new ``id``) replaces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import threading
import uuid
from collections.abc import Iterator

from orchard_jax import fileio
from orchard_jax.models import conv_choice

logger = logging.getLogger(__name__)

__all__ = ["FILE", "FileStore", "attach"]

FILE = "conv_lowering.json"
_attached: list = []  # [(directory, machine)] of the store attached, or []
_lock = threading.Lock()


class FileStore:
  """A :class:`~orchard_jax.models.conv_choice.Store` in ``directory`` / :data:`FILE`, for
  choices made on ``machine`` (a string naming the CPU)."""

  def __init__(self, directory: str | os.PathLike, machine: str):
    self.path = pathlib.Path(directory) / FILE
    self.machine = machine
    with self._locked():
      table = self._read()
      if table is None:
        table = {"id": uuid.uuid4().hex, "choices": {}}
        self._write(table)
    self.identity: str = table["id"]
    self._choices: dict[str, str] = dict(table["choices"])

  def _entry(self, key: conv_choice.LayerKey) -> str:
    return json.dumps([self.machine, *key])

  def get(self, key: conv_choice.LayerKey) -> str | None:
    return self._choices.get(self._entry(key))

  def put(self, key: conv_choice.LayerKey, lowering: str) -> str:
    entry = self._entry(key)
    with self._locked():
      table = self._read()
      if table is None or table["id"] != self.identity:  # replaced meanwhile: rewrite ours
        table = {"id": self.identity, "choices": dict(self._choices)}
      lowering = table["choices"].setdefault(entry, lowering)
      self._choices.update(table["choices"])
      self._write(table)
    return lowering

  @contextlib.contextmanager
  def _locked(self) -> Iterator[None]:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path.with_name(".conv_lowering.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
      with contextlib.suppress(OSError):  # no flock on this file system: unlocked
        fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)

  def _read(self) -> dict | None:
    """The table in the file; None if there is none or it is not one (with a warning)."""
    try:
      table = json.loads(self.path.read_text(encoding="utf-8"))
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      logger.warning("orchard_jax: cannot read %s (%s); measuring convolutions again", self.path, e)
      return None
    if (not isinstance(table, dict) or not isinstance(table.get("id"), str)
        or not isinstance(table.get("choices"), dict)
        or not all(v in conv_choice.LOWERINGS for v in table["choices"].values())):
      logger.warning("orchard_jax: %s is not a table of convolution lowerings; measuring "
                     "convolutions again", self.path)
      return None
    return table

  def _write(self, table: dict) -> None:
    fileio.atomic_write_text(self.path, json.dumps(table, indent=0, sort_keys=True) + "\n", 0o600)


def attach(directory: str | os.PathLike | None, machine: str) -> None:
  """Keeps the choices in ``directory`` from now on (None: in this process only). A directory
  that cannot be written is one warning, and choices stay in this process."""
  where = None if directory is None else (pathlib.Path(directory), machine)
  with _lock:
    if (_attached[0] if _attached else None) == where:
      return
    _attached[:] = [where]
  if where is None:
    conv_choice.set_store(None)
    return
  try:
    store = FileStore(*where)
  except OSError as e:
    logger.warning("orchard_jax: cannot keep convolution lowerings in %s (%s); they are "
                   "measured in each process", directory, e)
    store = None
  conv_choice.set_store(store)
