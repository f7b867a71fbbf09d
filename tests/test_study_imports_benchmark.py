"""benchmarks/study_imports.py in its smoke mode: two sides, one round, every figure printed."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUMBER = r"(\d+\.\d+)"


def test_smoke_run_prints_each_sides_figures_and_the_wall_ratio():
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study_imports.py"),
                         "--side", f"a={ROOT}", "--side", f"b={ROOT}", "--smoke", "--importtime"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  for side in ("a", "b"):
    row = (rf"round 1 {side}: wall {NUMBER}  cpu {NUMBER}  first {NUMBER}  last {NUMBER}  "
           rf"pruned 0  imports {NUMBER}")  # --smoke turns pruning off
    assert any(re.fullmatch(row, line) for line in lines), lines
  summary = (rf"b: wall {NUMBER} s  cpu {NUMBER} s  first {NUMBER} s  last {NUMBER} s  "
             rf"pruned {NUMBER}  imports {NUMBER} s  wall ratio to a {NUMBER}")
  match = next(m for m in map(lambda line: re.fullmatch(summary, line), lines) if m)
  assert float(match[6]) > 0.5  # jax alone takes about a second to import
