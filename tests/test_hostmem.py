import json
import os
import subprocess
import sys

import pytest

from orchard_jax import hostmem

_CHILD = r"""
import json, resource, sys, tempfile
import orchard_jax
if sys.argv[1] == "call":
  orchard_jax.tune_host_memory()
elif sys.argv[1] == "console":
  from orchard_jax import cli
  assert cli.console(["init", tempfile.mktemp(suffix=".yaml")]) == 0
import jax, jax.numpy as jnp
# Run on this thread: its allocations come from glibc's main heap, whatever the scheduling.
jax.config.update("jax_cpu_enable_async_dispatch", False)
double = jax.jit(lambda x: x * 2.0)
x = jnp.ones((16 * 1024 * 1024,), jnp.float32)  # 64 MB: above glibc's largest mmap threshold
for _ in range(30):  # until the heap holds enough free blocks of this size
  jax.block_until_ready(double(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  jax.block_until_ready(double(x))  # each result is freed before the next call
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"tuned": orchard_jax.hostmem.malloc_tuned(), "faults": faults}))
"""

glibc_only = pytest.mark.skipif(not hostmem._is_glibc(), reason="the settings are glibc's")


def _huge_pages_always() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


def _faults_per_call(choice, how="call"):
  """Page faults per 64 MB result in a fresh process that imports orchard_jax, then
  (``how``) calls tune_host_memory, runs the command's console(), or nothing ("import")."""
  env = {**os.environ, hostmem.ENV_VAR: choice}
  out = subprocess.run([sys.executable, "-c", _CHILD, how], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@glibc_only
@pytest.mark.skipif(_huge_pages_always(), reason="2 MB pages: a fresh mapping costs 512x fewer faults")
@pytest.mark.parametrize("how", ["call", "console"])
def test_the_call_keeps_freed_buffers_so_large_results_are_not_faulted_in_again(how):
  tuned, system = _faults_per_call("tuned", how), _faults_per_call("system", how)
  assert tuned["tuned"] and not system["tuned"]
  pages = 64 * 1024 * 1024 // 4096
  assert system["faults"] > pages / 2  # a fresh mapping per 64 MB result
  assert tuned["faults"] < pages / 5  # at most one of ten results on fresh pages


@glibc_only
@pytest.mark.skipif(_huge_pages_always(), reason="2 MB pages: a fresh mapping costs 512x fewer faults")
def test_importing_the_library_leaves_the_allocator_alone():
  imported = _faults_per_call("tuned", "import")
  assert not imported["tuned"]
  assert imported["faults"] > 64 * 1024 * 1024 // 4096 / 2  # glibc's own: fresh pages each time


def test_an_unknown_allocator_choice_fails_the_command_in_one_line_not_the_import():
  env = {**os.environ, hostmem.ENV_VAR: "jemalloc"}
  code = "import orchard_jax; from orchard_jax import cli; raise SystemExit(cli.console(['--version']))"
  proc = subprocess.run([sys.executable, "-c", "import orchard_jax"], env=env, capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("orchard-jax: error: ORCHARD_JAX_MALLOC must be one of "
                                 "('tuned', 'system'), got ORCHARD_JAX_MALLOC='jemalloc'")


def test_malloc_choice_defaults_to_tuned_and_accepts_system():
  assert hostmem.malloc_choice({}) == "tuned"
  assert hostmem.malloc_choice({hostmem.ENV_VAR: ""}) == "tuned"
  assert hostmem.malloc_choice({hostmem.ENV_VAR: " System "}) == "system"


def test_malloc_choice_names_the_bad_value_and_the_allowed_ones():
  with pytest.raises(ValueError, match=r"ORCHARD_JAX_MALLOC must be one of \('tuned', 'system'\), "
                                       r"got ORCHARD_JAX_MALLOC='jemalloc'"):
    hostmem.malloc_choice({hostmem.ENV_VAR: "jemalloc"})


@pytest.mark.parametrize("threshold", [0, -1, 1 << 31])
def test_tune_malloc_rejects_a_trim_threshold_out_of_range(threshold):
  with pytest.raises(ValueError, match=f"trim_threshold must be in \\(0, 2\\*\\*31\\), got trim_threshold={threshold}"):
    hostmem.tune_malloc(threshold)


@glibc_only
def test_the_test_process_runs_with_the_tuned_allocator():
  assert hostmem.malloc_tuned() == (hostmem.malloc_choice() == "tuned")


def test_tune_malloc_changes_nothing_where_the_c_library_is_not_glibc(monkeypatch):
  monkeypatch.setattr(hostmem, "_is_glibc", lambda: False)
  assert hostmem.tune_malloc() is False


# ----------------------------------------------------------- memory limits --

_LIMITED = r"""
import json, sys, time
import numpy as np
from orchard_jax import hostmem
tuned = hostmem.tune_host_memory()
cgroup = hostmem.memory_cgroup()
report = {"tuned_at_start": tuned, "limit": cgroup and cgroup.limit,
          "version": cgroup and cgroup.version, "path": cgroup and str(cgroup.path)}
if sys.argv[1] == "anonymous":
  # 200 MiB freed in 5 MiB holes between live blocks: kept by the heap, resident, and too
  # small for the 40 MiB blocks that follow (glibc's own settings map and unmap such blocks).
  holes, keep = [], []
  for _ in range(40):
    holes.append(np.ones(5 * 2**20, np.uint8))
    keep.append(bytearray(4096))
  del holes
  live = []
  for _ in range(int(sys.argv[2]) // 40):
    live.append(np.ones(40 * 2**20, np.uint8))
    time.sleep(0.1)
elif sys.argv[1] == "cache":
  kept = np.ones(100 * 2**20, np.uint8); del kept  # free memory the heap keeps
  with open(sys.argv[2], "rb") as f:  # file pages fill the cgroup; the kernel reclaims them
    while f.read(2**20):
      pass
report.update(tuned=hostmem.malloc_tuned(), released=hostmem.malloc_released())
print(json.dumps(report))
"""


def _limited(cgroup, *args, env=None):
  env = {**os.environ, hostmem.ENV_VAR: "tuned", **(env or {})}
  return subprocess.run([sys.executable, "-c", _LIMITED, *map(str, args)], env=env,
                        preexec_fn=cgroup.join, capture_output=True, text=True, timeout=120)


@glibc_only
def test_memory_cgroup_reads_the_limit_of_the_process_own_cgroup(memory_cgroup):
  cgroup = memory_cgroup(300 * 2**20)
  proc = _limited(cgroup, "none")
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["limit"] == 300 * 2**20 and report["version"] == cgroup.version
  assert report["path"] == str(cgroup.path)
  assert report["tuned_at_start"] and report["tuned"] and report["released"] is None


@glibc_only
def test_freed_memory_the_cgroup_needs_is_given_back_instead_of_an_oom_kill(memory_cgroup):
  """200 MiB kept free by the heap plus 240 MiB allocated after it do not fit 360 MiB; 240 MiB
  alone does: the kept memory must go back before the cgroup reaches its limit."""
  cgroup = memory_cgroup(360 * 2**20)
  proc = _limited(cgroup, "anonymous", 240)
  assert cgroup.oom_kills() == 0 and proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["tuned_at_start"] and not report["tuned"]
  assert report["released"].startswith(f"the memory cgroup {cgroup.path} has a limit of 360 MiB, ")
  assert "of which this process's heaps keep" in report["released"]
  assert f"Host memory: {report['released']}; the allocator gives freed memory back" in proc.stderr


@glibc_only
def test_a_cgroup_full_of_file_pages_keeps_the_settings(memory_cgroup, tmp_path):
  """The limit is reached by reading a file larger than it: the kernel reclaims file pages,
  the heaps keep less than the limit leaves beyond the anonymous memory, so the settings (and
  their speed) stay."""
  data = tmp_path / "big.bin"
  with open(data, "wb") as f:
    for _ in range(600):
      f.write(os.urandom(2**20))
    f.flush()
    os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read into the cgroup's cache
  cgroup = memory_cgroup(400 * 2**20)
  proc = _limited(cgroup, "cache", data)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert cgroup.peak() > 0.95 * 400 * 2**20  # the cgroup was full
  assert report["tuned"] and report["released"] is None, report
