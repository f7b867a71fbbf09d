"""benchmarks/study_time.py: its smoke run (4 trials of 2 epochs, solo and a cohort, one round, no
warm-up) and its time-to-a-good-value rule. The smoke run's figures are not looked at; it takes
about 30 s on 2 cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import BENCHMARKS, load_benchmark


@pytest.fixture(scope="module")
def study_time():
  return load_benchmark("study_time")


def test_time_to_a_good_value_is_the_first_complete_trial_reaching_the_target(study_time):
  result = {"direction": "maximize", "completions": [(3.0, 0.90), (5.0, 0.97), (7.0, 0.99)]}
  assert study_time.seconds_to(result, 0.95) == 5.0
  assert study_time.seconds_to(result, 0.97) == 5.0
  assert study_time.seconds_to(result, 0.995) is None  # never
  assert study_time.seconds_to(result, None) is None


def test_time_to_a_good_value_of_a_minimized_metric_reaches_down(study_time):
  result = {"direction": "minimize", "completions": [(3.0, 0.5), (5.0, 0.2), (7.0, 0.1)]}
  assert study_time.seconds_to(result, 0.2) == 5.0
  assert study_time.seconds_to(result, 0.05) is None


def test_smoke_run_times_passes_counts_trials_and_skips_a_refused_pruner(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "STUDY_TIME_OUT"}
  proc = subprocess.run([sys.executable, str(BENCHMARKS / "study_time.py"), "--smoke",
                         "--pruners", "no_such_pruner", "--keep", str(tmp_path)],
                        cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True, timeout=240)
  out = proc.stdout
  assert proc.returncode == 0, out + proc.stderr
  assert re.search(r"^  cohort-no_such_pruner: skipped, the installed orchard_jax refuses it: "
                   r"orchard-jax: error: optuna\.pruner_type .*'no_such_pruner'", out, re.M), out
  # 4 trials x 2 epochs: solo runs a training and a validation pass per trial-epoch, the cohort
  # of 8 (4 trials) one of each per epoch for all its members
  for side, passes in (("solo", 16), ("cohort", 4)):
    line = re.search(rf"^  {side} +wall +([0-9.]+) s  passes +([0-9.]+) s \((\d+)\)  "
                     rf"host/trial-epoch +([0-9.]+) ms .* trial-epochs (\d+)  C/P/F (\d+)/0/0  "
                     rf"best ([0-9.]+)  to solo's best ([0-9.]+|never) s$", out, re.M)
    assert line, f"no round line for {side}:\n{out}"
    wall, pass_s = float(line[1]), float(line[2])
    assert (int(line[3]), int(line[5]), int(line[6])) == (passes, 8, 4)
    assert 0 < pass_s < wall
    assert float(line[4]) == pytest.approx((wall - pass_s) / 8 * 1e3, abs=15)  # printed rounded
  assert re.search(r"^  solo .* to solo's best [0-9.]+ s$", out, re.M)  # solo reaches its own
  assert len(re.findall(r"^  (PASS|FAIL)  ", out, re.M)) == 3, out
  assert (tmp_path / "round_1" / "solo.passes.json").is_file()
  assert not (tmp_path / "round_1" / "cohort-no_such_pruner").exists()
