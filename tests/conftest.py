"""Fixtures of every test folder.

``xla_compiles``: the class :class:`Compiles`, a context manager that
counts the programs XLA compiles while active, from JAX's own monitoring
event (never the project's own counter).

``tmpfs``: a real size-limited file system for disk-full tests. The fixture
is a function ``tmpfs(size="4m") -> path`` that mounts a tmpfs for the test
(unmounted after it); ``disk_filler`` is :func:`fill`. Mounting needs root;
where the platform cannot mount one, the test is skipped with the reason (CI
runs as root, so it runs there).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import os
import pathlib
import subprocess
import tempfile
from collections.abc import Iterator

import jax
import pytest

import orchard_jax

# The test suite is a program: it opts in to the allocator the orchard-jax command uses, as
# the README shows (the library itself changes nothing on import).
orchard_jax.tune_host_memory()


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
