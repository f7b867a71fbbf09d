"""What a user waits for, in this checkout vs another one, side by side in one run.

For a change that should not change speed (a restructuring), three figures
of ``docs/performance.md``, each a fresh process per side, the two checkouts
alternating (old, new; then new, old), medians over ``--repeats``:

* ``study cold`` / ``study warm``: ``orchard-jax run`` on the bundled recipe
  (12 MiniCNN trials of 6 epochs on digits, TPE, median pruning, SQLite,
  plots), with an empty compilation cache, then again (a new output folder)
  with the cache the cold run left;
* ``cohort study``: the same command with ``architecture.name=mlp`` and
  ``optuna.cohort_size=4``, empty cache;
* ``first trial`` (MLP and MiniCNN): ``benchmarks/first_trial.py``'s child,
  two ``run_trial`` trials in a fresh process, no persistent cache; the
  figure is the first trial's seconds;
* ``cohort trials``: ``benchmarks/cohort_trials.py``'s child, 8 tabular MLP
  trials through ``orchard_jax.optimize(..., cohort_size=8)``; the figures
  are the whole process (cold) and the same trials again (warm).

Each side imports ``orchard_jax`` from its own folder (``PYTHONPATH``), and
the child says which file it imported. Run::

  git worktree add /tmp/old <commit before the change>
  python benchmarks/checkouts.py --old /tmp/old [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cohort_trials  # noqa: E402  pylint: disable=wrong-import-position
import first_trial  # noqa: E402  pylint: disable=wrong-import-position
from study_vs_torch import study_only  # noqa: E402  pylint: disable=wrong-import-position

CLI = "import sys; from orchard_jax.cli import console; sys.exit(console(sys.argv[1:]))"


def _run(cmd: list[str], checkout: pathlib.Path, what: str) -> tuple[float, str]:
  started = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=first_trial.checkout_env(checkout),
                        cwd="/")
  seconds = time.perf_counter() - started
  if proc.returncode != 0:
    sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
    raise SystemExit(f"{what} of {checkout} failed with exit status {proc.returncode}")
  return seconds, proc.stdout


def study(checkout: pathlib.Path, work: pathlib.Path, name: str, cache: pathlib.Path,
          sets: tuple[str, ...] = ()) -> float:
  """Wall seconds of ``orchard-jax run`` on the bundled recipe, from ``checkout``."""
  cmd = [sys.executable, "-c", CLI, "run", *study_only(checkout), "--output", str(work / name),
         "--set", f"telemetry.compilation_cache={cache}"]
  for assignment in sets:
    cmd += ["--set", assignment]
  return _run(cmd, checkout, f"the study {name}")[0]


def json_child(checkout: pathlib.Path, code: str, args: list[str], what: str) -> dict:
  """The JSON line a benchmark child's ``code`` prints last, run with ``checkout``'s package."""
  _, stdout = _run([sys.executable, "-c", code, *args], checkout, what)
  return json.loads(stdout.strip().splitlines()[-1])


GROUPS = ("study", "first", "cohort")


def one_round(checkout: pathlib.Path, side: str, work: pathlib.Path,
              groups: tuple[str, ...] = GROUPS) -> dict[str, float]:
  figures: dict[str, float] = {}
  if "study" in groups:
    cache = work / f"{side}_cache"
    cache.mkdir()
    figures["study cold"] = study(checkout, work, f"{side}_cold", cache)
    figures["study warm"] = study(checkout, work, f"{side}_warm", cache)
    cohort_cache = work / f"{side}_cohort_cache"
    cohort_cache.mkdir()
    figures["cohort study (mlp, K=4)"] = study(
        checkout, work, f"{side}_cohort", cohort_cache,
        ("architecture.name=mlp", "optuna.cohort_size=4"))
  if "first" in groups:
    figures.update(first_trials(checkout))
  if "cohort" in groups:
    figures.update(cohort_trial_figures(checkout))
  return figures


def first_trials(checkout: pathlib.Path) -> dict[str, float]:
  """The first trial's seconds, per model, of ``first_trial.py``'s child."""
  figures = {}
  for model in first_trial.MODELS:
    figures[f"first trial ({model})"] = first_trial.child(checkout, model)["seconds"][0]
  return figures


def cohort_trial_figures(checkout: pathlib.Path) -> dict[str, float]:
  """``cohort_trials.py``'s tabular case: the process (cold), and its trials again (warm)."""
  figures = {}
  n, k = cohort_trials.CASES["tabular"]
  out = json_child(checkout, cohort_trials.CHILD, ["tabular", str(n), str(k)],
                     "cohort trials")
  figures[f"cohort trials cold (tabular, K={k})"] = out["cold"]
  figures[f"cohort trials warm (tabular, K={k})"] = out["warm"]
  return figures


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  first_trial.checkout_arguments(parser)
  parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS),
                      help="which figures: the studies, the first trials, the cohort trials")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  rounds: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
  for repeat in range(args.repeats):
    order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
    for side in order:
      with tempfile.TemporaryDirectory(prefix=f"checkouts_{side}_") as work:
        figures = one_round(getattr(args, side), side, pathlib.Path(work), tuple(args.only))
      rounds[side].append(figures)
      print(f"round {repeat + 1} {side}: " + ", ".join(f"{key} {value:.2f} s"
                                                      for key, value in figures.items()),
            flush=True)
  print(f"\n{'figure':36s} {'old s':>7s} {'new s':>7s} {'new/old':>8s} {'per round':>20s}")
  for key in rounds["old"][0]:
    old = [r[key] for r in rounds["old"]]
    new = [r[key] for r in rounds["new"]]
    ratios = [n / o for o, n in zip(old, new)]
    print(f"{key:36s} {statistics.median(old):7.2f} {statistics.median(new):7.2f} "
          f"{statistics.median(ratios):8.2f} {min(ratios):9.2f}-{max(ratios):.2f}")
  print(f"\nmedians of {args.repeats} round(s); new/old: the median of the rounds' ratios; "
        f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
  main()
