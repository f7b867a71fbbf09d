"""benchmarks/sqlite_wal.py runs: both journal modes, one line per storage call with its ratio."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_small_run_times_every_call_in_both_modes(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sqlite_wal.py"), "--trials",
                         "2", "--epochs", "2", "--rounds", "1", "--dir", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = re.findall(r"^  (\w+) +([0-9.]+) +([0-9.]+) +([0-9.]+)$", proc.stdout, re.M)
  assert [r[0] for r in rows] == ["ask", "report", "should_prune", "set_user_attr", "tell"]
  for _, journal, wal, ratio in rows:
    assert float(journal) > 0 and float(wal) > 0
    assert abs(float(ratio) - float(wal) / float(journal)) < 0.01 + 0.01 * float(ratio)
  assert list(tmp_path.iterdir()) == []  # each round's file in its own temporary folder, removed
