"""Out of memory, made for real: a memory cgroup's limit (the kernel's OOM killer) and an
address-space limit (``RLIMIT_AS``: allocations fail inside the process).

Each test runs the ``orchard-jax`` command on tiny.npz with an MLP large enough for the limit
to bite, then reads the Optuna storage itself.
"""

from __future__ import annotations

import pathlib
import subprocess

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from orchard_jax.hostmem import _is_glibc
from orchard_jax.study.storage import open_storage

TIMEOUT = 240


def memory_recipe(workdir: pathlib.Path, name: str, *, n_trials: int = 2,
                  hidden=(4096, 4096)) -> pathlib.Path:
  """``n_trials`` trials of 1 epoch of an MLP of ``hidden`` widths (two 4096-wide layers: 17 M
  parameters, 64 MiB each for weights, gradients, momentum and best state)."""
  data = {
      "dataset": {"source": "npz", "path": str(workdir / "tiny.npz")},
      "architecture": {"name": "mlp", "options": {"hidden": list(hidden)}},
      "training": {"seed": 0, "batch_size": 16, "epochs": 3, "use_amp": False,
                   "monitor_metric": "accuracy", "mixup_alpha": 0.0, "mixup_epochs": 0,
                   "scheduler_type": "none", "use_tqdm": False},
      "optuna": {"study_name": name, "n_trials": n_trials, "epochs": 1, "sampler_type": "random",
                 "enable_pruning": False, "pruner_type": "none", "enable_early_stopping": False,
                 "search_space_preset": "quick", "save_plots": False,
                 "search_space_overrides": {
                     "learning_rate": {"low": 0.05, "high": 0.5, "log": True},
                     "optimizer_type": None, "batch_size_low_res": None, "dropout": None,
                     "weight_decay": None, "momentum": None, "min_lr": None}},
      "telemetry": {"log_interval": 1, "output_dir": str(workdir / name)},
  }
  path = workdir / f"{name}.yaml"
  path.write_text(yaml.safe_dump(data))
  return path


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
  proc = subprocess.run([*command, "run", str(path)], env=env, cwd=workdir, capture_output=True,
                        text=True, timeout=TIMEOUT, preexec_fn=cgroup.join)
  assert cgroup.oom_kills() == 0 and proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
  assert [t.state for t in trials_of(workdir, "cgroup_fits")] == [TrialState.COMPLETE] * 2
  (line,) = [l for l in proc.stderr.splitlines() if "Host memory:" in l]
  assert f"the memory cgroup {cgroup.path} has a limit of 600 MiB" in line
  assert "the allocator gives freed memory back from now on" in line
