"""Host allocator settings: keep freed memory so large step buffers are not page-faulted in again.

XLA:CPU allocates a program's temporary buffer with ``malloc`` when the
program runs and frees it when the call ends; MiniCNN's batch-64 training
step needs 61 MiB of it. glibc serves a block above its mmap threshold (at
most 32 MiB) with freshly mapped pages and unmaps them on ``free``, so every
call faults its whole temporary buffer back in, page by page, and the kernel
zeroes each page first: 15,600 page faults per MiniCNN batch-64 step on 2
CPU cores, about a third of the step's time (``benchmarks/host_malloc.py``
and ``docs/performance.md`` have the figures). Smaller programs (MiniCNN at
batch 16: 15 MiB) already reuse their memory, because glibc raises its
threshold after the first such ``free``; the settings change nothing for
them.

:func:`tune_malloc` sets two of glibc's ``mallopt`` parameters for the whole
process:

* ``M_MMAP_MAX = 0``: large blocks come from the heap, not from ``mmap``;
* ``M_TRIM_THRESHOLD = trim_threshold`` (1 GiB by default): free memory is
  returned to the system only when more than that lies at the top of a heap.

Blocks allocated on JAX's worker threads come from per-thread heaps of at
most 64 MiB; a block that does not fit one is still mapped afresh, so the
faults fall but do not vanish when JAX dispatches asynchronously. Limiting
glibc to one heap (``M_ARENA_MAX = 1``) would remove them, but it made
compiling and MiniCNN's batch-16 epochs 10-30 % slower through lock
contention, so it is not set.

The cost: memory freed by the process stays mapped for reuse, so the
resident size stays near its peak, as with jemalloc or tcmalloc.

It is a choice for the whole process, so the library never makes it on
import: a program opts in with :func:`tune_host_memory` (the
``orchard-jax`` command and the benchmarks do), which calls
:func:`tune_malloc` unless the environment variable ``ORCHARD_JAX_MALLOC``
is ``system``; other values are an error. On systems without glibc (macOS,
Windows, musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "ORCHARD_JAX_MALLOC"
_CHOICES = ("tuned", "system")

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_state = {"tuned": False}


def malloc_choice(environ=os.environ) -> str:
  """The value of ``ORCHARD_JAX_MALLOC`` (``tuned`` if unset); raises ``ValueError`` if not allowed."""
  value = environ.get(ENV_VAR, "tuned").strip().lower() or "tuned"
  if value not in _CHOICES:
    raise ValueError(f"{ENV_VAR} must be one of {_CHOICES}, got {ENV_VAR}={environ.get(ENV_VAR)!r}")
  return value


def _is_glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
    return False


def _libc():
  if not _is_glibc():
    return None
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None


def tune_malloc(trim_threshold: int = 1 << 30) -> bool:
  """Makes glibc keep freed memory (see the module docstring); True if the settings took effect.

  Args:
    trim_threshold: bytes of free memory at the top of the heap that are kept
      rather than returned to the system; > 0 and < 2**31.

  Returns False, changing nothing, where the C library is not glibc.
  """
  if not 0 < trim_threshold < 1 << 31:
    raise ValueError(f"trim_threshold must be in (0, 2**31), got trim_threshold={trim_threshold}")
  libc = _libc()
  if libc is None:
    return False
  ok = all(libc.mallopt(param, value) for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim_threshold)))
  _state["tuned"] = _state["tuned"] or ok
  return ok


def malloc_tuned() -> bool:
  """True once :func:`tune_malloc` has changed the allocator's settings in this process."""
  return _state["tuned"]


def tune_host_memory() -> bool:
  """Opts this process in to the tuned allocator: :func:`tune_malloc` unless
  ``ORCHARD_JAX_MALLOC=system``; True if the settings took effect.

  Call it once, early (before JAX starts its threads is best). MiniCNN's
  batch-64 training step then takes 56 ms instead of 87 on 2 CPU cores
  (``benchmarks/host_malloc.py``); the process keeps its freed memory mapped.

  Raises:
    ValueError: ``ORCHARD_JAX_MALLOC`` is neither ``tuned`` nor ``system``.
  """
  return malloc_choice() == "tuned" and tune_malloc()
