"""Fixtures of every test folder.

``xla_compiles``: the class :class:`Compiles`, a context manager that
counts the programs XLA compiles while active, from JAX's own monitoring
event (never the project's own counter).

``tmpfs``: a real size-limited file system for disk-full tests. The fixture
is a function ``tmpfs(size="4m") -> path`` that mounts a tmpfs for the test
(unmounted after it); ``disk_filler`` is :func:`fill`. Mounting needs root;
where the platform cannot mount one, the test is skipped with the reason (CI
runs as root, so it runs there).

``memory_cgroup``: a real memory cgroup for out-of-memory tests, a function
``memory_cgroup(limit_bytes) -> MemoryLimit`` that creates one (cgroup v2
where the v2 hierarchy offers the memory controller to new groups, else the
v1 memory controller), limited to ``limit_bytes`` of memory (and of memory
plus swap where swap exists); its ``join`` is a ``preexec_fn`` that moves a
subprocess into it, ``oom_kills()`` counts the processes the kernel killed
in it, ``peak()`` the most memory it held. Removed after the
test. It needs root (skipped otherwise, except under CI, where it fails).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import threading
import os
import pathlib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import pytest

import orchard_jax

# The test suite is a program: it opts in to the allocator the orchard-jax command uses, as
# the README shows (the library itself changes nothing on import).
orchard_jax.tune_host_memory()


BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> Any:
  """``benchmarks/<name>.py`` loaded as a module (the benchmarks are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def mounted_tmpfs(size: str = "4m") -> Iterator[pathlib.Path]:
  """Mounts a tmpfs of ``size`` (mount's syntax: ``512k``, ``4m``) and yields its path."""
  if os.geteuid() != 0:
    pytest.skip("disk-full tests mount a tmpfs, which needs root")
  path = pathlib.Path(tempfile.mkdtemp(prefix="orchard-tmpfs-"))
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True, text=True)
  if proc.returncode:
    path.rmdir()
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
    with contextlib.suppress(OSError):
      path.rmdir()


def fill(path: pathlib.Path, leave: int = 0) -> pathlib.Path:
  """Fills the file system of ``path`` with a file ``path/filler`` until ``leave`` bytes
  (rounded to blocks) stay free; returns the filler (delete it to free the space)."""
  filler = path / "filler"
  with open(filler, "wb") as f:
    chunk = b"\0" * 65536
    while True:
      free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
      if free <= leave:
        break
      try:
        f.write(chunk[:max(1, min(len(chunk), free - leave))])
        f.flush()
      except OSError:
        break
  return filler


@pytest.fixture
def tmpfs():
  """``tmpfs(size="4m") -> path``: a fresh tmpfs of ``size``, unmounted after the test."""
  with contextlib.ExitStack() as stack:
    yield lambda size="4m": stack.enter_context(mounted_tmpfs(size))


@pytest.fixture
def disk_filler():
  """:func:`fill`: ``disk_filler(path, leave=0) -> filler file``."""
  return fill


class MemoryLimit:
  """A memory cgroup made by the ``memory_cgroup`` fixture (see the module docstring)."""

  def __init__(self, path: pathlib.Path, version: int):
    self.path, self.version = path, version

  def join(self) -> None:
    """A subprocess's ``preexec_fn``: moves the new process into this cgroup."""
    (self.path / "cgroup.procs").write_text(str(os.getpid()))

  def _events(self) -> dict[str, int]:
    name = "memory.oom_control" if self.version == 1 else "memory.events"
    return {k: int(v) for k, v in (line.split() for line in
                                   (self.path / name).read_text().splitlines() if line.strip())}

  def oom_kills(self) -> int:
    return self._events()["oom_kill"]

  def peak(self) -> int:
    """The most memory the cgroup held, file pages included."""
    name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
    return int((self.path / name).read_text())


def _cgroup_missing(reason: str) -> None:
  if os.environ.get("CI"):
    pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
  pytest.skip(reason)


def _memory_hierarchy() -> tuple[pathlib.Path, int] | None:
  """Where to make a memory cgroup: the v2 root if it offers the memory controller to its
  children, else the v1 memory controller's root."""
  unified = [pathlib.Path(p) for p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")]
  for root in unified:
    with contextlib.suppress(OSError):
      if "memory" in (root / "cgroup.subtree_control").read_text().split():
        return root, 2
  v1 = pathlib.Path("/sys/fs/cgroup/memory")
  return (v1, 1) if (v1 / "memory.limit_in_bytes").exists() else None


@pytest.fixture
def memory_cgroup():
  """``memory_cgroup(limit_bytes) -> MemoryLimit``: a fresh memory cgroup, removed after the
  test."""
  made: list[pathlib.Path] = []

  def make(limit: int) -> MemoryLimit:
    if os.geteuid() != 0:
      _cgroup_missing("memory-limit tests make a memory cgroup, which needs root")
    found = _memory_hierarchy()
    if found is None:
      _cgroup_missing("no memory cgroup controller (v2 memory.max or v1 memory.limit_in_bytes)")
    root, version = found
    path = pathlib.Path(tempfile.mkdtemp(prefix="orchard-memtest-", dir=root))
    made.append(path)
    if version == 1:
      (path / "memory.limit_in_bytes").write_text(str(limit))
      swap = path / "memory.memsw.limit_in_bytes"
      if swap.exists():
        swap.write_text(str(limit))
    else:
      (path / "memory.max").write_text(str(limit))
      with contextlib.suppress(OSError):
        (path / "memory.swap.max").write_text("0")
    return MemoryLimit(path, version)

  yield make
  for path in made:
    for _ in range(50):  # its processes have exited; the kernel may take a moment to let go
      try:
        path.rmdir()
        break
      except OSError:
        time.sleep(0.1)


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Compiles:
  """XLA compiles while active: ``count``, ``by_name`` (a Counter of the compiled functions'
  names, e.g. ``"jit(_train_step)"``) and ``threads`` (the thread of each compile)."""

  def __init__(self):
    self.count, self.by_name, self.threads = 0, collections.Counter(), []

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    del duration
    if event == COMPILE_EVENT:
      self.count += 1
      self.by_name[kwargs.get("fun_name")] += 1
      self.threads.append(threading.current_thread().name)

  def __enter__(self) -> "Compiles":
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self)


@pytest.fixture
def xla_compiles():
  """:class:`Compiles`: ``with xla_compiles() as seen: ...; seen.count``."""
  return Compiles
