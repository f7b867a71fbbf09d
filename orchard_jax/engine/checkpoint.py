"""The best state's files: an orbax checkpoint of its arrays and a JSON summary beside it.

:func:`save_best` writes them (the folder appears whole or not at all,
:func:`orchard_jax.fileio.atomic_directory`), :func:`load_best` reads them back
into a state of the same structure, :func:`read_summary` reads the summary.

Orbax logs through absl's logger: INFO lines for every save, and, from its
threads, ERROR tracebacks of a failed write (hundreds of lines per trial).
While this module saves or restores, records from orbax's code are dropped
there (:func:`quiet_orbax`); the caller's logging is left as it was.

Orbax runs each write in a fresh event loop that it closes as soon as the
first array fails, while TensorStore still writes the others; when such a
write ends, TensorStore's thread hands its result to the closed loop, and
the ``RuntimeError('Event loop is closed')`` goes to ``sys.unraisablehook``,
which prints a bare traceback. The event loops made while this module saves
or restores therefore wait for their unfinished tasks before they close, and
a save or load ends only after the threads orbax started in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from orchard_jax.core.state import TrainState
from orchard_jax.fileio import atomic_directory

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_SUBDIR", "SUMMARY_FILE", "load_best", "quiet_orbax", "read_summary",
           "save_best"]

CHECKPOINT_SUBDIR = "checkpoint"
SUMMARY_FILE = "best.json"


_ORBAX_LOCK = threading.Lock()


class _FromOrbax(logging.Filter):
  """Drops the records logged from orbax's own code."""

  def __init__(self):
    super().__init__()
    spec = importlib.util.find_spec("orbax.checkpoint")
    locations = list(spec.submodule_search_locations or ()) if spec else []
    self.roots = tuple(os.path.dirname(p) + os.sep for p in locations)

  def filter(self, record: logging.LogRecord) -> bool:
    return not (self.roots and record.pathname.startswith(self.roots))


# How long a closing event loop of orbax waits for its unfinished writes, and the end of a save or
# load for the threads orbax started in it; then each goes on as before.
_DRAIN_TIMEOUT_S = 60.0


def _drain(loop: asyncio.AbstractEventLoop) -> None:
  """Runs ``loop`` (stopped, not closed) until it has no unfinished task and has run the
  callbacks already due (a ``gather`` takes its tasks' errors there), for at most
  ``_DRAIN_TIMEOUT_S``; the errors of the tasks it waited for are taken, not logged."""
  deadline, waited = time.monotonic() + _DRAIN_TIMEOUT_S, set()
  while not (loop.is_closed() or loop.is_running()):
    loop.run_until_complete(asyncio.sleep(0))
    pending, left = asyncio.all_tasks(loop), deadline - time.monotonic()
    if not pending or left <= 0:
      break
    waited |= pending
    loop.run_until_complete(asyncio.wait(pending, timeout=left))
  for task in waited:
    if task.done() and not task.cancelled():
      task.exception()  # asyncio logs an error nobody took when the task is freed


def _drain_then_close(loop: asyncio.AbstractEventLoop) -> None:
  """Makes ``loop.close()`` first :func:`_drain` the loop, so that no result of TensorStore
  reaches it closed; a loop whose class takes no attribute closes as before."""
  close = loop.close

  def draining_close() -> None:
    try:
      _drain(loop)
    except Exception:  # pylint: disable=broad-except  # the loop closes all the same
      pass
    finally:
      close()

  try:
    loop.close = draining_close  # type: ignore[method-assign]
  except (AttributeError, TypeError):
    pass


class _DrainingPolicy(asyncio.AbstractEventLoopPolicy):
  """The current event loop policy, but each new loop drains its tasks before it closes."""

  def __init__(self, base: asyncio.AbstractEventLoopPolicy):
    self.base = base

  def get_event_loop(self) -> asyncio.AbstractEventLoop:
    return self.base.get_event_loop()

  def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
    self.base.set_event_loop(loop)

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    loop = self.base.new_event_loop()
    _drain_then_close(loop)
    return loop

  def get_child_watcher(self) -> Any:
    return self.base.get_child_watcher()

  def set_child_watcher(self, watcher: Any) -> None:
    self.base.set_child_watcher(watcher)


