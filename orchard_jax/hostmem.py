"""Host allocator settings: keep freed memory so large step buffers are not page-faulted in again,
while the process's memory limit has room for it.

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
resident size stays near its peak, as with jemalloc or tcmalloc -- and at
times above it: each of glibc's heaps keeps what was freed in it, a block
that fits none of its free pieces grows the heap, and without swap the kernel
cannot reclaim any of it. A study of a large MLP (``hidden: [4096, 4096]`` on
8x8 inputs) whose two trials fit a 600 MiB memory cgroup with glibc's own
settings had its second trial OOM-killed with these (``docs/performance.md``,
"Memory limits").

So :func:`tune_host_memory` keeps the settings only while memory allows.
Where the process has a memory limit below the machine's memory -- its
cgroup's, read at run time (:func:`memory_cgroup`: cgroup v2 ``memory.max``
and ``memory.high``, or v1 ``memory.limit_in_bytes``; the lowest of its own
cgroup's and its ancestors') -- a daemon thread (``orchard-jax-hostmem``)
reads the cgroup every :data:`WATCH_INTERVAL_S` seconds
(:func:`memory_short`). Once the free memory this process's heaps keep
(``mallinfo2``) is at least what the limit leaves beyond the cgroup's
anonymous memory (``memory.stat``) -- while that memory is below half the
limit, only the cgroup's usage is read -- :func:`release_malloc` puts glibc's
own values back (``M_MMAP_MAX`` 65,536, ``M_TRIM_THRESHOLD`` 128 KiB), gives
the free memory of every heap back to the system (``malloc_trim(0)``), logs
one warning and the thread ends. The process then allocates as with
``ORCHARD_JAX_MALLOC=system``, and the study's runner gives each finished
trial's freed memory back before the next (:func:`trim_between_trials`). A
cgroup that is full of file pages (the page cache, which the kernel
reclaims) keeps the settings and their speed; so does a process without a
limit below the machine's memory, where nothing watches.

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
import logging
import os
import pathlib
import threading
from typing import NamedTuple

logger = logging.getLogger(__name__)

ENV_VAR = "ORCHARD_JAX_MALLOC"
_CHOICES = ("tuned", "system")
WATCH_INTERVAL_S = 0.02  # how often the cgroup's limit count is read while tuned under a limit

# glibc's <malloc.h> parameter numbers, and the defaults release_malloc puts back.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536
_GLIBC_TRIM_THRESHOLD = 128 * 1024

_state = {"tuned": False, "released": None}
_lock = threading.Lock()


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
  with _lock:
    _state["tuned"] = _state["tuned"] or ok
    if ok:
      _state["released"] = None
  return ok


def release_malloc(reason: str) -> bool:
  """Undoes :func:`tune_malloc`: glibc's own ``M_MMAP_MAX`` and ``M_TRIM_THRESHOLD`` again, and
  every heap's free memory given back (``malloc_trim(0)``); logs ``reason`` once.

  True if the settings were tuned and are now released; False (changing nothing) otherwise.
  """
  with _lock:
    if not _state["tuned"]:
      return False
    libc = _libc()
    libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _state["tuned"], _state["released"] = False, reason
  logger.warning("Host memory: %s; the allocator gives freed memory back from now on "
                 "(as with %s=system)", reason, ENV_VAR)
  return True


def trim_between_trials() -> bool:
  """Gives every heap's free memory back to the system (``malloc_trim(0)``) once
  :func:`release_malloc` has run in this process (memory was found short); called where one
  trial has ended and the next has not begun. True if it trimmed."""
  if _state["released"] is None:
    return False
  libc = _libc()
  return libc is not None and bool(libc.malloc_trim(0))


def malloc_tuned() -> bool:
  """True while :func:`tune_malloc`'s settings are in effect in this process (not released)."""
  return _state["tuned"]


def malloc_released() -> str | None:
  """Why :func:`release_malloc` undid the settings in this process, or None if it did not."""
  return _state["released"]


# ------------------------------------------------------------ memory limit --


class MemoryCgroup(NamedTuple):
  """The memory cgroup whose limit binds this process: the lowest limit among its own cgroup
  and its ancestors (``path``), of cgroup ``version`` 1 or 2, ``limit`` bytes."""
  path: pathlib.Path
  version: int
  limit: int

  def usage(self) -> int | None:
    """The cgroup's memory use in bytes, file pages included (v1 ``memory.usage_in_bytes``, v2
    ``memory.current``); None if unreadable."""
    name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
    try:
      return int((self.path / name).read_text())
    except (OSError, ValueError):
      return None

  def anonymous(self) -> int | None:
    """The cgroup's anonymous memory in bytes (``memory.stat``: v1 ``total_rss``, v2
    ``anon``): what the kernel cannot reclaim without swap; None if unreadable."""
    key = "total_rss" if self.version == 1 else "anon"
    try:
      for line in (self.path / "memory.stat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
          return int(value)
    except (OSError, ValueError):
      return None
    return None


def _mounts() -> list[tuple[str, str, str, str]]:
  """``(root, mount point, fs type, super options)`` of each cgroup file system mounted."""
  mounts = []
  try:
    lines = pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
  except OSError:
    return mounts
  for line in lines:
    fields = line.split()
    if "-" not in fields:
      continue
    dash = fields.index("-")
    fstype, options = fields[dash + 1], fields[dash + 3] if len(fields) > dash + 3 else ""
    if fstype in ("cgroup", "cgroup2"):
      mounts.append((fields[3], fields[4].replace("\\040", " "), fstype, options))
  return mounts


def _limit_of(folder: pathlib.Path, version: int) -> int | None:
  names = ("memory.limit_in_bytes",) if version == 1 else ("memory.max", "memory.high")
  limits = []
  for name in names:
    try:
      text = (folder / name).read_text().strip()
    except OSError:
      continue
    if text and text != "max":
      try:
        limits.append(int(text))
      except ValueError:
        continue
  return min(limits) if limits else None


def _machine_memory() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):
    return None


