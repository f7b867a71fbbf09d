"""The orchard-jax command with and without ``gc.freeze``: collection time and interpreter exit.

Each round runs the bundled study twice in fresh processes, alternating the
order: once as the installed command runs it (``cli.main(...,
freeze_imports=True)`` then ``gc.freeze()``, what ``cli.console`` does) and
once with the collector left alone (``cli.main(...)``). The study uses a
compile cache that a first, untimed run fills, so rounds are short and equal.
Per process it prints the seconds Python's cycle collector ran during the
study (summed from ``gc.callbacks``), the seconds from ``main``'s return to
the end of the process (interpreter exit), and the wall time; then medians,
min-max and the frozen / unfrozen ratios.

  python benchmarks/gc_freeze.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

DRIVER = r"""
import gc, sys, time
spent, started = [0.0], [0.0]
def watch(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - started[0]
gc.callbacks.append(watch)
from orchard_jax import cli
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)
frozen = sys.argv[1] == "frozen"
status = cli.main(sys.argv[2:], freeze_imports=frozen)
gc.callbacks.remove(watch)
if frozen:
    gc.freeze()
print(f"GC {spent[0]:.4f} STATUS {status}", flush=True)
"""


def run(mode: str, output: str, cache: str) -> tuple[float, float, float]:
  """(collection seconds, exit seconds, wall seconds) of one process."""
  cmd = [sys.executable, "-c", DRIVER, mode, "run", "--output", output,
         "--set", f"telemetry.compilation_cache={cache}", "--set", "optuna.show_progress_bar=false"]
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  collected, returned = None, None
  for line in proc.stdout:
    if line.startswith("GC "):
      returned = time.perf_counter()
      collected = float(line.split()[1])
  if proc.wait() != 0 or collected is None:
    raise SystemExit(f"{mode} run failed with exit status {proc.returncode}")
  end = time.perf_counter()
  return collected, end - returned, end - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  results = {"frozen": [], "unfrozen": []}
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    run("unfrozen", os.path.join(tmp, "fill"), cache)  # fills the compile cache; not timed
    for r in range(args.rounds):
      order = ("frozen", "unfrozen") if r % 2 == 0 else ("unfrozen", "frozen")
      for mode in order:
        results[mode].append(run(mode, os.path.join(tmp, f"{mode}{r}"), cache))
        gc_s, exit_s, wall = results[mode][-1]
        print(f"round {r + 1} {mode:8s} collection {gc_s:.2f} s  exit {exit_s:.2f} s  "
              f"wall {wall:.1f} s", flush=True)
  print(f"over {args.rounds} round(s): median [min - max]")
  for i, what in enumerate(("collection", "exit", "wall")):
    row = {m: [r[i] for r in rs] for m, rs in results.items()}
    med = {m: statistics.median(v) for m, v in row.items()}
    print(f"  {what:10s} frozen {med['frozen']:.2f} [{min(row['frozen']):.2f}-"
          f"{max(row['frozen']):.2f}]  unfrozen {med['unfrozen']:.2f} "
          f"[{min(row['unfrozen']):.2f}-{max(row['unfrozen']):.2f}]  "
          f"frozen/unfrozen {med['frozen'] / med['unfrozen']:.2f}")


if __name__ == "__main__":
  main()