def _orbax_threads() -> set[threading.Thread]:
  """The running threads of orbax's own thread classes (its commit threads)."""
  return {t for t in threading.enumerate() if type(t).__module__.startswith("orbax.")}


def _join_new(threads: set[threading.Thread]) -> None:
  """Waits (at most ``_DRAIN_TIMEOUT_S`` in all) for orbax's threads not in ``threads``."""
  deadline = time.monotonic() + _DRAIN_TIMEOUT_S
  for thread in _orbax_threads() - threads - {threading.current_thread()}:
    # threading's own join: orbax's raises the thread's error, which its save already raised
    threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Orbax's log records dropped while the block runs (held under ``_ORBAX_LOCK``).

  Orbax logs through absl's logger (``"absl"``); a filter on it drops the
  records whose code is orbax's, and is removed after the block. absl calls
  ``logging.basicConfig()`` before its first record when the root logger has
  no handler, which would configure a program's logging for good: a
  ``NullHandler`` stands in on the root logger for the block instead. The
  levels and handlers of every logger are as they were after it.

  The event loops made in the block (orbax makes one per write, in its own
  threads) run their unfinished tasks to the end before they close: a write
  that fails leaves none of TensorStore's results to arrive at a closed loop
  and be printed as a bare traceback. A save that fails can also leave
  orbax's commit threads running; the block ends when they have ended, so
  that none logs or writes after it. The asyncio event loop policy is the
  caller's again after the block.
  """
  absl, root, drop = logging.getLogger("absl"), logging.getLogger(), _FromOrbax()
  stand_in = None if root.handlers else logging.NullHandler()
  policy, threads = asyncio.get_event_loop_policy(), _orbax_threads()
  absl.addFilter(drop)
  if stand_in is not None:
    root.addHandler(stand_in)
  draining = _DrainingPolicy(policy)
  asyncio.set_event_loop_policy(draining)
  try:
    yield
  finally:
    try:
      _join_new(threads)
    finally:
      if asyncio.get_event_loop_policy() is draining:
        asyncio.set_event_loop_policy(policy)
      absl.removeFilter(drop)
      if stand_in is not None:
        root.removeHandler(stand_in)


def save_best(directory: str | pathlib.Path, params: Any, model_state: Any,
              summary: dict[str, Any]) -> pathlib.Path:
  """Writes ``{"params", "model_state"}`` with orbax and ``summary`` as JSON.

  ``directory`` is the best state's own folder: both are written into a
  temporary sibling that then replaces ``directory`` as a whole
  (:func:`~orchard_jax.fileio.atomic_directory`), so ``directory/checkpoint``
  and ``directory/best.json`` appear together or not at all. On an error (a
  full disk) the temporary folder, with orbax's own
  ``checkpoint.orbax-checkpoint-tmp`` in it, is removed and ``directory``
  keeps its previous best. Returns the directory.
  """
  directory = pathlib.Path(directory).absolute()
  with atomic_directory(directory) as temporary, _ORBAX_LOCK, quiet_orbax():
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  # it logs too
    with ocp.StandardCheckpointer() as checkpointer:  # waits for orbax's writes on leaving
      checkpointer.save(temporary / CHECKPOINT_SUBDIR,
                        {"params": params, "model_state": model_state})
    (temporary / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
  return directory


def load_best(directory: str | pathlib.Path, template: TrainState) -> TrainState:
  """``template`` with the parameters and model state saved in ``directory``.

  Args:
    directory: A directory written by :class:`BestState` / :func:`save_best`.
    template: A state of the same structure (same model, precision and
      input shape), e.g. a freshly initialised one; only its structure and
      non-parameter fields are used.

  Raises:
    FileNotFoundError: when ``directory`` holds no checkpoint.
  """
  path = pathlib.Path(directory).absolute() / CHECKPOINT_SUBDIR
  if not path.is_dir():
    raise FileNotFoundError(f"no best-state checkpoint in {directory} (expected {path}); "
                            f"was the run given an output directory, and did it finish?")
  target = {"params": template.params, "model_state": template.model_state}
  with _ORBAX_LOCK, quiet_orbax():
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, target)
  return template.replace(params=restored["params"], model_state=restored["model_state"])


def read_summary(directory: str | pathlib.Path) -> dict[str, Any]:
  """The ``best.json`` written beside a checkpoint: epoch, value and metric."""
  return json.loads((pathlib.Path(directory) / SUMMARY_FILE).read_text())
