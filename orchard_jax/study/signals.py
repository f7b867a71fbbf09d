"""The signals of a study run: SIGINT (Ctrl-C) and SIGTERM.

:class:`GracefulInterrupt` is the handler of ``orchard-jax run`` and
``worker``: the first Ctrl-C lets the running trial finish, a second one or a
SIGTERM stops at once. :class:`StopSignals` is its base, which the
``run --workers`` launcher uses to forward both signals to its workers.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import optuna

__all__ = ["GracefulInterrupt", "StopSignals"]


class StopSignals:
  """While entered, SIGINT and SIGTERM call ``self._handle(signum, frame)``.

  The previous handlers come back on exit. Outside the main thread, where
  Python cannot set signal handlers, entering changes nothing.
  """

  _previous: dict[int, Any]

  def __enter__(self):
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    raise NotImplementedError


class GracefulInterrupt(StopSignals):
  """SIGINT and SIGTERM handler of a study run (a context manager; main thread only).

  * SIGINT (Ctrl-C): the first stops the study after the running trial, the
    second stops at once.
  * SIGTERM: stops at once. Inside a trial it raises ``KeyboardInterrupt``
    there (the objective stores the trial as FAIL with ``interrupted``, so
    it is retried); between trials the study stops before the next one.

  The study's driver sets ``in_trial`` while a trial of its own runs, and
  raises ``KeyboardInterrupt`` itself when :attr:`immediate` is already set
  (a signal that came while the trial was being created). ``exit_status`` is
  128 + the last signal (130 for SIGINT, 143 for SIGTERM).
  """

  def __init__(self, study: optuna.Study):
    self.study, self.requested, self.immediate, self.in_trial = study, False, False, False
    self.signum: int | None = None

  @property
  def exit_status(self) -> int:
    return 128 + (self.signum or signal.SIGINT)

  def _stop(self) -> None:
    try:
      self.study.stop()
    except RuntimeError:  # not optimizing yet; the runner checks `requested` before optimize
      pass

  def _handle(self, signum: int, frame: Any) -> None:
    again, self.requested, self.signum = self.requested, True, signum
    if signum == signal.SIGTERM or again:
      self.immediate = True
      if signum == signal.SIGTERM and not again:
        print("\nTerminated: the running trial stops now and is stored as interrupted (it is "
              "retried); then the outputs are written.", file=sys.stderr, flush=True)
      self._stop()
      if self.in_trial or signum == signal.SIGINT:
        raise KeyboardInterrupt
      return
    print("\nInterrupted: the running trial finishes, then the study stops and its outputs are "
          "written (Ctrl-C again stops now). The same command resumes.", file=sys.stderr, flush=True)
    self._stop()