def memory_cgroup() -> MemoryCgroup | None:
  """The memory cgroup that limits this process (see :class:`MemoryCgroup`), or None: not on
  Linux, no memory controller, or no limit below the machine's memory.

  Reads ``/proc/self/cgroup``: the cgroup v2 entry (``0::/path``) where the
  v2 hierarchy has the memory controller (``memory.max``), else the v1 entry
  of the ``memory`` controller (``memory.limit_in_bytes``), and walks up to
  the hierarchy's root.
  """
  try:
    entries = pathlib.Path("/proc/self/cgroup").read_text().splitlines()
  except OSError:
    return None
  paths = {}
  for entry in entries:
    number, controllers, path = (entry.split(":", 2) + ["", ""])[:3]
    if number == "0" and controllers == "":
      paths[2] = path
    elif "memory" in controllers.split(","):
      paths[1] = path
  found = []
  for root, mount, fstype, options in _mounts():
    version = 2 if fstype == "cgroup2" else 1
    if version not in paths or (version == 1 and "memory" not in options.split(",")):
      continue
    relative = paths[version]
    if root != "/" and relative.startswith(root):
      relative = relative[len(root):]
    top = pathlib.Path(mount)
    folder = top / relative.lstrip("/")
    if version == 2 and not (folder / "memory.current").exists():
      continue  # a v2 hierarchy without the memory controller here
    while True:
      limit = _limit_of(folder, version)
      if limit is not None:
        found.append(MemoryCgroup(folder, version, limit))
      if folder == top or top not in folder.parents:
        break
      folder = folder.parent
  machine = _machine_memory()
  binding = min(found, key=lambda c: c.limit, default=None)
  if binding is None or (machine is not None and binding.limit >= machine):
    return None
  return binding


# ------------------------------------------------------------------- watch --


class _MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


def malloc_free_bytes() -> int | None:
  """Bytes of free memory glibc's heaps hold in this process (``mallinfo2().fordblks``: free
  chunks and the tops of the heaps), or None without glibc 2.33's ``mallinfo2``."""
  libc = _libc()
  function = getattr(libc, "mallinfo2", None) if libc is not None else None
  if function is None:
    return None
  function.restype = _MallInfo2
  return int(function().fordblks)


def memory_short(cgroup: MemoryCgroup) -> str | None:
  """Why the tuned settings must go now, or None while memory allows them.

  They must go when the free memory this process's heaps keep
  (:func:`malloc_free_bytes`) is at least what the cgroup's limit leaves
  beyond its anonymous memory (:meth:`MemoryCgroup.anonymous`, which the
  kernel cannot reclaim without swap): the next allocations that cannot reuse
  it would then be short of memory that only giving it back provides. The
  kept memory is part of the anonymous memory, so that needs the anonymous
  memory above half the limit; below, nothing but the cgroup's usage is read.
  """
  half = cgroup.limit // 2
  usage = cgroup.usage()
  if usage is not None and usage < half:  # anonymous memory <= usage
    return None
  anon = cgroup.anonymous()
  if anon is not None and anon < half:
    return None
  held = malloc_free_bytes()
  mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
  where = f"the memory cgroup {cgroup.path} has a limit of {mib(cgroup.limit)}"
  if anon is None or held is None:  # cannot tell: memory is at least half used
    return f"{where}, at least half of it in use"
  if held < cgroup.limit - anon:
    return None
  return (f"{where}, {mib(anon)} of it anonymous memory, of which this process's heaps keep "
          f"{mib(held)} free")


def _watch(cgroup: MemoryCgroup, interval: float, stop: threading.Event) -> None:
  while _state["tuned"] and not stop.wait(interval):
    reason = memory_short(cgroup)
    if reason is not None:
      release_malloc(reason)
      return


_watcher: dict = {}


def watch_memory_limit(cgroup: MemoryCgroup | None = None,
                       interval: float = WATCH_INTERVAL_S) -> threading.Thread | None:
  """Starts the thread that releases the tuned settings when ``cgroup`` (default: this
  process's, :func:`memory_cgroup`) reaches its limit; None where there is no limit to watch
  or one thread already watches."""
  cgroup = cgroup or memory_cgroup()
  if cgroup is None:
    return None
  thread = _watcher.get("thread")
  if thread is not None and thread.is_alive():
    return None
  stop = threading.Event()
  thread = threading.Thread(target=_watch, args=(cgroup, interval, stop),
                            name="orchard-jax-hostmem", daemon=True)
  _watcher.update(thread=thread, stop=stop, cgroup=cgroup)
  thread.start()
  return thread


def tune_host_memory() -> bool:
  """Opts this process in to the tuned allocator: :func:`tune_malloc` unless
  ``ORCHARD_JAX_MALLOC=system``; True if the settings took effect.

  Under a memory cgroup's limit the settings last until the cgroup first
  reaches it (:func:`watch_memory_limit`, see the module docstring).

  Call it once, early (before JAX starts its threads is best). MiniCNN's
  batch-64 training step then takes 56 ms instead of 87 on 2 CPU cores
  (``benchmarks/host_malloc.py``); the process keeps its freed memory mapped.

  Raises:
    ValueError: ``ORCHARD_JAX_MALLOC`` is neither ``tuned`` nor ``system``.
  """
  if malloc_choice() != "tuned" or not tune_malloc():
    return False
  watch_memory_limit()
  return True
