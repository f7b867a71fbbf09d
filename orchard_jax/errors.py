"""The library's own exception types, for failures a user must tell apart.

* :class:`DataError` -- the data themselves are wrong (bad labels, wrong
  shapes, an empty loader, non-finite inputs, a loader that raises). It is
  deterministic: retrying or falling back cannot help, so it fails the trial
  with the data's own message and is never turned into a fallback metric.
* :class:`StorageFault` -- the study's storage failed for a reason outside
  the trial (a lock held too long, a full disk, a lost connection). The
  trial's work is not at fault: it is retried, and never uses the budget.
"""

from __future__ import annotations

__all__ = ["DataError", "StorageFault"]


class DataError(Exception):
  """Bad data in a training or validation loader (deterministic: not retried, no fallback)."""


class StorageFault(Exception):
  """The study's storage failed (transient: the trial is retried, the budget unchanged)."""
