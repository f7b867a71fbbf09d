"""``optuna.cohort_size`` through the ``orchard-jax`` command: real processes, the Optuna storage
counted by state.

A cohort's trials must keep every promise of the trusted-trials matrix
(tests/study/test_faults.py): exactly ``n_trials`` finished, nothing left
RUNNING, a retried trial once with its parameters, and each trial's records
as a solo trial's.
"""

from __future__ import annotations

import csv
import re
import signal

from optuna.trial import TrialState

from orchard_jax.records import COHORT, CONFIG, EPOCHS_RUN, RETRY_OF, SECONDS

from tests.study.test_faults import check_exact, fault_recipe, finish, load, run, start, wait_for


def test_a_study_in_cohorts_stores_every_trial_as_a_solo_trial_does(workdir, warm_env, command):
  path = fault_recipe(workdir, "cohort4", n_trials=6, epochs=3, cohort_size=4)
  result = run(command, ["run", path], warm_env, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Cohort of 4: trials 0, 1, 2, 3" in result.stderr
  trials = load(f"sqlite:///{workdir / 'cohort4' / 'study.db'}", "cohort4")
  check_exact(trials, 6)
  assert all(t.state == TrialState.COMPLETE for t in trials)
  for t in trials:
    assert t.user_attrs[COHORT]["size"] == 4
    assert t.user_attrs[EPOCHS_RUN] == 3 and sorted(t.intermediate_values) == [1, 2, 3]
    assert t.user_attrs[SECONDS] > 0 and CONFIG in t.user_attrs
    assert len([k for k in t.user_attrs if re.fullmatch(r"epoch_\d+", k)]) == 3
  # trials 4 and 5 took the slots of finished trials in a second cohort (the budget left two)
  assert sorted(t.user_attrs[COHORT]["slot"] for t in trials[4:]) == [0, 1]
  rows = list(csv.DictReader(open(workdir / "cohort4" / "trials.csv")))
  assert [r["state"] for r in rows] == ["COMPLETE"] * 6
  assert (workdir / "cohort4" / "best_config.yaml").is_file()


def test_cohort_size_one_stores_the_same_values_as_no_cohort_at_all(workdir, warm_env, command):
  values = {}
  for name, keys in (("plain", {}), ("cohort1", {"cohort_size": 1})):
    path = fault_recipe(workdir, name, n_trials=2, epochs=2, **keys)
    result = run(command, ["run", path], warm_env, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(f"sqlite:///{workdir / name / 'study.db'}", name)
    values[name] = [(t.params, t.value, t.intermediate_values) for t in trials]
    assert not any(COHORT in t.user_attrs for t in trials)
  assert values["plain"] == values["cohort1"]


def test_two_workers_in_cohorts_share_the_budget_exactly(workdir, warm_env, command):
  path = fault_recipe(workdir, "cohort_workers", n_trials=7, epochs=3, cohort_size=2)
  env = {**warm_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  result = run(command, ["run", path, "--workers", "2"], env, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  trials = load(f"journal://{workdir / 'cohort_workers' / 'study.journal'}", "cohort_workers")
  check_exact(trials, 7)
  assert len(trials) == 7 and all(t.state == TrialState.COMPLETE for t in trials)
  assert len({t.user_attrs["worker"] for t in trials}) == 2


def test_sigterm_stops_a_cohort_its_trials_are_retried_and_the_rerun_completes(workdir, warm_env,
                                                                              command):
  path = fault_recipe(workdir, "cohort_term", n_trials=4, epochs=30, cohort_size=2)
  proc, seen = start(command, ["run", path], warm_env, workdir), []
  wait_for(proc, "T1 E2/30", seen)
  proc.send_signal(signal.SIGTERM)
  stopped = finish(proc, seen)
  assert stopped.returncode == 143, stopped.stderr[-3000:]
  url = f"sqlite:///{workdir / 'cohort_term' / 'study.db'}"
  interrupted = [t for t in load(url, "cohort_term") if t.state == TrialState.FAIL]
  assert sorted(t.number for t in interrupted) == [0, 1]
  assert all(t.user_attrs.get("interrupted") for t in interrupted)
  assert "cohort_size: 2" in (workdir / "cohort_term" / "recipe.yaml").read_text()
  # the rerun trains one at a time: how trials train together changes nothing they search
  rerun = run(command, ["run", path, "--set", "optuna.cohort_size=1"], warm_env, workdir)
  assert "The recipe differs" not in rerun.stderr
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  trials = load(url, "cohort_term")
  retries = check_exact(trials, 4)
  assert sorted(r.user_attrs[RETRY_OF] for r in retries) == [0, 1]


def test_a_killed_cohort_is_retried_whole_and_the_rerun_completes(workdir, warm_env, command):
  path = fault_recipe(workdir, "cohort_kill", n_trials=4, epochs=30, cohort_size=2)
  proc, seen = start(command, ["run", path], warm_env, workdir), []
  wait_for(proc, "T1 E2/30", seen)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  url = f"sqlite:///{workdir / 'cohort_kill' / 'study.db'}"
  assert sorted(t.number for t in load(url, "cohort_kill")
                if t.state == TrialState.RUNNING) == [0, 1]
  rerun = run(command, ["run", path], warm_env, workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  trials = load(url, "cohort_kill")
  retries = check_exact(trials, 4)
  assert sorted(r.user_attrs[RETRY_OF] for r in retries) == [0, 1]
  rows = {r["number"]: r for r in csv.DictReader(open(workdir / "cohort_kill" / "trials.csv"))}
  assert [rows[n]["error"] for n in ("0", "1")] == ["lost: its process (run) died"] * 2


def test_run_and_a_worker_in_cohorts_on_postgresql_share_the_budget_exactly(postgres, workdir,
                                                                            warm_env, command):
  url = postgres.create_database()
  path = fault_recipe(workdir, "pg_cohorts", n_trials=6, epochs=6, storage=url, cohort_size=2)
  owner, seen = start(command, ["run", path], warm_env, workdir), []
  helper = start(command, ["worker", path, "--name", "helper", "--no-outputs"], warm_env,
                 workdir)
  done, helped = finish(owner, seen), finish(helper, [])
  assert done.returncode == 0, done.stderr[-3000:]
  assert helped.returncode == 0, helped.stderr[-3000:]
  trials = load(url, "pg_cohorts")
  check_exact(trials, 6)
  assert all(t.state == TrialState.COMPLETE for t in trials)
  assert all(t.user_attrs[COHORT]["size"] == 2 for t in trials)
