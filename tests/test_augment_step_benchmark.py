"""benchmarks/augment_step.py runs and prints its three ratios (a tiny run; figures not read)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_a_tiny_run_prints_the_step_ratios():
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()}
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "augment_step.py"), "--batch", "4",
                         "--rounds", "1", "--steps", "1"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "MiniCNN, batch 4 of 28x28x1" in proc.stdout, proc.stdout
  ratio = r"(\d+\.\d{3}) \((\d+\.\d\d)-(\d+\.\d\d)\)"
  assert re.search(rf"step \+ augment / step {ratio}; step \+ augment \(mean/std\) / step {ratio}; "
                   rf"augment alone / step {ratio}", proc.stdout), proc.stdout
