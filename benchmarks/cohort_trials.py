"""Whole trials in cohorts vs the same trials one by one, through the Python API.

Each case trains the same ``n`` Optuna trials (enqueued learning rates, no
pruning) twice in one fresh process each time: with
``orchard_jax.engine.driver.optimize(study, configure, n, cohort_size=K)`` and
with ``cohort_size=1`` (``run_trial`` one trial at a time). Every child is a
cold process with no persistent compilation cache, so the figures include
the first trial's compiles: what a user waits for. The two sides alternate,
one child at a time; the script prints each side's median seconds and the
throughput ratio (one-by-one seconds / cohort seconds).

Cases (``--only`` picks some):

* ``tabular``: 8 trials of an MLP 30-64-64-2 on scikit-learn's
  breast_cancer (455 training rows, batch 32, 10 epochs), K = 8;
* ``mini_cnn``: 4 MiniCNN trials on scikit-learn's digits (8x8, 1527
  training rows, batch 32, 6 epochs), K = 4;
* ``mlp784``: 4 trials of an MLP 784-256-256-10 on 28x28 images (1024
  training rows, batch 64, 3 epochs), K = 4;
* ``conv``: 4 trials of a user's Linen CNN (two ``nn.Conv`` layers, 16 and 32
  channels) on digits as ``mini_cnn``, K = 4.

``--programs vmap`` or ``serial`` forces the cohort's programs
(``ORCHARD_JAX_COHORT_PROGRAMS``; default ``auto``, the rule of
:func:`orchard_jax.engine.programs.programs`), to measure the rule itself.

Run::

  python benchmarks/cohort_trials.py [--repeats 3] [--only tabular mini_cnn] [--programs vmap]
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
CASES = {"tabular": (8, 8), "mini_cnn": (4, 4), "mlp784": (4, 4), "conv": (4, 4)}  # (trials, K)

CHILD = r'''
import json, sys, time
started = time.perf_counter()
import numpy as np, optuna, torch
import orchard_jax
from orchard_jax import MLP, MiniCNN, OptunaConfig, TrainingConfig, TrialConfig
from orchard_jax.data import make_loader
from orchard_jax import optimize
orchard_jax.tune_host_memory()
case, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
optuna.logging.set_verbosity(optuna.logging.WARNING)
rng = np.random.default_rng(0)
if case == "tabular":
  from sklearn.datasets import load_breast_cancer
  x, y = load_breast_cancer(return_X_y=True)
  x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
  order = rng.permutation(len(y)); x, y = x[order], y[order]
  split = int(0.8 * len(y))
  data = (x[:split], y[:split]), (x[split:], y[split:])
  model, classes, batch, epochs, shape = MLP(num_classes=2, hidden=(64, 64)), 2, 32, 10, (30,)
elif case in ("mini_cnn", "conv"):
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
  order = rng.permutation(len(y)); x, y = x[order], y[order]
  split = int(0.85 * len(y))
  data = (x[:split], y[:split]), (x[split:], y[split:])
  if case == "mini_cnn":
    model = MiniCNN(num_classes=10)
  else:  # a user's Linen CNN: flax's own convolutions, which XLA:CPU groups under vmap
    import flax.linen as nn
    class ConvNet(nn.Module):
      @nn.compact
      def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))
    model = orchard_jax.as_model(ConvNet())
  classes, batch, epochs, shape = 10, 32, 6, (8, 8, 1)
else:
  def images(m):
    labels = rng.integers(0, 10, m)
    out = rng.normal(0.0, 1.0, (m, 1, 28, 28)).astype(np.float32)
    out[np.arange(m), 0, 2 * labels, :] += 2.0
    return out, labels
  data = images(1024), images(256)
  model, classes, batch, epochs, shape = MLP(num_classes=10, hidden=(256, 256)), 10, 64, 3, None
(tx, ty), (vx, vy) = data
TD = torch.utils.data.TensorDataset
train = make_loader(TD(torch.from_numpy(tx), torch.from_numpy(ty)), batch_size=batch,
                    shuffle=True, seed=0)
val = make_loader(TD(torch.from_numpy(vx), torch.from_numpy(vy)), batch_size=256, shuffle=False)
def configure(trial):
  lr = trial.suggest_float("learning_rate", 1e-3, 0.3, log=True)
  return TrialConfig(model=model, train_loader=train, val_loader=val, num_classes=classes,
                     input_shape=shape, log_interval=100,
                     training=TrainingConfig(batch_size=batch, learning_rate=lr, use_amp=False,
                                             use_tqdm=False, mixup_alpha=0.0, epochs=epochs,
                                             scheduler_type="cosine"),
                     optuna=OptunaConfig(epochs=epochs, enable_pruning=False, pruner_type="none",
                                         storage="memory"))
def trials():
  study = optuna.create_study(direction="maximize")
  for lr in np.geomspace(0.005, 0.2, n):
    study.enqueue_trial({"learning_rate": float(lr)})
  optimize(study, configure, n_trials=n, cohort_size=k)
  assert all(t.state.name == "COMPLETE" for t in study.trials)
  return max(t.value for t in study.trials)
best = trials()
cold = time.perf_counter() - started  # the process, its imports and first trials
begun = time.perf_counter()
trials()  # the same trials again: what later trials of a study cost
print(json.dumps({"cold": cold, "warm": time.perf_counter() - begun, "best": best}))
'''


def child(case: str, n: int, k: int, programs: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
         "PYTHONPATH": str(ROOT), "ORCHARD_JAX_COHORT_PROGRAMS": programs}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, "-c", CHILD, case, str(n), str(k)], env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f"{case} K={k} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--only", nargs="*", choices=sorted(CASES), default=list(CASES))
  parser.add_argument("--programs", choices=("auto", "vmap", "serial"), default="auto")
  args = parser.parse_args()
  print(f"cohort programs: {args.programs}")
  print(f"{'case':10} {'trials':>6} {'K':>3} {'cold: one by one':>17} {'cohort':>7} "
        f"{'ratio':>6} {'warm: one by one':>17} {'cohort':>7} {'ratio':>6}  best (1 by 1 / cohort)")
  for case in args.only:
    n, k = CASES[case]
    solo, cohort = [], []
    for _ in range(args.repeats):
      solo.append(child(case, n, 1, args.programs))
      cohort.append(child(case, n, k, args.programs))
    cells = []
    for key in ("cold", "warm"):
      s = statistics.median(r[key] for r in solo)
      c = statistics.median(r[key] for r in cohort)
      cells.append(f"{s:>16.2f}s {c:>6.2f}s {s / c:>5.2f}x")
    print(f"{case:10} {n:>6} {k:>3} {' '.join(cells)}  {solo[0]['best']:.4f} / "
          f"{cohort[0]['best']:.4f}", flush=True)


if __name__ == "__main__":
  main()
