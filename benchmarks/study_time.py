"""Whole studies solo vs in cohorts, warm: wall time, host work per trial-epoch, time to a good value.

Each side runs the bundled recipe's study (``--set architecture.name=mlp
--set optuna.n_trials=32 --set optuna.epochs=10 --set
optuna.enable_early_stopping=false``; ``--arch mini_cnn`` keeps the recipe's
n_trials and epochs) in a fresh process, ``orchard-jax run`` as the
installed command runs it (:func:`orchard_jax.cli.console`) but started as
``python benchmarks/_study_child.py run ...``, which times every training and
validation pass (``orchard_jax.engine.passes._pass``). Sides:

* **solo**   -- ``--set optuna.cohort_size=1`` (the recipe's pruner, median);
* **cohort** -- ``--set optuna.cohort_size=8``, the recipe's pruner as is;
* **cohort-P** for each ``--pruners P``: ``cohort_size=8`` and
  ``--set optuna.pruner_type=P``. A name the installed orchard_jax refuses is
  said in one line and its side skipped.

Every side shares one JAX compilation cache (``--set
telemetry.compilation_cache=DIR``), which a first unmeasured run of each
side fills: the measured runs are warm (``--no-warm-up``: the first round's
are cold). Each run has its own ``--output``
folder and study (SQLite, ``--storage memory`` for none; ``--checkout DIR``
imports orchard_jax from DIR, checked per run); the order of the
sides alternates between rounds (``--repeats``, default 3). Wall seconds are
timed around ``subprocess.run`` (interpreter start-up and imports count).

Per side and round: the wall; the seconds inside passes; host work per
trial-epoch, the issue's definition: (wall - passes) / trial-epochs, where
trial-epochs sum each trial's reported epochs (its intermediate values);
the seconds before the first trial starts and after the last one ends
(the storage's datetime_start/datetime_complete against the wall clock when
the process was started); the in-study host work per trial-epoch (wall less
those two less the passes, per trial-epoch); trials complete/pruned/failed;
the best value; and the time to a good value: from the process start to the
first COMPLETE trial (by datetime_complete) whose value reaches the solo
side's best of the same round (pruned trials do not count). Then medians
[min - max] over the rounds, the ratios to solo and the issue's targets.

  python benchmarks/study_time.py [--repeats 3] [--arch mlp|mini_cnn] [--pruners median hyperband]
  python benchmarks/study_time.py --smoke     # 4 trials of 2 epochs, 1 round, no warm-up
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CHILD = HERE / "_study_child.py"
sys.path.insert(0, str(HERE))
# the conventions of the other whole-study benchmarks: the installed command and the recipe's warmup
from cohort_study import RECIPE_WARMUP, size_sets  # noqa: E402
from study_vs_torch import orchard_command, study_only  # noqa: E402

COHORT_SIZE = 8
DEFAULTS = {"mlp": (32, 10), "mini_cnn": (None, None)}  # arch: (n_trials, epochs); None: recipe's
SMOKE = (4, 2)                                            # --smoke: n_trials, epochs (1 round)
TARGET_WALL = 0.5         # cohort/solo wall
TARGET_HOST_S = 0.010     # solo host work per trial-epoch
TARGET_TO_GOOD = 0.5      # cohort/solo seconds to the solo's best value
BEST_TOLERANCE = 0.0      # how far below solo's best the cohort's may be


class Refused(Exception):
  """orchard_jax refused a side's settings (exit status 2): the one-line reason."""


def _sides(pruners: list[str]) -> dict[str, dict[str, object]]:
  sides = {"solo": {"optuna.cohort_size": 1}, "cohort": {"optuna.cohort_size": COHORT_SIZE}}
  for name in pruners:
    sides[f"cohort-{name}"] = {"optuna.cohort_size": COHORT_SIZE, "optuna.pruner_type": name}
  return sides


def _common_sets(args: argparse.Namespace, cache: pathlib.Path) -> dict[str, object]:
  sets: dict[str, object] = {"architecture.name": args.arch,
                             "optuna.enable_early_stopping": "false",
                             "telemetry.compilation_cache": str(cache),
                             **size_sets(args.n_trials, args.epochs)}
  if args.storage == "memory":
    sets["optuna.storage"] = "memory"
  return sets


