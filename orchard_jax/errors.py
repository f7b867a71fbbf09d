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
"""

from __future__ import annotations

__all__ = ["DataError", "EmptyLoaderError", "LoaderError", "NonFiniteInputError", "StorageFault"]


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
