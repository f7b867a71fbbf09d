"""benchmarks/epoch_vs_torch.py --augment: a tiny run prints its lines (figures not looked at).

The run compiles MiniCNN's step with and without augmentation; XLA's CPU
backend optimisations are switched off (``XLA_FLAGS``) to shorten that, as
in tests/test_benchmarks.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import BENCHMARKS

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_script(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()}
  return subprocess.run([sys.executable, str(BENCHMARKS / "epoch_vs_torch.py"), *args],
                        env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def tiny():
  return run_script("--augment", "--samples", "32", "--batch", "8", "--repeats", "2")


def test_tiny_augmented_run_names_the_reference_loader_settings(tiny):
  assert tiny.returncode == 0, tiny.stdout + tiny.stderr
  header = tiny.stdout.splitlines()[0]
  assert re.search(r"torchvision \S+, samples=32, repeats=2, torch DataLoader num_workers=\d+ "
                   r"persistent_workers=False drop_last=True$", header), header


def test_tiny_augmented_run_prints_each_ratio_with_one_pair_per_repeat(tiny):
  assert tiny.returncode == 0, tiny.stdout + tiny.stderr
  number = r"[0-9]+\.[0-9]{3}"
  for what, base in (("augmented epoch, \\[0, 1\\] inputs", "torch"),
                     ("augmented epoch, mean/std inputs", "torch"),
                     ("augmented \\[0, 1\\] / unaugmented", "unaug"),
                     ("augmented mean/std / unaugmented", "unaug")):
    pattern = (rf"^mini_cnn b8\s+{what}\s+orchard_jax\s+{number}s  {base}\s+{number}s  "
               rf"ratio {number}  pairs {number} {number}$")
    assert re.search(pattern, tiny.stdout, re.M), f"no line for {what}:\n{tiny.stdout}"
  assert "os.fork()" not in tiny.stderr, tiny.stderr


def test_augment_only_options_without_augment_stop_with_one_line():
  proc = run_script("--batch", "8")
  assert proc.returncode == 2
  assert "--batch and --workers apply only with --augment" in proc.stderr
