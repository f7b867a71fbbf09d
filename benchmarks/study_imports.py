"""A small study from the command line, checkouts side by side: wall, imports, and the seconds
before the first trial and after the last one.

The study is ``orchard-jax run`` with ``architecture.name=mlp`` and 32 trials of
10 epochs in cohorts of 8, no early stopping (about 20 s on 2 CPU cores), with
a warm compilation cache of its own (each side runs once first to fill it).
Each round runs every side once, in turn, in a fresh process and output
folder, the order rotating between rounds; the figures are medians:

* ``wall``: the whole command; ``cpu``: its user and system seconds (steadier
  than ``wall`` on a machine others load);
* ``first``: from the start to the first ``Trial ... COMPLETE`` line (the
  first cohort's trials end together);
* ``last``: from the last such line to the exit (the outputs, then the
  interpreter's exit);
* ``pruned``: how many trials were pruned (sides that prune differently
  train different amounts);
* ``imports`` (``--importtime``, one more run per side and round): the seconds
  of ``-X importtime``'s outermost imports (in any thread).

Each side imports ``orchard_jax`` from its own folder (``PYTHONPATH``)::

  git worktree add /tmp/old <commit before the change>
  python benchmarks/study_imports.py --side old=/tmp/old --side new=. [--rounds 3] [--importtime]
  python benchmarks/study_imports.py --side a=. --side b=. --smoke --importtime  # runs?
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from study_vs_torch import study_only  # noqa: E402  pylint: disable=wrong-import-position

CLI = ("import sys, orchard_jax; print('MODULE', orchard_jax.__file__, file=sys.stderr); "
       "from orchard_jax.cli import console; sys.exit(console(sys.argv[1:]))")
SETS = ("architecture.name=mlp", "optuna.n_trials=32", "optuna.epochs=10",
        "optuna.enable_early_stopping=false", "optuna.cohort_size=8")
SMOKE = ("optuna.n_trials=2", "optuna.epochs=2", "optuna.enable_pruning=false")
_TRIAL = re.compile(r"^Trial \d+ (COMPLETE|PRUNED)")
_IMPORT = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| (\S.*)$")


def run_once(checkout: pathlib.Path, work: pathlib.Path, cache: pathlib.Path,
             importtime: bool = False, sets: tuple[str, ...] = SETS) -> dict[str, float]:
  """One study from ``checkout``: wall, first and last seconds (and imports with importtime)."""
  env = {**os.environ, "PYTHONPATH": str(checkout), "JAX_PLATFORMS": "cpu",
         "PYTHONUNBUFFERED": "1"}
  out = pathlib.Path(tempfile.mkdtemp(dir=work))
  cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", CLI, "run",
         *study_only(checkout), "--output", str(out / "run"),
         "--set", f"telemetry.compilation_cache={cache}"]
  for assignment in sets:
    cmd += ["--set", assignment]
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, cwd=out, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  trials, pruned, imports, module = [], 0, 0.0, None
  for line in proc.stderr:
    if m := _TRIAL.match(line):
      trials.append(time.perf_counter() - start)
      pruned += m[1] == "PRUNED"
    elif (m := _IMPORT.match(line)) and not m[2].startswith(" "):
      imports += int(m[1]) / 1e6
    elif line.startswith("MODULE "):
      module = pathlib.Path(line.split()[1]).resolve()
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0 or not trials:
    raise SystemExit(f"the study of {checkout} failed with exit status {proc.returncode}")
  if module is None or not module.is_relative_to(checkout.resolve()):
    raise SystemExit(f"{checkout}'s study imported orchard_jax from {module}")
  result = {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "first": trials[0],
            "last": wall - trials[-1], "pruned": pruned}
  return {**result, "imports": imports} if importtime else result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--side", action="append", required=True,
                      help="NAME=CHECKOUT, twice or more")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--importtime", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="2 trials of 2 epochs, 1 round, no warm-up (a check that it runs)")
  args = parser.parse_args()
  sets, rounds = (SETS + SMOKE, 1) if args.smoke else (SETS, args.rounds)
  sides = [(name, pathlib.Path(path).resolve())
           for name, _, path in (s.partition("=") for s in args.side)]
  work = pathlib.Path(tempfile.mkdtemp(prefix="study_imports_"))
  caches = {name: work / f"cache_{name}" for name, _ in sides}
  for name, checkout in sides if not args.smoke else ():  # fills each side's cache
    run_once(checkout, work, caches[name], sets=sets)
  figures: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
  for r in range(rounds):
    order = sides[r % len(sides):] + sides[:r % len(sides)]
    for name, checkout in order:
      figure = run_once(checkout, work, caches[name], sets=sets)
      if args.importtime:
        figure["imports"] = run_once(checkout, work, caches[name], True, sets)["imports"]
      figures[name].append(figure)
      print(f"round {r + 1} {name}: " + "  ".join(f"{k} {v:.2f}" if k != "pruned" else f"{k} {v}"
                                                  for k, v in figure.items()),
            flush=True)
  first = sides[0][0]
  for name, _ in sides:
    medians = {k: statistics.median(f[k] for f in figures[name]) for k in figures[name][0]}
    ratio = statistics.median(a["wall"] / b["wall"] for a, b in zip(figures[name], figures[first]))
    print(f"{name}: " + "  ".join(f"{k} {v:.2f}" + ("" if k == "pruned" else " s")
                                  for k, v in medians.items())
          + f"  wall ratio to {first} {ratio:.3f}")


if __name__ == "__main__":
  main()