def _run(sets: dict[str, object], out: pathlib.Path, totals: pathlib.Path, what: str,
         checkout: pathlib.Path | None) -> tuple[float, float, str]:
  """Runs the study in a fresh child process (orchard_jax imported from ``checkout`` when one is
  given); returns its wall seconds, the wall clock when it was started and its log. Raises
  Refused on exit status 2 (a refused setting)."""
  cmd = [sys.executable, str(CHILD), "run", *study_only(checkout), "--output", str(out)]
  for key, value in sets.items():
    cmd += ["--set", f"{key}={value}"]
  env = dict(os.environ, STUDY_TIME_OUT=str(totals))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the CLI skips its own setting when this is set
  if checkout is not None:
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(checkout), env.get("PYTHONPATH"))))
  started = time.time()
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  seconds = time.perf_counter() - start
  log = proc.stdout + proc.stderr
  if proc.returncode == 2:
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    raise Refused(errors[-1] if errors else proc.stderr.strip()[-300:])
  if proc.returncode != 0:
    sys.stderr.write(log[-6000:])
    raise SystemExit(f"{what} failed with exit status {proc.returncode}: {' '.join(cmd)}")
  module = pathlib.Path(json.loads(totals.read_text())["module"]).resolve()
  if checkout is not None and checkout.resolve() not in module.parents:
    raise SystemExit(f"{what} imported {module}, not orchard_jax of --checkout {checkout}")
  return seconds, started, log


def _stamp(when: datetime.datetime | str | None) -> float | None:
  """A trial's naive local datetime as seconds since the epoch (as time.time())."""
  if isinstance(when, str):
    when = datetime.datetime.fromisoformat(when) if when else None
  return None if when is None else when.timestamp()


def read_trials(run_dir: pathlib.Path, storage: str) -> tuple[list[dict], str]:
  """Each trial's state, value, start and end (seconds since the epoch) and reported epochs, and
  the study's direction: from the run's study.db (SQLite), from trials.csv with memory storage
  (its ``epochs`` column, the epochs the trial reported)."""
  if storage == "memory":
    with open(run_dir / "trials.csv", newline="") as f:
      rows = list(csv.DictReader(f))
    import yaml
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    direction = recipe["training"]["monitor_direction"]
    return [{"state": r["state"], "value": float(r["value"]) if r["value"] else None,
             "start": _stamp(r["datetime_start"]), "end": _stamp(r["datetime_complete"]),
             "epochs": int(r["epochs"] or 0)} for r in rows], direction
  import optuna
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  url = f"sqlite:///{run_dir / 'study.db'}"
  (summary,) = optuna.get_all_study_summaries(url)
  study = optuna.load_study(study_name=summary.study_name, storage=url)
  trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
  return [{"state": t.state.name, "value": t.value, "start": _stamp(t.datetime_start),
           "end": _stamp(t.datetime_complete), "epochs": len(t.intermediate_values)}
          for t in trials], study.direction.name.lower()


def measure(sets: dict[str, object], out: pathlib.Path, args: argparse.Namespace, what: str
            ) -> dict:
  """One measured run of a side: its times, counts and COMPLETE trials' (end, value)."""
  totals_path = out.parent / f"{out.name}.passes.json"
  wall, started, log = _run(sets, out, totals_path, what, args.checkout)
  (out.parent / f"{out.name}.log").write_text(log)
  totals = json.loads(totals_path.read_text())
  trials, direction = read_trials(out, args.storage)
  states = [t["state"] for t in trials]
  starts = [t["start"] for t in trials if t["start"] is not None]
  ends = [t["end"] for t in trials if t["end"] is not None]
  before = min(starts) - started if starts else float("nan")
  after = started + wall - max(ends) if ends else float("nan")
  trial_epochs = sum(t["epochs"] for t in trials)
  complete = [(t["end"] - started, t["value"]) for t in trials
              if t["state"] == "COMPLETE" and t["value"] is not None and t["end"] is not None]
  values = [v for _, v in complete]
  best = (min(values) if direction == "minimize" else max(values)) if values else None
  per = max(trial_epochs, 1)
  return {"wall_s": wall, "pass_s": totals["pass_s"], "passes": totals["passes"],
          "startup_s": totals["t0"] - started, "before_s": before, "after_s": after,
          "trial_epochs": trial_epochs, "host_te_s": (wall - totals["pass_s"]) / per,
          "study_host_te_s": (wall - before - after - totals["pass_s"]) / per,
          "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
          "failed": states.count("FAIL"), "best": best, "direction": direction,
          "completions": sorted(complete)}


def seconds_to(result: dict, target: float | None) -> float | None:
  """Seconds from the process start to the first COMPLETE trial whose value reaches target."""
  if target is None:
    return None
  better = (lambda v: v <= target) if result["direction"] == "minimize" else (lambda v: v >= target)
  return next((end for end, value in result["completions"] if better(value)), None)


def skip(sides: dict, name: str, e: Refused) -> None:
  """Drops a side whose settings orchard_jax refuses, in one line; solo or cohort refused ends
  the benchmark."""
  if name in ("solo", "cohort"):
    raise SystemExit(f"orchard_jax refused the {name} side: {e}")
  print(f"  {name}: skipped, the installed orchard_jax refuses it: {e}", flush=True)
  del sides[name]


