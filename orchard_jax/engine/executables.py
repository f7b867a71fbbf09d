"""Compiled steps, reused within a process and, optionally, across processes.

``jax.jit`` reuses compiled code within a process, and JAX's persistent
compilation cache reuses XLA's output across processes. But to look an entry
up in that cache JAX must first trace and lower the function: for a CNN's
training step that costs about a second per process, far more than loading the
executable. :func:`compiled` keeps executables under a key computed *without*
tracing:

* in memory: ``(name, static arguments, argument tree, shapes, dtypes,
  shardings, commitment)``, the same things ``jax.jit``'s own cache keys on, so a trial
  with the same structure as an earlier one compiles nothing;
* on disk (only when :func:`set_cache_dir` names a directory, which the
  ``orchard-jax`` command does by default): the same key, written out, plus a
  fingerprint of everything else the program could depend on -- the source of
  the orchard_jax package, the versions of jax, jaxlib, flax, optax and numpy,
  JAX's configuration, ``XLA_FLAGS``, the backend and the CPU. Only programs
  whose model is fully described by that key are written: a model built from
  orchard_jax's own modules with plain-data attributes. Any other model (your
  own Linen or NNX module, whose source is not fingerprinted) is compiled as
  ``jax.jit`` compiles it, through JAX's persistent cache when that is on.

Loading an executable still costs XLA about 0.2 s per MB. So the cache also
remembers which program followed which in earlier processes (``<file>.next``,
a list of file names): when a process asks for a program, the ones that
followed it before start loading at once on a background thread (loading
releases the GIL), and are waiting in memory when asked for. A trial asks for
its state build, then its training step, then its evaluation step: the
second process's steps load while its state is built and its first epoch
runs.

Each file starts with the SHA-256 of its content, checked before anything
in it is unpickled or handed to XLA: a damaged executable (a flipped bit, a
torn write) would otherwise crash the process with SIGSEGV or SIGILL when it
runs. A file that fails the check, or cannot be read or loaded, is one
warning; the program is compiled again and the file rewritten. Files are
written through :mod:`orchard_jax.fileio` (a temporary sibling and a rename),
so a failed write leaves nothing behind, and what killed processes left is
swept when a process first uses the directory. Files are pickles: keep the
directory private, as you would JAX's own cache.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import logging
import os
import pathlib
import pickle
import queue
import threading
from typing import Any, Callable

import jax

from orchard_jax import fileio
from orchard_jax.engine.executable_key import code_fingerprint, environment, portable

logger = logging.getLogger(__name__)

__all__ = ["cache_dir", "clear", "compiled", "set_cache_dir", "stats"]

FORMAT = 2  # 2: a checksum before the pickle
_MAGIC = b"orchard_jax executable\n"
_DIGEST = 32  # bytes of a SHA-256
_LEGACY_TEMPORARY = ".tmp-"  # what writers before FORMAT 2 named their temporaries

_lock = threading.Lock()
_memory: dict[Any, Callable[..., Any]] = {}
_stats: collections.Counter = collections.Counter()  # (event, name) -> count
_dir: pathlib.Path | None = None
_ahead: dict[pathlib.Path, tuple[list, concurrent.futures.Future]] = {}  # path -> (devices, load)
_asked: set[pathlib.Path] = set()  # files this process has loaded, written or started loading
_last: list[pathlib.Path] = []  # the file this process used last
_loader: list = []  # the _Loader, made at first use
_swept: set[pathlib.Path] = set()  # directories whose stale temporaries this process removed


def set_cache_dir(path: str | os.PathLike | None) -> None:
  """Where executables are written and read across processes; None turns that off."""
  global _dir
  _dir = None if path is None else pathlib.Path(os.path.expanduser(path))


def cache_dir() -> pathlib.Path | None:
  return _dir


def stats(name: str | None = None) -> dict[str, int]:
  """Counts since the last :func:`clear`, of one function's programs or all.

  ``compiled``: traced, lowered and compiled (XLA may still have found it in
  JAX's persistent cache); ``loaded``: read from :func:`cache_dir`;
  ``saved``: written to it; ``ahead``: of the loaded ones, those already
  loading in the background when asked for.
  """
  events = ("compiled", "loaded", "saved", "ahead")
  return {e: sum(n for (event, fn), n in _stats.items() if event == e and name in (None, fn))
          for e in events}


def clear() -> None:
  """Forgets the in-memory executables and zeroes :func:`stats` (files stay; the directory is
  swept of stale temporaries again at its next use)."""
  with _lock:
    pending = [future for _, future in _ahead.values()]
    _memory.clear()
    _stats.clear()
    _ahead.clear()
    _asked.clear()
    _last.clear()
    _swept.clear()
  concurrent.futures.wait(pending)


def _signature(args: tuple) -> tuple:
  """``args``' tree and, per leaf, what ``jax.jit`` keys its compiled programs on.

  That includes whether an array is committed to its device: jit compiles a
  program again for an argument that is committed where it was not (or the
  reverse), even on the same device, so such arguments get their own entry
  here too (and :func:`stats` counts that compile).
  """
  leaves, tree = jax.tree.flatten(args)
  sig = []
  for leaf in leaves:
    aval = jax.typeof(leaf)
    sharding = getattr(leaf, "sharding", None)
    committed = getattr(leaf, "committed", None)
    sig.append((aval.shape, str(aval.dtype), aval.weak_type, committed, sharding))
  return tree, tuple(sig)


def compiled(jitted: Any, args: tuple, *, name: str, static: tuple = (),
             model: Any = None) -> Callable[..., Any]:
  """The compiled ``jitted`` for ``args``: from memory, from disk, or compiled now.

  Args:
    jitted: a ``jax.jit``-wrapped function whose static arguments, if any,
      come first and are given in ``static``.
    args: the dynamic arguments, as they will be passed to the result.
    name: names the function in keys and files (e.g. ``"train_step"``).
    static: the leading static arguments (hashable).
    model: the model the program runs; the program goes to disk only when
      :func:`~orchard_jax.engine.executable_key.portable` accepts it.

  Returns:
    A callable taking ``*args`` (no static arguments): ``jitted`` itself
    (with ``static`` bound) when this process compiles the program -- on
    its first call if no directory is set -- or the ``jax.stages.Compiled``
    read from the directory. Donation follows ``jitted``'s either way.
  """
  tree, sig = _signature(args)
  key = (name, static, tree, sig, bool(jax.config.jax_enable_x64),
         str(jax.config.jax_default_matmul_precision))
  with _lock:
    hit = _memory.get(key)
  if hit is not None:
    return hit
  path = _path(name, static, tree, sig, model)
  result = None
  if path is not None:
    _sweep(path.parent)
    devices = _devices(sig)
    _load_successors(path, devices)  # they load while this one does
    with _lock:
      ahead = _ahead.pop(path, None)
      _asked.add(path)
    if ahead is not None and ahead[0] == devices:
      result = ahead[1].result()
      _stats["ahead", name] += result is not None
    else:
      result = _load(path, devices)
  if result is None:
    if path is not None:
      executable, writable = _compile_for_disk(jitted, static, args)
      if writable:
        _save(path, executable, name)
      else:
        logger.info("orchard_jax: %s came from JAX's persistent cache, which XLA cannot "
                    "serialize again; not written to %s", name, path.parent)
    # jit's own dispatch is faster than a Compiled object's (about 90 us a call
    # for a small MLP step on XLA:CPU); after the compile above, jit's first
    # call finds the program in JAX's in-memory caches.
    result = functools.partial(jitted, *static) if static else jitted
    _stats["compiled", name] += 1
  else:
    _stats["loaded", name] += 1
  if path is not None and path.exists():
    _follows(path)
  with _lock:
    _memory[key] = result
  return result


def _next_file(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + ".next")


def _successors(path: pathlib.Path) -> list[pathlib.Path]:
  """The files that followed ``path`` in earlier processes."""
  try:
    names = _next_file(path).read_text(encoding="utf-8").split()
  except (OSError, UnicodeDecodeError):
    return []
  return [path.with_name(n) for n in names if n.endswith(".exe") and os.sep not in n]


def _load_successors(path: pathlib.Path, devices: list) -> None:
  """Starts loading, in the background, the files that followed ``path`` before."""
  for successor in _successors(path):
    with _lock:
      if successor in _asked:
        continue
      _asked.add(successor)
      if not _loader:
        _loader.append(_Loader())
      _ahead[successor] = (devices, _loader[0].submit(_load_ahead, successor, devices))


class _Loader:
  """One daemon thread that runs loads ahead, in order, each giving a future.

  Not a ``ThreadPoolExecutor``: the interpreter joins its threads at exit, and
  a process whose exit an interrupt reached in the middle of a ``submit``
  waited for that idle thread for ever. A load that is still running when the
  process exits is only a read, and is dropped.
  """

  def __init__(self):
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=self._run, name="orchard_jax-load", daemon=True).start()

  def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((future, fn, args))
    return future

  def _run(self) -> None:
    while True:
      future, fn, args = self._queue.get()
      if not future.set_running_or_notify_cancel():
        continue
      try:
        future.set_result(fn(*args))
      except BaseException as e:  # pylint: disable=broad-except  # the waiter's to see
        future.set_exception(e)


def _load_ahead(path: pathlib.Path, devices: list) -> jax.stages.Compiled | None:
  result = _load(path, devices)
  if result is not None:
    _load_successors(path, devices)
  return result


def _follows(path: pathlib.Path) -> None:
  """Records that ``path`` followed the file this process used before it."""
  with _lock:
    previous = _last[0] if _last else None
    _last[:] = [path]
  if previous is None or previous == path:
    return
  names = [p.name for p in _successors(previous)]
  if path.name in names:
    return
  try:
    fileio.atomic_write_text(_next_file(previous), "\n".join(names + [path.name]) + "\n", 0o600)
  except OSError as e:
    logger.warning("orchard_jax: cannot write %s (%s)", _next_file(previous), e)


_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_hits = threading.local()


def _count_jax_cache_hits(event: str, **kwargs: Any) -> None:
  if event == _JAX_CACHE_HIT:
    _hits.count = getattr(_hits, "count", 0) + 1


jax.monitoring.register_event_listener(_count_jax_cache_hits)


def _compile_for_disk(jitted: Any, static: tuple, args: tuple) -> tuple[jax.stages.Compiled, bool]:
  """Compiles a program the disk cache will hold; returns it and whether it can be written.

  On XLA:CPU an executable that JAX read from its own persistent cache
  serializes without its kernels (the copy fails at its first call with
  "Function ... not found"), so such a program is used but not written. JAX
  is kept from storing this compile in its cache (its minimum compile time is
  raised meanwhile), so the programs this module writes are not found there
  by a later process.
  """
  before = getattr(_hits, "count", 0)
  with _lock:
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
      result = jitted.lower(*static, *args).compile()
    finally:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
  return result, getattr(_hits, "count", 0) == before


def _devices(sig: tuple) -> list | None:
  devices = set()
  for *_, sharding in sig:
    if sharding is None:
      return None
    devices |= set(sharding.device_set)
  return list(devices) if len(devices) == 1 else None


def _path(name: str, static: tuple, tree: Any, sig: tuple, model: Any) -> pathlib.Path | None:
  if _dir is None or not portable(model) or _devices(sig) is None:
    return None
  text = repr((FORMAT, name, static, str(tree), sig, code_fingerprint(), environment()))
  if " at 0x" in text:  # an object without a value repr: no stable key
    return None
  return _dir / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:40]}.exe"


def _load(path: pathlib.Path, devices: list) -> jax.stages.Compiled | None:
  from jax.experimental import serialize_executable  # pylint: disable=import-outside-toplevel
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return None
  except OSError as e:
    logger.warning("orchard_jax: cannot read cached executable %s (%s); compiling", path, e)
    return None
  try:
    payload = _unseal(data)
  except ValueError as e:
    logger.warning("orchard_jax: cannot load cached executable %s: it is damaged (%s); "
                   "compiling it again", path, e)
    return None
  try:
    blob, in_tree, out_tree = pickle.loads(payload)
    device = devices[0]
    return serialize_executable.deserialize_and_load(blob, in_tree, out_tree, backend=device.client,
                                                     execution_devices=[device])
  except Exception as e:  # pylint: disable=broad-except
    logger.warning("orchard_jax: cannot load cached executable %s (%s: %s); compiling", path,
                   type(e).__name__, e)
    return None


def _save(path: pathlib.Path, result: jax.stages.Compiled, name: str) -> None:
  from jax.experimental import serialize_executable  # pylint: disable=import-outside-toplevel
  try:
    payload = pickle.dumps(serialize_executable.serialize(result))
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: concurrent workers never read half a file; a failed write leaves no temporary
    fileio.atomic_write_bytes(path, _seal(payload), 0o600)
    _stats["saved", name] += 1
  except Exception as e:  # pylint: disable=broad-except
    logger.warning("orchard_jax: cannot write cached executable %s (%s: %s)", path,
                   type(e).__name__, e)


def _seal(payload: bytes) -> bytes:
  """``payload`` behind a header and its SHA-256, which :func:`_unseal` checks."""
  return _MAGIC + hashlib.sha256(payload).digest() + payload


def _unseal(data: bytes) -> bytes:
  """The payload of a file :func:`_seal` wrote; ValueError if it is not whole and unchanged."""
  start = len(_MAGIC) + _DIGEST
  if not data.startswith(_MAGIC) or len(data) < start:
    raise ValueError(f"no checksum: {len(data)} bytes that do not start with a SHA-256 header")
  payload = data[start:]
  if hashlib.sha256(payload).digest() != data[len(_MAGIC):start]:
    raise ValueError(f"its {len(payload)} bytes do not match their SHA-256")
  return payload


def _sweep(directory: pathlib.Path) -> None:
  """Once per process and directory: removes the temporaries killed writers left there."""
  with _lock:
    if directory in _swept:
      return
    _swept.add(directory)
  removed = fileio.sweep_temporaries(directory, _LEGACY_TEMPORARY)
  if removed:
    logger.info("orchard_jax: removed %d temporary files of interrupted writes from %s", removed,
                directory)
