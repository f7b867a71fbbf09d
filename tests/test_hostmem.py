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