def warm_up(sides: dict, common: dict, work: pathlib.Path, checkout: pathlib.Path | None) -> None:
  """One unmeasured run of each side, filling the shared cache; drops (and says so) the sides
  whose settings orchard_jax refuses."""
  for name, own in list(sides.items()):
    out = work / f"warmup_{name}"
    try:
      totals = work / f"warmup_{name}.passes.json"
      seconds, _, _ = _run({**common, **own}, out, totals, f"warm-up of {name}", checkout)
    except Refused as e:
      skip(sides, name, e)
      continue
    module = json.loads(totals.read_text())["module"]
    print(f"  warm-up {name}: {seconds:.1f} s (orchard_jax from {module})", flush=True)
    shutil.rmtree(out, ignore_errors=True)


def _num(value: float | None, spec: str = ".1f") -> str:
  return "never" if value is None else format(value, spec)


def round_lines(index: int, order: tuple, results: dict) -> None:
  print(f"round {index + 1} ({', '.join(order)}):", flush=True)
  for name, r in results.items():
    print(f"  {name:26s} wall {r['wall_s']:6.1f} s  passes {r['pass_s']:6.1f} s ({r['passes']})  "
          f"host/trial-epoch {r['host_te_s'] * 1e3:6.1f} ms (in study "
          f"{r['study_host_te_s'] * 1e3:6.1f} ms)  before {r['before_s']:5.1f} s (interpreter "
          f"{r['startup_s']:.1f})  after {r['after_s']:5.1f} s  trial-epochs {r['trial_epochs']}  "
          f"C/P/F {r['complete']}/{r['pruned']}/{r['failed']}  best {_num(r['best'], '.4f')}  "
          f"to solo's best {_num(r['to_target_s'])} s", flush=True)


def _spread(values: list) -> str:
  """Median [min - max] of the values that are not None; how many are None, if any."""
  got = [v for v in values if v is not None]
  missing = len(values) - len(got)
  text = "never" if not got else (f"{statistics.median(got):8.3f} [{min(got):.3f} - "
                                  f"{max(got):.3f}]")
  return text + (f" (never in {missing} of {len(values)})" if missing else "")


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or not b else a / b


def report(rounds: list[dict], names: list[str]) -> bool:
  """Medians [min - max] per side, ratios to solo and the issue's targets; True when all met."""
  print(f"\nover {len(rounds)} round(s): median [min - max]")
  keys = (("wall_s", "wall s", 1), ("pass_s", "passes s", 1), ("host_te_s", "host ms/trial-epoch", 1e3),
          ("study_host_te_s", "in-study host ms/t-e", 1e3), ("before_s", "before first trial s", 1),
          ("after_s", "after last trial s", 1), ("best", "best value", 1),
          ("to_target_s", "s to solo's best", 1))
  for name in names:
    print(f"  {name}")
    for key, label, scale in keys:
      values = [r[name][key] for r in rounds]
      print(f"    {label:22s} {_spread([None if v is None else v * scale for v in values])}")
  print("  ratios to solo (same round)")
  ratios = {}
  for name in names[1:]:
    wall = [_ratio(r[name]["wall_s"], r["solo"]["wall_s"]) for r in rounds]
    good = [_ratio(r[name]["to_target_s"], r["solo"]["to_target_s"]) for r in rounds]
    diff = [None if r[name]["best"] is None or r["solo"]["best"] is None
            else r[name]["best"] - r["solo"]["best"] for r in rounds]
    ratios[name] = (wall, good, diff)
    print(f"    {name + ' wall':46s} {_spread(wall)}")
    print(f"    {name + ' time to good value':46s} {_spread(good)}")
    print(f"    {name + ' best - solo best':46s} {_spread(diff)}")

  def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"

  def median(values: list) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) == len(values) else None  # a 'never' fails

  wall, good, diff = ratios["cohort"]
  direction = rounds[0]["solo"]["direction"]
  diff_m = median(diff)
  no_worse = diff_m is not None and (diff_m >= -BEST_TOLERANCE if direction == "maximize"
                                     else diff_m <= BEST_TOLERANCE)
  wall_m, good_m = median(wall), median(good)
  host_m = statistics.median(r["solo"]["host_te_s"] for r in rounds)
  checks = [
      (f"cohort/solo wall {_num(wall_m, '.3f')} <= {TARGET_WALL} and best value no worse than "
       f"solo's (median difference {_num(diff_m, '+.4f')}, tolerance {BEST_TOLERANCE})",
       wall_m is not None and wall_m <= TARGET_WALL and no_worse),
      (f"solo host work per trial-epoch {host_m * 1e3:.1f} ms <= {TARGET_HOST_S * 1e3:.0f} ms",
       host_m <= TARGET_HOST_S),
      (f"cohort/solo time to a good value {_num(good_m, '.3f')} <= {TARGET_TO_GOOD}",
       good_m is not None and good_m <= TARGET_TO_GOOD)]
  print("targets (issue 23):")
  for text, ok in checks:
    print(f"  {verdict(ok)}  {text}")
  for name in names[2:]:
    wall, good, _ = ratios[name]
    print(f"  ({name}: wall ratio {_num(median(wall), '.3f')}, time-to-good-value ratio "
          f"{_num(median(good), '.3f')})")
  return all(ok for _, ok in checks)


