"""The fault matrix of docs/reliability.md, end to end: real processes, real signals, real disks.

Each test runs the ``orchard-jax`` command on a tiny study (an MLP on an
8x8 .npz, a float learning-rate range, so parameter sets never repeat by
chance), injects a real fault, and then checks the Optuna storage itself:
exactly ``n_trials`` finished trials, nothing RUNNING or WAITING, no
parameter set drawn twice, and every lost trial retried once with its
parameters. Each also checks the one-line message the user sees.
"""

from __future__ import annotations

import csv
import os
import pathlib
import signal
import sqlite3
import subprocess
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from orchard_jax.records import CHECKPOINT_ERROR, CONFIG, RETRY_OF, STORAGE_FAULT
from orchard_jax.study.liveness import RUN_LOCK
from orchard_jax.study.storage import open_storage
from orchard_jax.study.tables import retry_source
from orchard_jax.study.budget import finished_count

TIMEOUT = 240


def fault_recipe(workdir: pathlib.Path, name: str, *, output: pathlib.Path | None = None,
                 hidden=(16,), **optuna_keys) -> pathlib.Path:
  """n_trials 4 of 2 epochs, random sampler over a float learning rate, no pruning."""
  data = {
      "dataset": {"source": "npz", "path": str(workdir / "tiny.npz")},
      "architecture": {"name": "mlp", "options": {"hidden": list(hidden)}},
      "training": {"seed": 0, "batch_size": 16, "epochs": 3, "use_amp": False,
                   "monitor_metric": "accuracy", "mixup_alpha": 0.0, "mixup_epochs": 0,
                   "scheduler_type": "none", "use_tqdm": False},
      "optuna": {"study_name": name, "n_trials": 4, "epochs": 2, "sampler_type": "random",
                 "enable_pruning": False, "pruner_type": "none", "enable_early_stopping": False,
                 "search_space_preset": "quick", "save_plots": False,
                 "search_space_overrides": {
                     "learning_rate": {"low": 0.05, "high": 0.5, "log": True},
                     "optimizer_type": None, "batch_size_low_res": None, "dropout": None,
                     "weight_decay": None, "momentum": None, "min_lr": None},
                 **optuna_keys},
      "telemetry": {"log_interval": 1, "output_dir": str(output or workdir / name)},
  }
  path = workdir / f"{name}.yaml"
  path.write_text(yaml.safe_dump(data))
  return path


