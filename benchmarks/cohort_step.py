"""K trials in one vmapped step vs the same K trials stepped one by one, side by side in one process.

Each case builds K states of one spec (seeds and learning rates differ per
member) twice: once stacked into a cohort (``orchard_jax.core.cohort``),
once as K solo states. A round runs ``--steps`` cohort steps, then
``--steps`` times the K solo steps in turn, all on one batch, after a
warm-up that excludes compilation. The printed ratio is the cohort's
throughput (members x samples per second) over the solo steps', i.e. solo
time / cohort time: median of ``--rounds`` rounds, with its range.

Cases: the tabular MLP 30-64-64-2 at batch 32 (K = 1, 4, 8) and MiniCNN on
8x8x1 inputs at batch 32 (K = 4), training steps; the same evaluation steps
(forward only: MiniCNN's first convolution then runs as XLA's own
convolution, grouped under vmap); and an ``active`` mask (the cohort step
followed by ``jnp.where(active, new, old)`` over every leaf) against the
plain cohort step, which is what leaving the mask out saves.

  python benchmarks/cohort_step.py [--rounds 15] [--steps 40] [--mixup-alpha 0.2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax import MLP, MiniCNN, create_train_state
from orchard_jax.core import cohort as co
from orchard_jax.core import steps
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)


def _batch(size: int, shape: tuple[int, ...], classes: int):
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.normal(size=(size, *shape)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, classes, size), jnp.int32),
          "mask": jnp.ones(size, bool)}


def _states(model, shape, classes, k, alpha):
  return [create_train_state(model, input_shape=shape, num_classes=classes, seed=j,
                             learning_rate=0.002 * (j + 1), mixup_alpha=alpha) for j in range(k)]


def _masked_step(cohort, batch, active_K):
  """The cohort step, then each member's old state where ``active_K`` is False."""
  new, metrics = jax.vmap(steps._train_step, in_axes=(0, None))(cohort, batch)

  def keep(n, o):
    if jnp.issubdtype(n.dtype, jax.dtypes.prng_key):
      return n  # the step does not change keys
    return jnp.where(active_K.reshape(-1, *([1] * (n.ndim - 1))), n, o)

  return jax.tree.map(keep, new, cohort), metrics


masked_step = jax.jit(_masked_step, donate_argnums=0)


def _time(run, steps_per_round):
  start = time.perf_counter()
  jax.block_until_ready(run(steps_per_round))
  return time.perf_counter() - start


def _side_by_side(name, new, old, members_x_samples, steps_per_round, rounds):
  """``new`` and ``old`` are ``run(n) -> outputs``; prints old time / new time per round."""
  for run in (new, old):  # compile and warm up
    jax.block_until_ready(run(3))
  times = ([], [])
  for _ in range(rounds):
    times[0].append(_time(new, steps_per_round))
    times[1].append(_time(old, steps_per_round))
  ratios = [b / a for a, b in zip(*times)]
  per_step = [statistics.median(t) / steps_per_round * 1e3 for t in times]
  print(f"{name:40s} new {per_step[0]:7.3f} ms  old {per_step[1]:7.3f} ms  "
        f"({members_x_samples / per_step[0] * 1e3:9.0f} vs {members_x_samples / per_step[1] * 1e3:9.0f}"
        f" member-samples/s)  throughput new/old {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f})", flush=True)


class _Train:
  """Mutable holders for the donated states of both sides."""

  def __init__(self, states, cohort, batch):
    self.solo, self.cohort, self.batch = states, cohort, batch

  def cohort_steps(self, n):
    for _ in range(n):
      self.cohort, metrics = co.cohort_train_step(self.cohort, self.batch)
    return metrics

  def solo_steps(self, n):
    for _ in range(n):
      for j, state in enumerate(self.solo):
        self.solo[j], metrics = steps.train_step(state, self.batch)
    return metrics


def _train_case(name, model, shape, classes, k, batch_size, alpha, n, rounds):
  batch = _batch(batch_size, shape, classes)
  side = _Train(_states(model, shape, classes, k, alpha), co.stack(_states(model, shape, classes, k, alpha)),
                batch)
  _side_by_side(f"train {name} K={k}, cohort / solo", side.cohort_steps, side.solo_steps,
                k * batch_size, n, rounds)


def _eval_case(name, model, shape, classes, k, batch_size, alpha, n, rounds):
  batch = _batch(batch_size, shape, classes)
  solo = _states(model, shape, classes, k, alpha)
  cohort = co.stack(solo)

  def cohort_evals(m):
    return [co.cohort_eval_step(cohort, batch)["loss_sum"] for _ in range(m)]

  def solo_evals(m):
    return [steps.eval_step(state, batch)["loss_sum"] for _ in range(m) for state in solo]

  _side_by_side(f"eval {name} K={k}, cohort / solo", cohort_evals, solo_evals, k * batch_size, n,
                rounds)


def _mask_case(name, model, shape, classes, k, batch_size, alpha, n, rounds):
  batch = _batch(batch_size, shape, classes)
  active = jnp.asarray(np.arange(k) < k - 1)  # one empty slot
  holders = {"plain": co.stack(_states(model, shape, classes, k, alpha)),
             "masked": co.stack(_states(model, shape, classes, k, alpha))}

  def plain(m):
    for _ in range(m):
      holders["plain"], metrics = co.cohort_train_step(holders["plain"], batch)
    return metrics

  def masked(m):
    for _ in range(m):
      holders["masked"], metrics = masked_step(holders["masked"], batch, active)
    return metrics

  _side_by_side(f"active mask {name} K={k}, plain / masked", plain, masked, k * batch_size, n,
                rounds)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=40, help="MLP steps per round (MiniCNN: a quarter)")
  parser.add_argument("--mixup-alpha", type=float, default=0.2,
                      help="0 builds states whose step has no MixUp (TrainingConfig's default: 0.2)")
  args = parser.parse_args()
  mlp = ("MLP 30-64-64-2 b32", MLP(num_classes=2, hidden=(64, 64)), (30,), 2)
  cnn = ("MiniCNN 8x8 b32", MiniCNN(num_classes=10), (8, 8, 1), 10)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, mixup_alpha {args.mixup_alpha}, "
        f"{args.rounds} rounds", flush=True)
  common = dict(batch_size=32, alpha=args.mixup_alpha, rounds=args.rounds)
  for k in (1, 4, 8):
    _train_case(*mlp, k=k, n=args.steps, **common)
  _train_case(*cnn, k=4, n=max(1, args.steps // 4), **common)
  _eval_case(*mlp, k=8, n=args.steps, **common)
  _eval_case(*cnn, k=4, n=max(1, args.steps // 4), **common)
  _mask_case(*mlp, k=8, n=args.steps, **common)
  _mask_case(*cnn, k=4, n=max(1, args.steps // 4), **common)


if __name__ == "__main__":
  main()
