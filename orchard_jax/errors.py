"""The library's own exception types, for failures a user must tell apart.

* :class:`DataError` -- the data themselves are wrong (bad labels, wrong
  shapes, an empty loader, non-finite inputs, a loader that raises). It is
  deterministic: retrying or falling back cannot help, so it fails the trial
  with the data's own message and is never turned into a fallback metric.
  It is deliberately neither a ``ValueError`` nor a ``RuntimeError``, the two
  types a failed validation is allowed to be. Three subclasses name the
  cases a caller may want to tell apart:

  - :class:`LoaderError` -- iterating the user's loader (or its dataset,
    sampler, collate function) raised; the original exception is the
    ``__cause__`` and its type and message are in the message;
  - :class:`EmptyLoaderError` -- a loader yielded no batch in an epoch;
  - :class:`NonFiniteInputError` -- training inputs hold NaN or Inf (reported
    as such, not as a diverged loss).
* :class:`StorageFault` -- the study's storage failed for a reason outside
  the trial (a lock held too long, a full disk, a lost connection). The
  trial's work is not at fault: it is retried, and never uses the budget.
* An out-of-memory error (:func:`memory_fault`) is a resource fault: like a
  storage fault it is not the trial's own, so the study's driver retries the
  trial once with its parameters; a second one with the same parameters fails
  them for good.
* :class:`SetupError` -- the trial cannot be set up as given, so every trial
  would fail the same way: the model does not fit the contract (a Linen
  module without a ``train`` argument, logits that are not
  ``[B, num_classes]``, a ``TypeError`` while its state is built) or the
  monitored metric is not among the validation's metrics
  (:class:`MissingMetricError`, also a ``KeyError``). ``run_trial`` raises it
  whatever ``reraise_errors`` says, as it does a :class:`DataError`.
* :class:`ValidationFailedError` -- every validation of a run failed (a
  ``RuntimeError``): no epoch gave a value of its own, only the fallback
  metrics, so the run has no value to store. ``run_trial`` raises it whatever
  ``reraise_errors`` says: the trial is FAIL, with the last failure's reason.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3

__all__ = ["DRIVER_MODULES", "cause_chain", "memory_fault", "os_error_code", "root_cause", "DataError", "EmptyLoaderError", "LoaderError", "NonFiniteInputError", "StorageFault", "SetupError", "MissingMetricError", "ValidationFailedError"]


class DataError(Exception):
  """Bad data in a training or validation loader (deterministic: not retried, no fallback)."""


class LoaderError(DataError):
  """The user's loader raised while it was iterated; the original exception is ``__cause__``."""


class EmptyLoaderError(DataError):
  """A training or validation loader yielded no batch in an epoch."""


class NonFiniteInputError(DataError):
  """Training inputs hold NaN or Inf (the data's fault, not a diverged loss)."""


class StorageFault(Exception):
  """The study's storage failed (transient: the trial is retried, the budget unchanged)."""


class SetupError(Exception):
  """The model or the monitored metric cannot work as given: it would fail every trial."""


class ValidationFailedError(RuntimeError):
  """Every validation of a run failed: it has no value of its own, only fallback metrics."""


class MissingMetricError(SetupError, KeyError):
  """The monitored metric is not among the validation metrics (a ``KeyError``, as the reference's)."""

  def __str__(self) -> str:  # KeyError's own quotes its message
    return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------- root causes --

# Database drivers whose own errors carry the server's words.
DRIVER_MODULES = ("psycopg2", "psycopg", "pymysql", "MySQLdb", "mysql")
# tensorstore (orbax) reports an OS error inside its message.
OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")


def _is_driver_error(e: BaseException) -> bool:
  return any(cls.__module__.split(".")[0] in DRIVER_MODULES for cls in type(e).__mro__)


def cause_chain(e: BaseException) -> list[BaseException]:
  """``e`` and its causes, outermost first: SQLAlchemy's ``.orig`` (the driver's
  error), else ``__cause__``, else ``__context__`` unless ``raise ... from None``.

  A database driver's error ends the chain: what it was raised *during* is
  SQLAlchemy's own handling (the pool's pre-ping ``InvalidatePoolError()`` while
  it reconnects), not a cause.
  """
  chain: list[BaseException] = []
  current: BaseException | None = e
  while current is not None and all(current is not seen for seen in chain):
    chain.append(current)
    orig = getattr(current, "orig", None)
    if isinstance(orig, BaseException) and orig is not current.__cause__:
      current = orig
    elif current.__cause__ is not None:
      current = current.__cause__
    elif current.__suppress_context__ or _is_driver_error(current):
      current = None
    else:
      current = current.__context__
  return chain


def os_error_code(e: BaseException) -> int | None:
  if isinstance(e, OSError):
    return e.errno
  match = OS_ERROR_CODE.search(str(e))
  return int(match.group(1)) if match else None


def _describe(e: BaseException) -> str:
  code = None if isinstance(e, OSError) else os_error_code(e)
  if code is not None:
    return f"[Errno {code}] {os.strerror(code)}"
  text = str(e)
  if isinstance(e, (OSError, sqlite3.Error)) or _is_driver_error(e):
    return text or type(e).__name__
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def root_cause(e: BaseException, limit: int = 300) -> str:
  """The deepest cause of ``e``, in one line of at most ``limit`` characters.

  Walks :func:`cause_chain` to its end, past Optuna's
  ``StorageInternalError`` ("An exception is raised during the commit ...")
  and SQLAlchemy's wrapper, to the driver's or the OS's own words: a storage
  or OS error gives its message alone ("database or disk is full",
  "database is locked", "[Errno 28] No space left on device", psycopg2's
  "server closed the connection unexpectedly ..."; tensorstore's
  ``[os_error_code='28']`` reads as the OS error), anything else
  ``"<Type>: <message>"``.
  """
  text = " ".join(_describe(cause_chain(e)[-1]).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."




# Words of an allocation that failed: XLA's status code (GPU/TPU), and XLA:CPU's, PJRT's, the
# CUDA allocators' and torch's "Out of memory ..." (XLA:CPU reports it as INTERNAL).
MEMORY_WORDS = re.compile(r"RESOURCE_EXHAUSTED|out of memory", re.IGNORECASE)


def memory_fault(e: BaseException, limit: int = 300) -> str | None:
  """One line naming the out-of-memory error in ``e``'s :func:`cause_chain`, or None.

  An out-of-memory error is a ``MemoryError`` (numpy's "Unable to allocate
  ..." included), an ``OSError`` ``ENOMEM`` (tensorstore's
  ``[os_error_code=12]`` too), or a ``RuntimeError`` -- JAX's
  ``JaxRuntimeError``, torch's ``OutOfMemoryError`` -- whose message says
  ``RESOURCE_EXHAUSTED`` or "out of memory" (XLA:CPU under ``ulimit -v``:
  ``INTERNAL: Error dispatching computation: ... Out of memory allocating
  203523140 bytes.``). The line is ``"<Type>: <the message's first line that
  says so>"``, at most ``limit`` characters (XLA's own goes on with a listing
  of every buffer).
  """
  for link in cause_chain(e):
    if isinstance(link, MemoryError) or os_error_code(link) == errno.ENOMEM:
      text = " ".join(_describe(link).split())
    elif isinstance(link, RuntimeError) and MEMORY_WORDS.search(str(link)):
      line = next(l for l in str(link).splitlines() if MEMORY_WORDS.search(l))
      text = f"{type(link).__name__}: {' '.join(line.split())}"
    else:
      continue
    return text if len(text) <= limit else text[:limit - 3] + "..."
  return None
