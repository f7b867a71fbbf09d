"""benchmarks/gpu_epoch.py in its CPU smoke mode: it runs, reports what ran, survives failures.

The script is meant to be run once, unattended, on a GPU machine; these tests
run it in a subprocess on CPU (``--smoke``: batch 8, 16 samples, 1 repeat).
Its figures are not looked at, so XLA's CPU backend optimisations are switched
off (``XLA_FLAGS``), which halves compilation, most of the run: the MiniCNN run
takes about 20-35 s on 2 cores. ResNet-18 would add over a minute per
precision and is left out.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_epoch.py"
MODES = ("train-device", "train-loader", "eval-loader")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_script(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()}
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=240)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One smoke run of MiniCNN at float32 and bfloat16, with its JSON file."""
  path = tmp_path_factory.mktemp("gpu_epoch") / "out.json"
  proc = run_script("--smoke", "--models", "mini_cnn", "--json", str(path))
  return proc, path


def test_smoke_run_exits_zero_with_a_samples_per_s_line_per_precision_and_mode(smoke):
  proc, _ = smoke
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for precision in ("float32", "bfloat16"):
    for mode in MODES:
      pattern = rf"^mini_cnn\s+{precision}\s+{mode}\s+samples/s median\s+[0-9.]+ \(min [0-9.]+ max [0-9.]+"
      assert re.search(pattern, proc.stdout, re.M), f"no line for {precision} {mode}:\n{proc.stdout}"


def test_smoke_run_reports_the_policy_and_the_compute_dtype_that_ran(smoke):
  proc, _ = smoke
  assert ("[mini_cnn float32] policy params=float32,compute=float32,output=float32; "
          "ran: params float32, compute float32, output float32") in proc.stdout, proc.stdout
  assert ("[mini_cnn bfloat16] policy params=float32,compute=bfloat16,output=float32; "
          "ran: params float32, compute bfloat16, output float32") in proc.stdout, proc.stdout
  assert "WARNING" not in proc.stdout


def test_smoke_run_prints_a_markdown_table_row_per_result(smoke):
  proc, _ = smoke
  rows = re.findall(r"^\| mini_cnn \| (float32|bfloat16) \((\w+)\) \| ([\w-]+) \|", proc.stdout, re.M)
  assert sorted(rows) == sorted((p, p, m) for p in ("float32", "bfloat16") for m in MODES), proc.stdout


def test_smoke_run_writes_the_results_as_json(smoke):
  _, path = smoke
  data = json.loads(path.read_text())
  assert data["environment"]["backend"] == "cpu"
  assert (data["samples"], data["batch"], data["repeats"]) == (16, 8, 1)
  assert data["failures"] == [] and data["skipped"] == []
  got = sorted((r["precision"], r["ran"]["compute"], r["mode"]) for r in data["results"])
  assert got == sorted((p, p, m) for p in ("float32", "bfloat16") for m in MODES)
  assert all(r["samples_per_s_median"] > 0 and len(r["epoch_s"]) == 1 for r in data["results"])


def test_a_failing_case_is_reported_and_the_next_case_still_runs_with_exit_status_1():
  # vit_tiny cannot be built at 28 px (patch size 16): both of its cases fail.
  proc = run_script("--smoke", "--models", "vit_tiny", "--precisions", "float32", "bfloat16")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "[vit_tiny float32] FAILED: ValueError:" in proc.stdout
  assert "[vit_tiny bfloat16] FAILED: ValueError:" in proc.stdout
  assert "0 results, 2 failed cases" in proc.stdout


def test_a_spent_budget_skips_the_remaining_cases_without_failing():
  proc = run_script("--smoke", "--models", "mini_cnn", "--budget-s", "0")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "[mini_cnn float32] budget of 0s spent" in proc.stdout
  assert "[mini_cnn bfloat16] budget of 0s spent" in proc.stdout
  assert "0 results, 0 failed cases, 2 skipped" in proc.stdout


def test_gpu_cohort_quick_run_reports_per_member_samples_per_s_and_the_ratio_to_k1(tmp_path):
  """benchmarks/gpu_cohort.py --quick (K = 1, 2 MiniCNN cohorts, batch 32, 3 steps): about 10 s."""
  path = tmp_path / "cohort.json"
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()}
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_cohort.py"), "--quick",
                         "--json", str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for name in ("cohort K=1", "solo train_step", "cohort K=2"):
    pattern = (rf"^{name}\s+step\s+[0-9.]+ ms \| per member samples/s\s+[0-9.]+ "
               rf".*member-samples/s, [0-9.]+x K=1")
    assert re.search(pattern, proc.stdout, re.M), f"no line for {name}:\n{proc.stdout}"
  data = json.loads(path.read_text())
  assert data["environment"]["backend"] == "cpu" and data["failures"] == []
  got = {r["name"]: r for r in data["results"]}
  assert sorted(got) == ["cohort K=1", "cohort K=2", "solo train_step"]
  assert got["cohort K=1"]["ratio_to_k1"] == 1.0
  assert all(r["member_samples_per_s_median"] > 0 and r["finite"] for r in got.values())
  assert got["cohort K=2"]["final_loss_min"] != got["cohort K=2"]["final_loss_max"]  # own seeds, rates
