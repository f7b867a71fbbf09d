"""Does shrinking a cohort's compiled K pay when the budget runs out?

When a study's last trials leave a cohort's slots empty, its program still
steps all K members. Shrinking means compiling the programs of a smaller K
(train and eval steps, and the refill program) and moving the live members
into it. For each model, this script measures side by side, in one process:

* the steady-state training step of a cohort of K and of K' (the live
  members), at the same batch;
* the seconds XLA spends compiling the K' training and evaluation steps
  (JAX's ``/jax/core/compile/backend_compile_duration`` events);

and prints the epochs after which shrinking would pay back its compiles:
``compile seconds / (steps per epoch * (step(K) - step(K')))``. A study
would shrink only if its last trials had more epochs left than that.

Run::

  python benchmarks/cohort_shrink.py [--only tabular mini_cnn]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import orchard_jax
from orchard_jax import MLP, MiniCNN, create_train_state
from orchard_jax.core import cohort

COMPILE = "/jax/core/compile/backend_compile_duration"
CASES = {  # name: (model, input shape, classes, batch, steps per epoch, K, K')
    "tabular": (lambda: MLP(num_classes=2, hidden=(64, 64)), (30,), 2, 32, 15, 8, 2),
    "mini_cnn": (lambda: MiniCNN(num_classes=10), (8, 8, 1), 10, 32, 48, 4, 1),
}


def states(model, shape, classes, k):
  return [create_train_state(model, input_shape=shape, num_classes=classes, seed=0,
                             learning_rate=0.01 * (i + 1), optimizer="sgd", momentum=0.9,
                             weight_decay=0.0, grad_clip=1.0) for i in range(k)]


def step_seconds(state, batch, repeats=60) -> float:
  for _ in range(3):
    state, sums = cohort.cohort_train_step(state, batch)
  jax.block_until_ready(sums)
  times = []
  for _ in range(repeats):
    begin = time.perf_counter()
    state, sums = cohort.cohort_train_step(state, batch)
    jax.block_until_ready(sums)
    times.append(time.perf_counter() - begin)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", nargs="*", choices=sorted(CASES), default=list(CASES))
  args = parser.parse_args()
  orchard_jax.tune_host_memory()
  compiled: list[float] = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kw: compiled.append(seconds) if event == COMPILE else None)
  print(f"{'case':9} {'K':>2} {'step ms':>8} {'K2':>3} {'step ms':>8} {'K2 compile s':>12} "
        f"{'steps/epoch':>11} {'pays after':>11}")
  for name in args.only:
    make, shape, classes, batch_size, steps, k, k2 = CASES[name]
    model = make()
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(batch_size, *shape)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, classes, batch_size), jnp.int32),
             "mask": jnp.ones(batch_size, bool)}
    big = cohort.stack(states(model, shape, classes, k))
    small = cohort.stack(states(model, shape, classes, k2))
    t_big = step_seconds(big, batch)
    del compiled[:]
    eval_batch = {**batch}
    jax.block_until_ready(cohort.cohort_eval_step(small, eval_batch))
    t_small = step_seconds(small, batch)
    compile_s = sum(compiled)  # the K2 training and evaluation steps (and their setters)
    saved = steps * (t_big - t_small)
    epochs = compile_s / saved if saved > 0 else float("inf")
    print(f"{name:9} {k:>2} {t_big * 1e3:>8.2f} {k2:>3} {t_small * 1e3:>8.2f} {compile_s:>12.2f} "
          f"{steps:>11} {epochs:>8.1f} ep", flush=True)


if __name__ == "__main__":
  main()
