"""benchmarks/study_imports.py in its smoke mode: two sides, one round, every figure printed."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_run_prints_each_sides_figures_and_the_wall_ratio():
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study_imports.py"),
                         "--side", f"a={ROOT}", "--side", f"b={ROOT}", "--smoke", "--importtime"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  number = r"(\d+\.\d+)"
  for side in ("a", "b"):
    assert any(re.fullmatch(rf"round 1 {side}: wall {number}  cpu {number}  first {number}  "
                            rf"last {number}  imports {number}", line) for line in lines), lines
  summary = [re.fullmatch(rf"b: wall {number} s  cpu {number} s  first {number} s  "
                          rf"last {number} s  imports {number} s  wall ratio to a {number}", line)
             for line in lines]
  match = next(m for m in summary if m)
  assert float(match[5]) > 0.5  # jax alone takes about a second to import
