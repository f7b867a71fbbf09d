"""Whole study: ``orchard-jax run`` (the bundled recipe) vs the same study in torch.

Each round runs three fresh processes, timed around ``subprocess.run`` (so
interpreter start-up and imports count on both sides):

* **cold**  -- ``orchard-jax run --output <dir>`` with an empty JAX persistent
  compilation cache (``--set telemetry.compilation_cache=<empty dir>``);
* **warm**  -- the same command, new output folder and study, the cache left
  as the cold run filled it;
* **torch** -- ``benchmarks/torch_study.py`` (the reference's loop, see there)
  with the cold run's trial parameters enqueued, so both sides train the same
  hyperparameters; it runs at most as many trials as the cold run did.

The order of warm and torch alternates between rounds. Printed per round: the
three wall times, cold/torch and warm/torch, trials complete/pruned/failed,
epochs trained, best validation accuracy, the first and later trials' seconds,
and (from ``JAX_LOG_COMPILES``) how many programs each orchard run traced, how
many of them after its first trial (the claim: none), and how many XLA
compiled vs loaded from JAX's persistent cache (warm: all loaded). Then the
median and min-max of every time and ratio over the rounds. Below 1.0 means
orchard_jax is faster.

On a CPU that other processes keep busy, torch's default intra-op thread
pool (one thread per core) can slow down several-fold while it waits for
its threads; ``--torch-threads 1`` shows how much of the gap that is. The
default leaves torch's thread count alone, as the reference does.

  python benchmarks/study_vs_torch.py [--repeats 3] [--n-trials N] [--epochs E]
  python benchmarks/study_vs_torch.py --repeats 1 --n-trials 2 --epochs 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TORCH_STUDY = HERE / "torch_study.py"
STUDY_NAME = "digits_mini_cnn"   # the bundled recipe's optuna.study_name
RECIPE_WARMUP = 3                # its optuna.pruning_warmup_epochs
# A JAX log line: bare, or "WARNING:jax._src...:" once a root handler exists (importing
# orbax.checkpoint installs one).
LOGGED = re.compile(r"^(?:[A-Z]+:[\w.]+:)?(.*)$")
TRIAL_LINE = re.compile(r"^Trial (\d+) (COMPLETE|PRUNED|FAIL) \| \S+ (\S+) \| epochs (\d+) \| "
                        r"([0-9.]+|nan) s")


def orchard_command() -> list[str]:
  script = shutil.which("orchard-jax", path=os.path.dirname(sys.executable))
  return [script] if script else [sys.executable, "-m", "orchard_jax.cli"]


def study_only(checkout: pathlib.Path | None = None) -> list[str]:
  """``run``'s arguments that end it with the search (no final run, evaluation or export), for
  the code of ``checkout`` (None: this one); none for a checkout older than those phases."""
  root = ROOT if checkout is None else pathlib.Path(checkout)
  return ["--final", "off"] if (root / "orchard_jax" / "study" / "phases.py").is_file() else []


def timed(cmd: list[str], env: dict[str, str], what: str) -> tuple[float, str, str]:
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
    raise SystemExit(f"{what} failed with exit status {proc.returncode}: {' '.join(cmd)}")
  return seconds, proc.stdout, proc.stderr


def parse_log(stderr: str) -> dict:
  """Per-trial seconds and compile counts from an orchard run's stderr.

  With ``JAX_LOG_COMPILES=1`` JAX logs ``Compiling ...`` for every program it
  traces and lowers (a miss of its in-memory cache), then either loads it
  from the persistent cache (``Persistent compilation cache hit``) or runs
  XLA. Programs that orchard_jax's own executable cache loads are neither
  traced nor logged.
  """
  trials, traced, after_first, hits = [], 0, 0, 0
  for line in stderr.splitlines():
    m = TRIAL_LINE.match(line)
    if m:
      trials.append(float(m.group(5)))
      continue
    message = LOGGED.match(line).group(1)
    if message.startswith("Compiling "):
      traced += 1
      after_first += bool(trials)
    elif message.startswith("Persistent compilation cache hit"):
      hits += 1
  return {"trial_seconds": trials, "traced": traced, "traced_after_first": after_first,
          "cache_hits": hits, "xla_compiles": traced - hits}


def read_study(run_dir: pathlib.Path) -> dict:
  """Trial counts, best value and parameters of the study an orchard run stored."""
  import optuna
  from optuna.trial import TrialState
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run_dir / 'study.db'}")
  trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
  complete = [t.value for t in trials if t.state == TrialState.COMPLETE]
  return {"trials": len(trials), "complete": len(complete),
          "pruned": sum(t.state == TrialState.PRUNED for t in trials),
          "failed": sum(t.state == TrialState.FAIL for t in trials),
          "epochs_run": sum(t.last_step or 0 for t in trials),
          "best_value": max(complete) if complete else None,
          "params": [dict(t.params) for t in trials if t.params]}


def _trials_text(seconds: list) -> str:
  seconds = [s for s in seconds if s is not None]
  if not seconds:
    return "no trial times"
  later = ""
  if len(seconds) > 1:
    later = f", later trials median {statistics.median(seconds[1:]):.1f} s"
  return f"trial 0 {seconds[0]:.1f} s{later}"


def _side_text(name: str, seconds: float, info: dict) -> str:
  best = "-" if info["best_value"] is None else f"{info['best_value']:.4f}"
  text = (f"  {name:6s} {seconds:7.1f} s  {info['trials']} trials ({info['complete']} complete, "
          f"{info['pruned']} pruned, {info['failed']} failed), {info['epochs_run']} epochs, "
          f"best val accuracy {best}; {_trials_text(info['trial_seconds'])}")
  if info.get("traced"):
    text += (f"; JAX traced {info['traced']} programs ({info['traced_after_first']} after "
             f"trial 0): {info['xla_compiles']} compiled by XLA, {info['cache_hits']} loaded "
             f"from its persistent cache")
  return text


def run_round(index: int, args: argparse.Namespace, work: pathlib.Path) -> dict:
  sets = []
  warmup = RECIPE_WARMUP
  if args.n_trials is not None:
    sets += ["--set", f"optuna.n_trials={args.n_trials}"]
  if args.epochs is not None:
    sets += ["--set", f"optuna.epochs={args.epochs}"]
    if warmup >= args.epochs:
      warmup = args.epochs - 1
      sets += ["--set", f"optuna.pruning_warmup_epochs={warmup}"]
  cache = work / "jax_cache"
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the CLI skips its own setting when this is set
  if args.log_compiles:
    env["JAX_LOG_COMPILES"] = "1"

  def orchard(name: str) -> tuple[float, dict]:
    out = work / name
    cmd = [*orchard_command(), "run", *study_only(), "--output", str(out), "--set",
           f"telemetry.compilation_cache={cache}", *sets]
    seconds, stdout, stderr = timed(cmd, env, f"orchard-jax ({name})")
    (work / f"{name}.log").write_text(stdout + stderr)
    return seconds, {**read_study(out), **parse_log(stderr)}

  def torch() -> tuple[float, dict]:
    params = results["cold"][1]["params"]
    path = work / "params.json"
    path.write_text(json.dumps(params))
    cmd = [sys.executable, str(TORCH_STUDY), "--out", str(work / "torch"), "--params-json",
           str(path), "--n-trials", str(len(params)), "--warmup", str(warmup)]
    if args.epochs is not None:
      cmd += ["--epochs", str(args.epochs)]
    if args.torch_threads is not None:
      cmd += ["--threads", str(args.torch_threads)]
    torch_env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    seconds, stdout, stderr = timed(cmd, torch_env, "torch_study.py")
    (work / "torch.log").write_text(stdout + stderr)
    return seconds, json.loads(stdout.strip().splitlines()[-1])

  results = {"cold": orchard("cold")}
  order = ("warm", "torch") if index % 2 == 0 else ("torch", "warm")
  for name in order:
    results[name] = orchard("warm") if name == "warm" else torch()
  times = {name: seconds for name, (seconds, _) in results.items()}
  ratios = {f"{name}/torch": times[name] / times["torch"] for name in ("cold", "warm")}
  print(f"round {index + 1} (cold, {', '.join(order)}): cold {times['cold']:.1f} s  warm "
        f"{times['warm']:.1f} s  torch {times['torch']:.1f} s  cold/torch "
        f"{ratios['cold/torch']:.3f}  warm/torch {ratios['warm/torch']:.3f}", flush=True)
  for name in ("cold", "warm", "torch"):
    print(_side_text(name, *results[name]), flush=True)
  fewer = results["cold"][1]["traced"] - results["warm"][1]["traced"]
  if args.log_compiles and fewer > 0:
    print(f"  warm traced {fewer} programs fewer than cold: orchard_jax's executable cache "
          f"loaded them without tracing", flush=True)
  print(f"  torch's own clock: {results['torch'][1]['wall_s']:.1f} s from its first line, "
        f"{results['torch'][1]['study_s']:.1f} s in study.optimize, "
        f"{results['torch'][1]['torch_threads']} torch threads", flush=True)
  return {**times, **ratios}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
  parser.add_argument("--n-trials", type=int, default=None,
                      help="optuna.n_trials on both sides (default: the recipe's 12)")
  parser.add_argument("--epochs", type=int, default=None,
                      help="optuna.epochs on both sides (default: the recipe's 6); pruning "
                           "warmup becomes epochs - 1 when the recipe's 3 is not below it")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch_study.py --threads N (default: torch's default thread count, "
                           "as the reference runs; see the docstring)")
  parser.add_argument("--keep", metavar="DIR",
                      help="keep every run's folder and log (<name>.log) under DIR/round_<n>")
  parser.add_argument("--no-log-compiles", dest="log_compiles", action="store_false",
                      help="do not set JAX_LOG_COMPILES=1 (no compile counts)")
  args = parser.parse_args(argv)
  if args.repeats < 1 or (args.epochs is not None and args.epochs < 1) or (
      args.n_trials is not None and args.n_trials < 1):
    parser.error(f"--repeats, --n-trials and --epochs must be >= 1, got repeats={args.repeats}, "
                 f"n_trials={args.n_trials}, epochs={args.epochs}")
  print(f"study_vs_torch: {args.repeats} round(s), n_trials={args.n_trials or 'recipe (12)'}, "
        f"epochs={args.epochs or 'recipe (6)'}, {os.cpu_count()} CPUs, python {sys.executable}",
        flush=True)
  rounds = []
  for index in range(args.repeats):
    if args.keep:
      work = pathlib.Path(args.keep) / f"round_{index + 1}"
      shutil.rmtree(work, ignore_errors=True)
      work.mkdir(parents=True)
      rounds.append(run_round(index, args, work))
    else:
      with tempfile.TemporaryDirectory(prefix="study_vs_torch_") as tmp:
        rounds.append(run_round(index, args, pathlib.Path(tmp)))
  print(f"\nover {len(rounds)} round(s): median [min - max]")
  for key, unit in (("cold", " s"), ("warm", " s"), ("torch", " s"), ("cold/torch", ""),
                    ("warm/torch", "")):
    values = [r[key] for r in rounds]
    print(f"  {key:11s} {statistics.median(values):8.3f}{unit}  [{min(values):.3f} - "
          f"{max(values):.3f}]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
