"""Out of memory, made for real: a memory cgroup's limit (the kernel's OOM killer) and an
address-space limit (``RLIMIT_AS``: allocations fail inside the process).

Each test runs the ``orchard-jax`` command on tiny.npz with an MLP large enough for the limit
to bite, then reads the Optuna storage itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import resource
import sqlite3
import subprocess
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from orchard_jax.errors import LoaderError, memory_fault
from orchard_jax.hostmem import _is_glibc
from orchard_jax.records import ERROR, RESOURCE_FAULT, RETRY_OF
from orchard_jax.study.storage import open_storage
from orchard_jax.study.budget import finished_count
from tests.study.test_faults import fault_recipe

TIMEOUT = 240


def memory_recipe(workdir: pathlib.Path, name: str, *, n_trials: int = 2,
                  hidden=(4096, 4096), **optuna_keys) -> pathlib.Path:
  """``n_trials`` trials of 1 epoch of an MLP of ``hidden`` widths (two 4096-wide layers: 17 M
  parameters, 64 MiB each for weights, gradients, momentum and best state)."""
  return fault_recipe(workdir, name, hidden=hidden, n_trials=n_trials, epochs=1, **optuna_keys)


def trials_of(workdir: pathlib.Path, name: str) -> list:
  storage = open_storage(f"sqlite:///{workdir / name / 'study.db'}")
  return sorted(optuna.load_study(study_name=name, storage=storage).get_trials(),
                key=lambda t: t.number)


@pytest.mark.skipif(not _is_glibc(), reason="the allocator settings are glibc's")
def test_a_study_that_fits_its_memory_cgroup_is_not_oom_killed_by_the_tuned_allocator(
    workdir, warm_env, command, memory_cgroup):
  """Two trials of a 17 M-parameter MLP fit 600 MiB with glibc's own settings; with the freed
  memory kept (M_MMAP_MAX=0, a 1 GiB trim threshold) the second trial was OOM-killed at its
  start. The settings go once the heaps keep what the limit still leaves."""
  cgroup = memory_cgroup(600 * 2**20)
  path = memory_recipe(workdir, "cgroup_fits")
  env = {**warm_env, "ORCHARD_JAX_MALLOC": "tuned"}
  # The trials' memory; the final phases are off (exporting this 17 M-parameter model to ONNX
  # needs more than 600 MiB).
  proc = subprocess.run([*command, "run", str(path), "--final", "off"], env=env, cwd=workdir,
                        capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=cgroup.join)
  assert cgroup.oom_kills() == 0 and proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
  assert [t.state for t in trials_of(workdir, "cgroup_fits")] == [TrialState.COMPLETE] * 2
  (line,) = [l for l in proc.stderr.splitlines() if "Host memory:" in l]
  assert f"the memory cgroup {cgroup.path} has a limit of 600 MiB" in line
  assert "the allocator gives freed memory back from now on" in line


# ------------------------------------------------ out of memory inside the process --

# Address space a trial may add to what its process holds when it starts: far less than the
# 17 M-parameter MLP's state (64 MiB per weight matrix, for the weights and the optimizer).
HEADROOM = 32 * 2**20
OOM_LINE = "ran out of memory ("


def _waits_for_lock(pid: int, lock: int) -> bool:
  """True once process ``pid`` waits for the ``flock`` held on file descriptor ``lock``."""
  inode = os.fstat(lock).st_ino
  return any(fields[:2] == ["->", "FLOCK"] and fields[4] == str(pid) and
             fields[5].endswith(f":{inode}")
             for fields in (line.split()[1:] for line in
                            pathlib.Path("/proc/locks").read_text().splitlines()))


def _asked(db: pathlib.Path) -> bool:
  """Whether the study in SQLite file ``db`` has a trial yet."""
  try:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as c:
      return c.execute("SELECT COUNT(*) FROM trials").fetchone()[0] > 0
  except sqlite3.Error:  # not created yet
    return False


def run_out_of_memory(workdir, env, command, name: str, **optuna_keys) -> subprocess.Popen:
  """``orchard-jax run`` of :func:`memory_recipe`'s study with an address-space limit
  (``RLIMIT_AS``) that its first trial cannot fit in.

  The process's own size decides the limit (it varies with the machine: threads, heaps), so
  the test holds the study's lock -- as another process of the study would -- until the
  process has started and waits for it; the soft limit is then what the process holds plus
  :data:`HEADROOM` (the hard limit stays unlimited, so it can be raised again), and the lock
  is let go.
  """
  path = memory_recipe(workdir, name, **optuna_keys)
  (workdir / name).mkdir()
  lock = os.open(workdir / name / "study.db.orchard-lock", os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(lock, fcntl.LOCK_EX)
    proc = subprocess.Popen([*command, "run", str(path)], env=env, cwd=workdir, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while not _waits_for_lock(proc.pid, lock):
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
      time.sleep(0.05)
    status = pathlib.Path(f"/proc/{proc.pid}/status").read_text()
    size = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (size + HEADROOM, resource.RLIM_INFINITY))
  finally:
    os.close(lock)  # lets the process take it
  return proc


def test_memory_fault_names_the_allocation_that_failed_along_the_cause_chain():
  import numpy as np
  with pytest.raises(MemoryError) as raised:  # a real one: 8 TiB
    np.empty((2**40,), dtype=np.float64)
  try:
    raise LoaderError("the training loader raised") from raised.value
  except LoaderError as e:
    wrapped = e
  assert memory_fault(wrapped).startswith(
      f"{type(raised.value).__name__}: Unable to allocate 8.00 TiB for an array")
  import jax
  xla = ("INTERNAL: Error dispatching computation: Error dispatching computation: Out of "
         "memory allocating 67108864 bytes.")
  assert memory_fault(jax.errors.JaxRuntimeError(xla)) == f"JaxRuntimeError: {xla}"
  gpu = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.\n" + "buffer\n" * 999
  assert memory_fault(jax.errors.JaxRuntimeError(gpu)) == (
      "JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.")
  assert memory_fault(OSError(12, os.strerror(12))) == "[Errno 12] Cannot allocate memory"
  for other in (RuntimeError("Training diverged: loss=nan at epoch 2"), ValueError("bad"),
                LoaderError("out of range")):
    assert memory_fault(other) is None


def test_a_trial_out_of_memory_is_retried_once_and_completes_when_memory_is_back(
    workdir, warm_env, command):
  """The first trial runs out of memory under the process's address-space limit; the limit is
  then raised from outside (as memory freed elsewhere would): the retry with the same
  parameters completes, and the study holds exactly its 2 finished trials.

  No race with the retry: once trial 0 is asked, the test holds the study's lock, which the
  retry must take to be asked, and raises the limit only when the log says trial 0 ran out of
  memory, or the process waits for that lock."""
  proc = run_out_of_memory(workdir, warm_env, command, "oom_transient")
  seen: list[str] = []
  reader = threading.Thread(target=lambda: seen.extend(proc.stderr), daemon=True)
  reader.start()
  deadline = time.monotonic() + TIMEOUT
  db = workdir / "oom_transient" / "study.db"
  while not _asked(db):
    assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
    time.sleep(0.05)
  lock = os.open(workdir / "oom_transient" / "study.db.orchard-lock", os.O_RDWR)
  try:
    fcntl.flock(lock, fcntl.LOCK_EX)  # once the process has let go of it after the ask
    while not (any(OOM_LINE in line for line in list(seen)) or _waits_for_lock(proc.pid, lock)):
      assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
      time.sleep(0.05)
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
  finally:
    os.close(lock)
  out = proc.stdout.read()
  proc.wait(timeout=TIMEOUT)
  reader.join(timeout=TIMEOUT)
  log = "".join(seen)
  assert proc.returncode == 0, log[-3000:]
  first, retry, other = trials_of(workdir, "oom_transient")
  assert first.state == TrialState.FAIL, log[-3000:]
  assert first.user_attrs[RESOURCE_FAULT].startswith("memory: JaxRuntimeError: ")
  assert "Out of memory allocating" in first.user_attrs[RESOURCE_FAULT]
  assert (retry.state, retry.user_attrs[RETRY_OF], retry.params) == (
      TrialState.COMPLETE, 0, first.params)
  assert other.state == TrialState.COMPLETE and other.params != first.params
  assert finished_count([first, retry, other]) == 2
  assert ("Trial 0 ran out of memory (JaxRuntimeError: INTERNAL: Error dispatching computation"
          in log and "it is retried once with its parameters" in log)
  assert "The study is short" not in out and "Nothing to run" not in out
  csv = (workdir / "oom_transient" / "trials.csv").read_text().splitlines()
  assert csv[1].startswith("0,FAIL,") and ",memory: JaxRuntimeError: " in csv[1]


@pytest.mark.parametrize("cohort_size", [1, 2])
def test_a_trial_out_of_memory_twice_with_its_parameters_fails_for_good(
    workdir, warm_env, command, cohort_size):
  """The limit stays: each trial's parameters run out of memory twice, and fail for good with
  a message that names memory; the study ends with its 2 finished trials, none completed.
  Trials trained in cohorts (whose shared epoch runs out of memory) likewise."""
  name = f"oom_permanent_{cohort_size}"
  proc = run_out_of_memory(workdir, warm_env, command, name, cohort_size=cohort_size)
  out, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 1, err[-3000:]  # no trial completed
  trials = trials_of(workdir, name)
  assert [t.state for t in trials] == [TrialState.FAIL] * 4, err[-3000:]
  firsts = [t for t in trials if RETRY_OF not in t.user_attrs]
  retries = {t.user_attrs[RETRY_OF]: t for t in trials if RETRY_OF in t.user_attrs}
  assert len(firsts) == len(retries) == 2 and set(retries) == {t.number for t in firsts}
  for first in firsts:
    retry = retries[first.number]
    assert first.user_attrs[RESOURCE_FAULT].startswith("memory: JaxRuntimeError: ")
    assert (retry.user_attrs[RETRY_OF], retry.params) == (first.number, first.params)
    assert RESOURCE_FAULT not in retry.user_attrs
    assert retry.user_attrs[ERROR].startswith(
        f"out of memory twice with these parameters (trial {first.number}, then trial "
        f"{retry.number}): JaxRuntimeError: ")
    assert retry.user_attrs[ERROR].endswith(
        " bytes; give the process more memory or shrink the model or the batch")
  assert firsts[0].params != firsts[1].params
  assert finished_count(trials) == 2
  assert "No trial completed" in out and "short of optuna.n_trials" not in out


def test_an_attempt_out_of_memory_is_found_through_every_kind_of_retry():
  """A second out-of-memory error is one with the same parameters, whatever retried them in
  between: a retry of an interrupted retry, a heartbeat retry."""
  from optuna.distributions import FloatDistribution
  from optuna.trial import create_trial
  from orchard_jax.records import INTERRUPTED
  from orchard_jax.study.budget import memory_faulted_before
  study = optuna.create_study()

  def add(state, system_attrs=None, **user_attrs):
    study.add_trial(create_trial(state=state, params={"x": 0.5},
                                 distributions={"x": FloatDistribution(0, 1)},
                                 user_attrs=user_attrs, system_attrs=system_attrs or {}))
  add(TrialState.FAIL, **{RESOURCE_FAULT: "memory: MemoryError"})     # 0
  add(TrialState.FAIL, **{RETRY_OF: 0, INTERRUPTED: True})             # 1
  add(TrialState.FAIL, {"failed_trial": 1, "retry_history": [1]})      # 2: lost, by heartbeat
  add(TrialState.RUNNING, **{RETRY_OF: 2})                             # 3
  add(TrialState.RUNNING)                                              # 4: new parameters
  add(TrialState.RUNNING, **{RETRY_OF: 1})                             # 5
  trials = study.get_trials()
  assert [memory_faulted_before(trials, t) for t in trials] == [None, 0, 0, 0, None, 0]
  assert finished_count(trials) == 0