def start(command, args, env, cwd, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([*command, *map(str, args)], env=env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def wait_for(proc: subprocess.Popen, text: str, seen: list[str]) -> None:
  """Reads ``proc``'s stderr until a line contains ``text`` (kept in ``seen``)."""
  for line in proc.stderr:
    seen.append(line)
    if text in line:
      return
  raise AssertionError(f"{text!r} never showed; stderr: {''.join(seen)[-3000:]}")


def finish(proc: subprocess.Popen, seen: list[str]) -> subprocess.CompletedProcess:
  out, err = proc.communicate(timeout=TIMEOUT)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err)


def run(command, args, env, cwd, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([*command, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=TIMEOUT, **kwargs)


def load(url: str, name: str) -> list:
  storage = open_storage(url)
  return sorted(optuna.load_study(study_name=name, storage=storage).get_trials(),
                key=lambda t: t.number)


def check_exact(trials: list, n_trials: int) -> list:
  """The promise: exactly n finished, none running or waiting, no parameter set twice except a
  retry of a lost trial, which repeats its original once. Returns the retries."""
  assert finished_count(trials) == n_trials, [(t.number, t.state.name) for t in trials]
  assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
  by_number = {t.number: t for t in trials}
  retries = [t for t in trials if retry_source(t) is not None]  # retry_of or failed_trial
  for retry in retries:
    assert retry.params == by_number[retry_source(retry)].params
  assert len({retry_source(t) for t in retries}) == len(retries)  # each retried once
  originals = [t for t in trials if retry_source(t) is None]
  assert len({tuple(sorted(t.params.items())) for t in originals}) == len(originals)
  return retries


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:  # a zombie is dead too
    return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
  except OSError:
    return False


def workers_of(run_dir: pathlib.Path) -> list[int]:
  """Pids of the worker processes whose command line names ``run_dir``."""
  pids = []
  for entry in pathlib.Path("/proc").iterdir():
    if entry.name.isdigit():
      try:
        cmdline = (entry / "cmdline").read_bytes().split(b"\0")
      except OSError:
        continue
      if b"worker" in cmdline and str(run_dir.absolute()).encode() in cmdline:
        pids.append(int(entry.name))
  return pids


# ------------------------------------------------------ concurrency, liveness --


def test_a_second_run_on_a_busy_folder_refuses_naming_the_first(workdir, warm_env, command):
  path = fault_recipe(workdir, "busy", epochs=30)
  first, seen = start(command, ["run", path], warm_env, workdir), []
  wait_for(first, "T0 E1/30", seen)
  first.send_signal(signal.SIGSTOP)  # alive and mid-trial for as long as the second one takes
  try:
    second = run(command, ["run", path], warm_env, workdir)
  finally:
    first.send_signal(signal.SIGCONT)
  result = finish(first, seen)
  assert result.returncode == 0, result.stderr[-3000:]
  assert second.returncode == 2, second.stderr
  (line,) = [l for l in second.stderr.splitlines() if l.startswith("orchard-jax: error:")]
  assert f"is in use by another orchard-jax run (pid {first.pid} on" in line
  assert "orchard-jax worker" in line
  check_exact(load(f"sqlite:///{workdir / 'busy' / 'study.db'}", "busy"), 4)


def test_run_and_worker_on_one_study_share_the_budget_exactly(workdir, warm_env, command):
  path = fault_recipe(workdir, "shared", n_trials=6, epochs=8)
  url = f"sqlite:///{workdir / 'shared' / 'study.db'}"
  (workdir / "shared").mkdir()
  optuna.create_study(study_name="shared", storage=url, direction="maximize")
  joiner, joiner_seen = start(command, ["worker", path, "--storage", url, "--output",
                                        workdir / "joiner", "--no-outputs"], warm_env, workdir), []
  wait_for(joiner, "T0 E1/8", joiner_seen)
  joiner.send_signal(signal.SIGSTOP)  # mid-trial until the run has started one of its own
  try:
    owner, seen = start(command, ["run", path], warm_env, workdir), []
    wait_for(owner, "T1 E1/8", seen)
  finally:
    joiner.send_signal(signal.SIGCONT)
  done = finish(owner, seen)
  joined = finish(joiner, joiner_seen)
  assert done.returncode == 0, done.stderr[-3000:]
  assert joined.returncode == 0, joined.stderr[-3000:]
  trials = load(url, "shared")
  check_exact(trials, 6)
  assert len(trials) == 6 and len({t.user_attrs["worker_id"] for t in trials}) == 2


def test_kill_9_of_run_mid_trial_is_retried_by_the_rerun(workdir, warm_env, command):
  path = fault_recipe(workdir, "killed", epochs=30)
  proc, seen = start(command, ["run", path], warm_env, workdir), []
  wait_for(proc, "T1 E1/30", seen)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  url = f"sqlite:///{workdir / 'killed' / 'study.db'}"
  assert [t.state for t in load(url, "killed")] == [TrialState.COMPLETE, TrialState.RUNNING]
  rerun = run(command, ["run", path], warm_env, workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert ("Trial 1 was left RUNNING by run, which is no longer running: marked FAIL; its "
          "parameters are retried") in rerun.stderr
  trials = load(url, "killed")
  (retry,) = check_exact(trials, 4)
  assert retry.user_attrs[RETRY_OF] == 1 and trials[1].state == TrialState.FAIL
  rows = {r["number"]: r for r in csv.DictReader(open(workdir / "killed" / "trials.csv"))}
  assert rows[str(retry.number)]["retry_of"] == "1"
  assert rows["1"]["error"] == "lost: its process (run) died"


@pytest.mark.parametrize("victims", ["launcher", "everything"])
def test_a_killed_launch_leaves_no_orphans_and_the_rerun_completes(workdir, warm_env, command,
                                                                   victims):
  name = f"group_{victims}"
  path = fault_recipe(workdir, name, n_trials=5, epochs=30)
  run_dir = workdir / name
  env = {**warm_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  launcher, seen = start(command, ["run", path, "--workers", "2"], env, workdir), []
  wait_for(launcher, "E1/30", seen)
  workers = workers_of(run_dir)
  assert len(workers) == 2
  for pid in [launcher.pid] + (workers if victims == "everything" else []):
    os.kill(pid, signal.SIGKILL)
  launcher.wait()
  deadline = time.monotonic() + 60
  while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not [pid for pid in workers if alive(pid)], "workers outlived their launcher"
  url = f"journal://{run_dir / 'study.journal'}"
  lost = [t.number for t in load(url, name) if t.state == TrialState.RUNNING]
  rerun = run(command, ["run", path, "--workers", "2"], env, workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "exited with status 0" not in rerun.stderr
  trials = load(url, name)
  retries = check_exact(trials, 5)
  # A trial a dying worker stored as interrupted, or one left RUNNING, is retried once.
  unfinished = [t.number for t in trials if t.state == TrialState.FAIL]
  assert sorted(r.user_attrs[RETRY_OF] for r in retries) == unfinished and set(lost) <= set(
      unfinished)
  assert (run_dir / "trials.csv").is_file() and (run_dir / "best_config.yaml").is_file()


def test_a_sqlite_lock_held_by_another_process_is_waited_for(workdir, warm_env, command):
  path = fault_recipe(workdir, "locked", epochs=6)
  db = workdir / "locked" / "study.db"
  proc, seen = start(command, ["run", path], warm_env, workdir), []
  wait_for(proc, "Trial 0 COMPLETE", seen)
  holder = sqlite3.connect(db, timeout=60, isolation_level=None)
  holder.execute("BEGIN EXCLUSIVE")
  time.sleep(15)
  holder.execute("COMMIT")
  holder.close()
  result = finish(proc, seen)
  assert result.returncode == 0, result.stderr[-3000:]
  trials = load(f"sqlite:///{db}", "locked")
  check_exact(trials, 4)
  assert [t.state for t in trials] == [TrialState.COMPLETE] * 4


# ------------------------------------------------------------- disk and storage --


def test_a_disk_too_small_for_checkpoints_keeps_every_trained_value(workdir, warm_env, command,
                                                                   tmpfs):
  run_dir = tmpfs("3m") / "small"
  path = fault_recipe(workdir, "small", output=run_dir, hidden=(1024, 1024))
  # The search's faults; the final phases (whose training run cannot write its state either)
  # are off here: a failing phase is tests/study/test_phases.py's.
  result = run(command, ["run", path, "--final", "off"], warm_env, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  trials = load(f"sqlite:///{run_dir / 'study.db'}", "small")
  check_exact(trials, 4)
  assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
  assert all("No space left on device" in t.user_attrs[CHECKPOINT_ERROR] for t in trials)
  assert "the trial keeps its value" in result.stderr
  leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name or "tmp-" in p.name]
  assert not leftovers and not (run_dir / "best_model").exists()
  assert not any((run_dir / "trials").glob("trial_*/checkpoint")) if (
      run_dir / "trials").exists() else True


def test_a_checkpoint_that_cannot_be_written_is_one_line_its_traceback_only_with_debug(
    workdir, warm_env, command, tmpfs):
  folder = tmpfs("3m")
  path = fault_recipe(workdir, "quiet", output=folder / "quiet", hidden=(1024, 1024), n_trials=2)
  result = run(command, ["run", path, "--final", "off"], warm_env, workdir)  # the search's lines
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  warnings = [l for l in lines if "could not be written" in l]
  assert len(warnings) == 2 and all(w.endswith("No space left on device; the trial keeps its "
                                               "value") for w in warnings), warnings
  assert "Traceback" not in result.stderr and "absl" not in result.stderr, result.stderr[-3000:]
  assert len(lines) <= 12, result.stderr  # the study's own lines, one per epoch and trial

  debug = run(command, ["run", path, "--debug", "--final", "off", "--output", folder / "debug",
                        "--set", "optuna.n_trials=1"], warm_env, workdir)
  assert debug.returncode == 0, debug.stderr[-3000:]
  assert debug.stderr.count("Traceback (most recent call last)") >= 1
  assert "could not be written" in debug.stderr and "absl" not in debug.stderr


def test_a_full_disk_under_the_database_is_waited_out(workdir, warm_env, command, tmpfs,
                                                      disk_filler):
  run_dir = tmpfs("8m") / "full"
  path = fault_recipe(workdir, "full", output=run_dir, epochs=4)
  proc, seen = start(command, ["run", path], warm_env, workdir), []
  wait_for(proc, "Trial 0 COMPLETE", seen)
  filler = disk_filler(run_dir.parent)
  wait_for(proc, "The study's storage failed while storing", seen)
  assert "database or disk is full" in seen[-1]
  filler.unlink()
  result = finish(proc, seen)
  assert result.returncode == 0, result.stderr[-3000:]
  check_exact(load(f"sqlite:///{run_dir / 'study.db'}", "full"), 4)


def test_a_storage_that_stays_full_stops_in_one_line_and_the_rerun_retries(workdir, warm_env,
                                                                           command, tmpfs,
                                                                           disk_filler):
  run_dir = tmpfs("8m") / "stays_full"
  path = fault_recipe(workdir, "stays_full", output=run_dir, epochs=30)
  env = {**warm_env, "ORCHARD_JAX_STORE_PATIENCE_S": "3"}
  proc, seen = start(command, ["run", path], env, workdir), []
  wait_for(proc, "T1 E2/30", seen)  # the disk fills while trial 1 trains
  filler = disk_filler(run_dir.parent)
  result = finish(proc, seen)
  filler.unlink()
  assert result.returncode == 1, result.stderr[-3000:]
  (line,) = [l for l in result.stderr.splitlines() if l.startswith("orchard-jax: error:")]
  assert "database or disk is full" in line and "retried by the next run" in line
  assert "Should not reach" not in result.stderr and "StorageInternalError" not in line
  rerun = run(command, ["run", path], env, workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  trials = load(f"sqlite:///{run_dir / 'study.db'}", "stays_full")
  (retry,) = check_exact(trials, 4)
  assert retry.user_attrs[RETRY_OF] == 1 and trials[1].state == TrialState.FAIL


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_a_storage_on_a_full_disk_at_start_exits_1_in_one_line(workdir, warm_env, command, tmpfs,
                                                               disk_filler, storage):
  folder = tmpfs("512k")
  url = (f"journal:///{folder}/study.journal" if storage == "journal"
         else f"sqlite:///{folder}/study.db")
  path = fault_recipe(workdir, f"full_{storage}", n_trials=2, storage=url)
  filler = disk_filler(folder)
  result = run(command, ["run", path], warm_env, workdir)
  assert result.returncode == 1, result.stderr[-3000:]  # a storage failure, not a bad recipe (2)
  (line,) = [l for l in result.stderr.splitlines() if "error" in l.lower()]
  assert line.startswith(f"orchard-jax: error: optuna.storage: the study's storage {url} could "
                         f"not be written: ") and "retried by the next run" in line
  assert ("No space left on device" if storage == "journal" else "database or disk is full") in line
  assert "Traceback" not in result.stderr
  filler.unlink()
  rerun = run(command, ["run", path], warm_env, workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  check_exact(load(url, f"full_{storage}"), 2)


def test_a_torn_journal_tail_is_repaired_and_the_study_continues(workdir, warm_env, command):
  journal = workdir / "torn" / "study.journal"
  path = fault_recipe(workdir, "torn", n_trials=2, storage=f"journal:///{journal}")
  first = run(command, ["run", path], warm_env, workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  data = journal.read_bytes()
  journal.write_bytes(data + data.splitlines(keepends=True)[-1][:25])  # half a record
  rerun = run(command, ["run", path, "--set", "optuna.n_trials=3"], warm_env, workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "torn" in rerun.stderr.lower()
  check_exact(load(f"journal:///{journal}", "torn"), 3)


# ------------------------------------------------------------------------ records --


def test_a_run_that_trains_nothing_rewrites_no_record(workdir, warm_env, command):
  path = fault_recipe(workdir, "records", n_trials=2)
  first = run(command, ["run", path], warm_env, workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  run_dir = workdir / "records"
  before = {name: (run_dir / name).read_text() for name in ("recipe.yaml", "best_config.yaml")}
  again = run(command, ["run", path, "--set", "optuna.n_trials=1", "--set",
                        "training.batch_size=32"], warm_env, workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Nothing to run" in again.stderr
  after = {name: (run_dir / name).read_text() for name in before}
  assert after == before
  assert yaml.safe_load(after["best_config.yaml"])["training"]["batch_size"] == 16
  trials = load(f"sqlite:///{run_dir / 'study.db'}", "records")
  assert all(t.user_attrs[CONFIG]["training"]["batch_size"] == 16 for t in trials)
  assert not (run_dir / RUN_LOCK).read_text()  # released: no owner named


def test_trials_csv_shows_heartbeat_retries_too(tmp_path):
  from optuna.distributions import FloatDistribution
  from optuna.trial import create_trial
  from orchard_jax.study.tables import write_trials_csv
  study = optuna.create_study()
  dist = {"x": FloatDistribution(0, 1)}
  study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=dist))
  study.add_trial(create_trial(state=TrialState.COMPLETE, value=1.0, params={"x": 0.5},
                               distributions=dist, system_attrs={"failed_trial": 0,
                                                                 "retry_history": [0]}))
  study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.2}, distributions=dist,
                               user_attrs={STORAGE_FAULT: "database or disk is full"}))
  rows = list(csv.DictReader(open(write_trials_csv(study.trials, tmp_path / "t.csv"))))
  assert [r["retry_of"] for r in rows] == ["", "0", ""]
  assert rows[2]["error"] == "storage: database or disk is full"



def test_run_and_workers_on_one_postgresql_study_share_the_budget_exactly(postgres, workdir,
                                                                          warm_env, command):
  """Real PostgreSQL: ``run`` (the recipe's URL) and two ``worker`` processes at once; one
  worker is SIGKILLed mid-trial, and its trial is retried by heartbeat."""
  url = postgres.create_database()
  path = fault_recipe(workdir, "pg_mix", n_trials=6, epochs=12, storage=url)
  heartbeat = ["--heartbeat", "1", "--grace", "3"]
  owner, seen = start(command, ["run", path], warm_env, workdir), []
  killed, killed_seen = start(command, ["worker", path, "--name", "doomed", "--no-outputs",
                                        *heartbeat], warm_env, workdir), []
  helper = start(command, ["worker", path, "--name", "helper", "--no-outputs", *heartbeat],
                 warm_env, workdir)
  wait_for(killed, "] T", killed_seen)  # its first trial trains
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  done, helped = finish(owner, seen), finish(helper, [])
  assert done.returncode == 0, done.stderr[-3000:]
  assert helped.returncode == 0, helped.stderr[-3000:]
  trials = load(url, "pg_mix")
  retries = check_exact(trials, 6)
  lost = {t.number for t in trials if t.user_attrs.get("worker") == "doomed"
          and t.state == TrialState.FAIL}
  assert lost and lost <= {retry_source(r) for r in retries}
  assert "stopped beating" in done.stderr + helped.stderr


def test_n_jobs_threads_share_the_budget_exactly(workdir, warm_env, command):
  path = fault_recipe(workdir, "threads", n_trials=5, epochs=3, n_jobs=2)
  result = run(command, ["run", path], warm_env, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  trials = load(f"sqlite:///{workdir / 'threads' / 'study.db'}", "threads")
  check_exact(trials, 5)
  assert len(trials) == 5 and len({t.user_attrs["worker_id"] for t in trials}) == 2
  memory = fault_recipe(workdir, "threads_memory", n_trials=5, epochs=3, n_jobs=2,
                        storage="memory")
  result = run(command, ["run", memory], warm_env, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(csv.DictReader(open(workdir / "threads_memory" / "trials.csv")))
  assert [r["state"] for r in rows] == ["COMPLETE"] * 5
