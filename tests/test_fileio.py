"""Atomic writes: a failed write leaves nothing, and only a gone writer's temporary is removed."""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from orchard_jax import fileio

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Holds a folder write open (its temporary locked) until killed.
WRITER = """
import sys, time
from orchard_jax.fileio import atomic_directory
with atomic_directory(sys.argv[1]) as folder:
  (folder / "part").write_bytes(b"x" * 1000)
  print("writing", flush=True)
  time.sleep(600)
"""


def temporaries(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def age(path: pathlib.Path, seconds: float = 2 * fileio.STALE_AFTER_S) -> None:
  then = time.time() - seconds
  os.utime(path, (then, then))


def test_a_live_writers_temporary_is_kept_and_a_killed_writers_removed(tmp_path):
  target = tmp_path / "best"
  writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE)
  try:
    assert writer.stdout.readline().strip() == "writing"
    (temporary,) = temporaries(tmp_path)
    age(tmp_path / temporary)  # old enough: only its writer's lock keeps it
    fileio.remove_stale_temporaries(target)
    assert fileio.sweep_temporaries(tmp_path) == 0
    assert temporaries(tmp_path) == [temporary]
  finally:
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
  assert temporaries(tmp_path) == [temporary]  # what a killed writer leaves
  assert fileio.sweep_temporaries(tmp_path) == 1
  assert temporaries(tmp_path) == [] and not target.exists()


def test_a_young_temporary_is_kept_until_it_is_stale(tmp_path):
  target = tmp_path / "table.csv"
  young = tmp_path / ".table.csv.tmp-1-00000000"  # a writer may not have locked it yet
  young.write_text("a,b\n")
  fileio.atomic_write_text(target, "x\n")
  assert temporaries(tmp_path) == [young.name]
  age(young)
  fileio.atomic_write_text(target, "y\n")  # the next write of the name removes it
  assert temporaries(tmp_path) == [] and target.read_text() == "y\n"


def test_a_write_that_fails_on_a_full_disk_leaves_no_temporary(tmpfs, disk_filler):
  folder = tmpfs("512k")
  target = folder / "results.csv"
  fileio.atomic_write_text(target, "before\n")
  disk_filler(folder, leave=0)
  with pytest.raises(OSError) as raised:
    fileio.atomic_write_bytes(target, b"z" * 65536)
  assert raised.value.errno == errno.ENOSPC
  assert temporaries(folder) == [] and target.read_text() == "before\n"