def run_round(index: int, sides: dict, common: dict, args: argparse.Namespace,
              work: pathlib.Path) -> dict:
  """One measured run of each side (in turn, the order reversed every other round); drops the
  sides orchard_jax refuses (without a warm-up, the first round finds them)."""
  order = tuple(sides) if index % 2 == 0 else tuple(reversed(sides))
  results = {}
  for name in order:
    out = work / f"round_{index + 1}" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
      results[name] = measure({**common, **sides[name]}, out, args, f"{name} (round {index + 1})")
    except Refused as e:
      skip(sides, name, e)
      continue
    if not args.keep:
      shutil.rmtree(out, ignore_errors=True)
  target = results["solo"]["best"]
  for r in results.values():
    r["to_target_s"] = seconds_to(r, target)
  order = tuple(name for name in order if name in sides)
  round_lines(index, order, {name: results[name] for name in sides})
  return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", choices=tuple(DEFAULTS), default="mlp",
                      help="architecture.name (default mlp)")
  parser.add_argument("--n-trials", type=int, default=None,
                      help="optuna.n_trials (default: mlp 32, mini_cnn the recipe's)")
  parser.add_argument("--epochs", type=int, default=None,
                      help="optuna.epochs (default: mlp 10, mini_cnn the recipe's); pruning "
                           f"warmup becomes epochs - 1 when the recipe's {RECIPE_WARMUP} is not "
                           "below it")
  parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
  parser.add_argument("--storage", choices=("sqlite", "memory"), default="sqlite",
                      help="optuna.storage (default sqlite)")
  parser.add_argument("--pruners", nargs="+", default=[], metavar="P",
                      help=f"an extra side per name: cohort_size={COHORT_SIZE} and "
                           "optuna.pruner_type=P")
  parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                      help="no unmeasured first run per side: each side's first round is cold")
  parser.add_argument("--smoke", action="store_true",
                      help=f"n_trials {SMOKE[0]}, epochs {SMOKE[1]}, 1 round, no warm-up")
  parser.add_argument("--checkout", type=pathlib.Path, metavar="DIR",
                      help="import orchard_jax from DIR (PYTHONPATH; e.g. `git archive HEAD "
                           "orchard_jax | tar -x -C DIR` when the working tree is being edited); "
                           "default: as this interpreter imports it")
  parser.add_argument("--keep", metavar="DIR",
                      help="keep every run's folder, log and pass times under DIR")
  args = parser.parse_args(argv)
  n_trials, epochs = SMOKE if args.smoke else DEFAULTS[args.arch]
  args.n_trials = n_trials if args.n_trials is None else args.n_trials
  args.epochs = epochs if args.epochs is None else args.epochs
  if args.smoke:
    args.repeats, args.warm_up = 1, False
  if args.repeats < 1 or (args.epochs is not None and args.epochs < 2) or (
      args.n_trials is not None and args.n_trials < 1):
    parser.error(f"--repeats and --n-trials must be >= 1 and --epochs >= 2, got "
                 f"repeats={args.repeats}, n_trials={args.n_trials}, epochs={args.epochs}")
  twice = sorted({p for p in args.pruners if args.pruners.count(p) > 1})
  if twice:
    parser.error(f"--pruners names each pruner once, got {', '.join(twice)} twice")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  print(f"study_time: {args.arch}, n_trials={args.n_trials or 'recipe'}, "
        f"epochs={args.epochs or 'recipe'}, early stopping off, {args.storage} storage, "
        f"{args.repeats} round(s), {os.cpu_count()} CPUs; the command "
        f"{' '.join(orchard_command())} run, started as {sys.executable} {CHILD.name} run",
        flush=True)
  with tempfile.TemporaryDirectory(prefix="study_time_") as tmp:
    work = pathlib.Path(tmp)
    if args.keep:
      work = pathlib.Path(args.keep)
      shutil.rmtree(work, ignore_errors=True)
      work.mkdir(parents=True)
    common = _common_sets(args, work / "jax_cache")
    sides = _sides(args.pruners)
    if args.warm_up:
      print("warm-up (unmeasured, fills the shared compilation cache):", flush=True)
      warm_up(sides, common, work, args.checkout)
    rounds = [run_round(i, sides, common, args, work) for i in range(args.repeats)]
  met = report(rounds, list(sides))
  print(f"\n{'all targets met' if met else 'some targets missed'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
