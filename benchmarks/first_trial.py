"""The first trial of ``run_trial`` in a fresh process: this checkout vs another one.

Each child process trains one Optuna study of two trials with ``run_trial``
(2 epochs each, cosine schedule) on a torch DataLoader over a
``TensorDataset`` of 28x28x1 images (1024 training and 256 validation
samples, batch 64, 10 classes), with no persistent compilation cache, and
reports the seconds of each trial and how many times XLA compiled the
training and evaluation steps (JAX's ``/jax/core/compile/backend_compile_duration``
events, by function name). The first trial pays every compile; the second
one shows what a later trial costs. The two checkouts alternate, one fresh
process at a time; medians over ``--repeats``.

To compare with the commit before a change::

  git worktree add /tmp/old HEAD~1
  python benchmarks/first_trial.py --old /tmp/old [--repeats 3] [--only mlp]

The "new" side is the checkout this script is in (``--new`` to choose
another). Each side imports ``orchard_jax`` from its own folder (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("mlp", "mini_cnn")

CHILD = r'''
import collections, json, sys, time
import jax, numpy as np, optuna, torch
counts = collections.Counter()
def listener(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    counts[kwargs.get("fun_name")] += 1
jax.monitoring.register_event_duration_secs_listener(listener)
import orchard_jax
from orchard_jax import MLP, MiniCNN, OptunaConfig, TrainingConfig, TrialConfig, run_trial
from orchard_jax.data import make_loader
if hasattr(orchard_jax, "tune_host_memory"):  # older checkouts tuned the allocator on import
  orchard_jax.tune_host_memory()  # the orchard-jax command's allocator

name = sys.argv[1]
rng = np.random.default_rng(0)
def dataset(n):
  y = rng.integers(0, 10, n)
  x = rng.normal(0.0, 1.0, (n, 1, 28, 28)).astype(np.float32)
  x[np.arange(n), 0, 2 * y, :] += 2.0  # learnable
  return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
train, val = dataset(1024), dataset(256)
model = MLP(num_classes=10, hidden=(256, 256)) if name == "mlp" else MiniCNN(num_classes=10)
optuna.logging.set_verbosity(optuna.logging.WARNING)
seconds = []
def objective(trial):
  cfg = TrialConfig(model=model, train_loader=make_loader(train, 64, shuffle=True),
                    val_loader=make_loader(val, 64, shuffle=False), num_classes=10,
                    training=TrainingConfig(batch_size=64, use_amp=False, use_tqdm=False,
                                            mixup_alpha=0.0, scheduler_type="cosine", epochs=2,
                                            learning_rate=trial.suggest_float("lr", 0.01, 0.05)),
                    optuna=OptunaConfig(epochs=2, enable_pruning=False, pruner_type="none",
                                        storage="memory"))
  start = time.perf_counter()
  value = run_trial(trial, cfg)
  seconds.append(time.perf_counter() - start)
  if trial.number == 0:
    first.update(counts)
  return value
first = collections.Counter()
study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
study.optimize(objective, n_trials=2)
steps = ("jit(_train_step)", "jit(_eval_step)")
print("RESULT" + json.dumps({"seconds": seconds, "first_compiles": [first[s] for s in steps],
                             "all_compiles": [counts[s] for s in steps],
                             "module": orchard_jax.__file__}))
'''


def checkout_env(checkout: pathlib.Path) -> dict[str, str]:
  """A child's environment: ``orchard_jax`` from ``checkout``, on the CPU unless said, with no
  persistent compilation cache and no compile log."""
  env = {**os.environ, "PYTHONPATH": str(checkout), "JAX_PLATFORMS":
         os.environ.get("JAX_PLATFORMS", "cpu")}
  for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_LOG_COMPILES"):
    env.pop(key, None)
  return env


def checkout_arguments(parser: argparse.ArgumentParser) -> None:
  """``--old``, ``--new`` and ``--repeats``: the two checkouts and the rounds."""
  parser.add_argument("--old", type=pathlib.Path, required=True,
                      help="a checkout of the commit to compare with (git worktree add)")
  parser.add_argument("--new", type=pathlib.Path, default=ROOT)
  parser.add_argument("--repeats", type=int, default=3)


def child(checkout: pathlib.Path, model: str) -> dict:
  proc = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True,
                        env=checkout_env(checkout), cwd="/")
  if proc.returncode:
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"the {model} child of {checkout} failed ({proc.returncode})")
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
  where = pathlib.Path(out["module"]).resolve()
  if checkout.resolve() not in where.parents:
    raise SystemExit(f"the child imported {where}, not orchard_jax of {checkout}")
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  checkout_arguments(parser)
  parser.add_argument("--only", choices=MODELS)
  args = parser.parse_args()
  models = [args.only] if args.only else list(MODELS)
  runs = {(m, side): [] for m in models for side in ("old", "new")}
  for repeat in range(args.repeats):
    for model in models:
      order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
      for side in order:
        out = child(getattr(args, side), model)
        runs[model, side].append(out)
        print(f"  repeat {repeat + 1} {model:8s} {side}: first trial {out['seconds'][0]:.2f} s, "
              f"second {out['seconds'][1]:.2f} s, train/eval step compiles in the first trial "
              f"{out['first_compiles']}, in both {out['all_compiles']}", flush=True)
  print()
  print(f"{'model':9s} {'first trial old':>16s} {'new':>7s} {'new/old':>8s} {'ratios':>18s} "
        f"{'2nd trial new/old':>18s} {'compiles old':>13s} {'new':>6s}")
  for model in models:
    old, new = runs[model, "old"], runs[model, "new"]
    first = [n["seconds"][0] / o["seconds"][0] for o, n in zip(old, new)]
    second = [n["seconds"][1] / o["seconds"][1] for o, n in zip(old, new)]
    med = lambda rs, i: statistics.median(r["seconds"][i] for r in rs)
    print(f"{model:9s} {med(old, 0):15.2f}s {med(new, 0):6.2f}s {statistics.median(first):8.2f} "
          f"{min(first):8.2f}-{max(first):.2f} {statistics.median(second):18.2f} "
          f"{str(old[0]['all_compiles']):>13s} {str(new[0]['all_compiles']):>6s}")
  print("\nratios: per repeat, new / old first-trial seconds (min-max); compiles: XLA compiles "
        "of [train step, eval step] over both trials, from JAX's events")


if __name__ == "__main__":
  main()
