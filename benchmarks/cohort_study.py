"""Whole study in cohorts vs one trial at a time: ``orchard-jax run`` (the bundled recipe) twice.

For each architecture (``mlp`` and ``mini_cnn``, ``--only`` picks) a round
runs the bundled digits study twice, each in a fresh process timed around
``subprocess.run`` (interpreter start-up, imports, the study's outputs and
plots count on both sides):

* **solo**   -- ``orchard-jax run --set optuna.cohort_size=1`` (``run_trial``
  one trial at a time);
* **cohort** -- the same with ``--set optuna.cohort_size=4``.

Both sides use the recipe's sampler seed (``training.seed``), so they ask
the same first trials, and both are cold: each run gets its own empty JAX
persistent compilation cache (``--set telemetry.compilation_cache=<empty
dir>``) and its own run folder. The order of the two sides alternates
between rounds. Printed per architecture: each side's wall seconds (median
over ``--repeats`` rounds) split into the seconds before the first trial
starts (start-up, imports, study set-up), between it and the last trial's
end (from trials.csv: the part the cohorts can speed up) and after it
(outputs: trials.csv, plots, best model), the ratio cohort/solo of
both, each side's best validation accuracy and finished trials
(complete/pruned/failed, from trials.csv), epochs trained, how many cohorts
formed and of which sizes (the log's ``Cohort of N: trials ...`` lines) and,
from ``JAX_LOG_COMPILES``, how many programs JAX traced and lowered and the
seconds XLA spent compiling them (summed over threads). Then
the targets: mlp cohort/solo wall <= 0.6 with a best value no worse than
0.01 below solo's, mini_cnn cohort/solo wall <= 0.9.

  python benchmarks/cohort_study.py [--repeats 1] [--only mlp mini_cnn] [--keep DIR]
  python benchmarks/cohort_study.py --only mlp --n-trials 4 --epochs 2   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import re
import shutil
import statistics
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
# study_vs_torch runs the command the same way: its command, its timing and its log-line prefix
from study_vs_torch import LOGGED, orchard_command, study_only, timed  # noqa: E402
ARCHS = ("mlp", "mini_cnn")
SIDES = {"solo": 1, "cohort": 4}  # name: optuna.cohort_size
RECIPE_WARMUP = 3                 # the bundled recipe's optuna.pruning_warmup_epochs
# arch: (largest cohort/solo wall ratio, how far below solo's best the cohort's may be or None)
TARGETS = {"mlp": (0.6, 0.01), "mini_cnn": (0.9, None)}
COHORT_LINE = re.compile(r"Cohort of (\d+): trials ([\d, ]+)")
XLA_LINE = re.compile(r"^Finished XLA compilation of .* in ([0-9.]+) sec")


def parse_log(text: str) -> dict:
  """Cohorts formed (their sizes), programs JAX traced and XLA's compile seconds (summed over
  threads: the ahead-of-time compile thread overlaps the study's set-up), from a run's log."""
  cohorts, traced, xla_s = [], 0, 0.0
  for line in text.splitlines():
    message = LOGGED.match(line).group(1)
    m = COHORT_LINE.search(message)
    if m:
      cohorts.append(int(m.group(1)))
    elif message.startswith("Compiling "):
      traced += 1
    elif XLA_LINE.match(message):
      xla_s += float(XLA_LINE.match(message).group(1))
  return {"cohorts": cohorts, "traced": traced, "xla_s": xla_s}


def _when(text: str) -> datetime.datetime | None:
  return datetime.datetime.fromisoformat(text) if text else None


def read_trials(run_dir: pathlib.Path, started: datetime.datetime, wall_s: float) -> dict:
  """Trial counts, epochs, best value and how the wall time splits, from the run's trials.csv:
  before the first trial starts, between it and the last trial's end, after that."""
  with open(run_dir / "trials.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  states = [r["state"] for r in rows]
  complete = [float(r["value"]) for r in rows if r["state"] == "COMPLETE" and r["value"]]
  starts = [t for t in (_when(r["datetime_start"]) for r in rows) if t]
  ends = [t for t in (_when(r["datetime_complete"]) for r in rows) if t]
  span = before = float("nan")
  if starts and ends:
    span = (max(ends) - min(starts)).total_seconds()
    before = (min(starts) - started).total_seconds()
  return {"before_s": before, "after_s": wall_s - before - span, "trials": len(rows),
          "complete": states.count("COMPLETE"),
          "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
          "epochs_run": sum(int(r["epochs"] or 0) for r in rows),
          "best_value": max(complete) if complete else None, "trials_s": span}


def size_sets(n_trials: int | None, epochs: int | None) -> dict[str, object]:
  """The ``--set`` values of a study of ``n_trials`` trials of ``epochs`` epochs (None: the
  recipe's); the pruning warmup drops below a shorter trial's epochs."""
  sets: dict[str, object] = {}
  if n_trials is not None:
    sets["optuna.n_trials"] = n_trials
  if epochs is not None:
    sets["optuna.epochs"] = epochs
    if RECIPE_WARMUP >= epochs:
      sets["optuna.pruning_warmup_epochs"] = epochs - 1
  return sets


def run_side(arch: str, side: str, args: argparse.Namespace, work: pathlib.Path) -> dict:
  out, cache = work / f"{arch}_{side}", work / f"{arch}_{side}_jax_cache"
  cache.mkdir(parents=True)  # its own, empty: a cold run
  sets = {"architecture.name": arch, "optuna.cohort_size": SIDES[side],
          "telemetry.compilation_cache": str(cache), **size_sets(args.n_trials, args.epochs)}
  cmd = [*orchard_command(), "run", *study_only(), "--output", str(out)]
  for key, value in sets.items():
    cmd += ["--set", f"{key}={value}"]
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the CLI skips its own setting when this is set
  if args.log_compiles:
    env["JAX_LOG_COMPILES"] = "1"
  started = datetime.datetime.now()  # local time, as trials.csv's
  seconds, stdout, stderr = timed(cmd, env, f"orchard-jax ({arch} {side})")
  (work / f"{arch}_{side}.log").write_text(stdout + stderr)
  return {"wall_s": seconds, **read_trials(out, started, seconds),
          **parse_log(stdout + "\n" + stderr)}


def _cohorts_text(sizes: list[int]) -> str:
  if not sizes:
    return "-"
  counts = {k: sizes.count(k) for k in sorted(set(sizes), reverse=True)}
  return f"{len(sizes)} (" + ", ".join(f"{n}x{k}" for k, n in counts.items()) + ")"


def _best_text(value: float | None) -> str:
  return "-" if value is None else f"{value:.4f}"


def report(arch: str, rounds: list[dict], args: argparse.Namespace) -> bool:
  """Prints the architecture's table and targets; True when every target is met."""
  med = {side: {key: statistics.median(r[side][key] for r in rounds)
                for key in ("wall_s", "before_s", "trials_s", "after_s")} for side in SIDES}
  print(f"\n{arch}: seconds: median of {len(rounds)} round(s), each side a cold process (wall = "
        f"before the first trial + trials + after the last); the rest: the last round")
  print(f"  {'side':13s} {'wall s':>7s} {'before':>6s} {'trials':>6s} {'after':>5s} {'best':>7s} "
        f"{'finished (C/P/F)':>17s} "
        f"{'epochs':>6s}  {'cohorts (n x size)':20s} {'traced':>6s} {'XLA s':>6s}")
  for side, k in SIDES.items():
    last = rounds[-1][side]
    finished = last["complete"] + last["pruned"]
    counts = f"{finished} ({last['complete']}/{last['pruned']}/{last['failed']})"
    traced = str(last["traced"]) if args.log_compiles else "-"
    xla = f"{last['xla_s']:.1f}" if args.log_compiles else "-"
    print(f"  {side + f' K={k}':13s} {med[side]['wall_s']:7.1f} {med[side]['before_s']:6.1f} "
          f"{med[side]['trials_s']:6.1f} {med[side]['after_s']:5.1f} "
          f"{_best_text(last['best_value']):>7s} {counts:>17s} {last['epochs_run']:6d}  "
          f"{_cohorts_text(last['cohorts']):20s} {traced:>6s} {xla:>6s}")
  if len(rounds) > 1:
    walls = {side: " ".join(f"{r[side]['wall_s']:.1f}" for r in rounds) for side in SIDES}
    print(f"  wall s per round: solo {walls['solo']}; cohort {walls['cohort']}")
  ratio = med["cohort"]["wall_s"] / med["solo"]["wall_s"]
  trials_ratio = med["cohort"]["trials_s"] / med["solo"]["trials_s"]
  limit, slack = TARGETS[arch]
  ok_ratio = ratio <= limit
  print(f"  cohort/solo wall {ratio:.3f} (target <= {limit}: {'met' if ok_ratio else 'MISSED'}); "
        f"trials span {trials_ratio:.3f}")
  ok_best = True
  if slack is not None:
    solo, cohort = rounds[-1]["solo"]["best_value"], rounds[-1]["cohort"]["best_value"]
    ok_best = solo is not None and cohort is not None and cohort >= solo - slack
    print(f"  best value cohort {_best_text(cohort)} vs solo {_best_text(solo)} (target >= solo - "
          f"{slack}: {'met' if ok_best else 'MISSED'})")
  return ok_ratio and ok_best


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=1, help="rounds per architecture (default 1)")
  parser.add_argument("--only", nargs="+", choices=ARCHS, default=list(ARCHS),
                      help="architectures (default: both)")
  parser.add_argument("--n-trials", type=int, default=None,
                      help="optuna.n_trials on both sides (default: the recipe's 12)")
  parser.add_argument("--epochs", type=int, default=None,
                      help="optuna.epochs on both sides (default: the recipe's 6); pruning "
                           "warmup becomes epochs - 1 when the recipe's 3 is not below it")
  parser.add_argument("--keep", metavar="DIR",
                      help="keep every run's folder and log (<arch>_<side>.log) under "
                           "DIR/round_<n>")
  parser.add_argument("--no-log-compiles", dest="log_compiles", action="store_false",
                      help="do not set JAX_LOG_COMPILES=1 (no traced-program counts)")
  args = parser.parse_args(argv)
  if args.repeats < 1 or (args.epochs is not None and args.epochs < 2) or (
      args.n_trials is not None and args.n_trials < 1):
    parser.error(f"--repeats and --n-trials must be >= 1 and --epochs >= 2, got "
                 f"repeats={args.repeats}, n_trials={args.n_trials}, epochs={args.epochs}")
  print(f"cohort_study: {', '.join(args.only)}, {args.repeats} round(s), "
        f"n_trials={args.n_trials or 'recipe (12)'}, epochs={args.epochs or 'recipe (6)'}, "
        f"sides {', '.join(f'{s} (cohort_size={k})' for s, k in SIDES.items())}, "
        f"{os.cpu_count()} CPUs, python {sys.executable}", flush=True)
  print("targets: mlp cohort/solo wall <= 0.6 and best value >= solo's - 0.01; "
        "mini_cnn cohort/solo wall <= 0.9", flush=True)
  met = True
  for arch in args.only:
    rounds = []
    for index in range(args.repeats):
      order = tuple(SIDES) if index % 2 == 0 else tuple(reversed(SIDES))
      result = {}
      with tempfile.TemporaryDirectory(prefix="cohort_study_") as tmp:
        work = pathlib.Path(tmp)
        if args.keep:
          work = pathlib.Path(args.keep) / arch / f"round_{index + 1}"
          shutil.rmtree(work, ignore_errors=True)
          work.mkdir(parents=True)
        for side in order:
          result[side] = run_side(arch, side, args, work)
      print(f"{arch} round {index + 1} ({', '.join(order)}): " + "  ".join(
          f"{side} {result[side]['wall_s']:.1f} s (trials {result[side]['trials_s']:.1f} s, "
          f"best {_best_text(result[side]['best_value'])})" for side in SIDES), flush=True)
      rounds.append(result)
    met &= report(arch, rounds, args)
  print(f"\n{'all targets met' if met else 'some targets missed'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
