"""benchmarks/sqlite_wal.py runs: three storages, one line per storage call with its ratios."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_small_run_times_every_call_on_each_storage(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sqlite_wal.py"), "--trials",
                         "2", "--epochs", "2", "--rounds", "1", "--dir", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = re.findall(r"^  (\w+) +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+)$",
                    proc.stdout, re.M)
  assert [r[0] for r in rows] == ["ask", "report", "should_prune", "set_user_attr", "tell"]
  for _, rollback, wal, journal, wal_ratio, journal_ratio in rows:
    rollback, wal, journal = float(rollback), float(wal), float(journal)
    assert rollback > 0 and wal > 0 and journal > 0
    assert abs(float(wal_ratio) - wal / rollback) < 0.01 + 0.01 * float(wal_ratio)
    assert abs(float(journal_ratio) - journal / rollback) < 0.01 + 0.01 * float(journal_ratio)
  assert list(tmp_path.iterdir()) == []  # each round's file in its own temporary folder, removed
