"""MiniCNN's training step with the convolution lowering chosen per layer vs im2col everywhere.

``ORCHARD_JAX_CONV=auto`` (the default) measures each convolution layer of a training step
once, forward and backward with each lowering, and keeps the faster
(``orchard_jax.models.conv_choice``); ``im2col`` is the rule before that (im2col in every
training step on XLA:CPU). Printed, in one process:

* the lowering chosen for each layer, and the seconds to trace and compile each side
  (``auto``'s include measuring its three layers);
* per batch size, the milliseconds of ``--steps`` training steps of each side, timed in
  turn for ``--rounds`` rounds after a warm-up, and the median of the per-round ratios
  auto / im2col (below 1.0: the choice is faster), with its range.

  python benchmarks/conv_lowering.py [--rounds 9] [--steps 32] [--batch 64 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax import MiniCNN, create_train_state
from orchard_jax.core import conv_choice, steps
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)


def _compiled(setting: str, state, batch):
  """The training step traced and compiled with ``ORCHARD_JAX_CONV=setting``."""
  previous = os.environ.get(conv_choice.ENV)
  os.environ[conv_choice.ENV] = setting
  try:
    return jax.jit(lambda s, b: steps._train_step(s, b)).lower(state, batch).compile()
  finally:
    if previous is None:
      del os.environ[conv_choice.ENV]
    else:
      os.environ[conv_choice.ENV] = previous


def _run(step, state, batch, n: int):
  for _ in range(n):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--batch", type=int, nargs="+", default=[64, 16])
  args = parser.parse_args()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  rng = np.random.default_rng(0)
  for size in args.batch:
    batch = {"image": jnp.asarray(rng.normal(size=(size, 28, 28, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32),
             "mask": jnp.ones(size, bool)}
    state = create_train_state(MiniCNN(num_classes=10), input_shape=(28, 28, 1), num_classes=10,
                               mixup_alpha=0.0)
    start = time.perf_counter()
    auto = _compiled("auto", state, batch)
    took = time.perf_counter() - start
    start = time.perf_counter()
    im2col = _compiled("im2col", state, batch)
    plain = time.perf_counter() - start
    chosen = {k.input_shape: v for k, v in conv_choice._choices.items()  # pylint: disable=protected-access
              if k.input_shape[0] == size}
    print(f"batch {size}: chosen {chosen}; measured and compiled in {took:.2f} s, im2col "
          f"compiled in {plain:.2f} s")
    sides = {"auto": [auto, state], "im2col": [im2col, state]}
    for side in sides.values():
      side[1] = _run(side[0], side[1], batch, 3)
    times, ratios = {name: [] for name in sides}, []
    for round_ in range(args.rounds):
      order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
      for name in order:
        t = time.perf_counter()
        sides[name][1] = _run(sides[name][0], sides[name][1], batch, args.steps)
        times[name].append((time.perf_counter() - t) / args.steps * 1000)
      ratios.append(times["auto"][-1] / times["im2col"][-1])
    print(f"  ms per step: auto {statistics.median(times['auto']):.2f}  im2col "
          f"{statistics.median(times['im2col']):.2f}  auto/im2col {statistics.median(ratios):.3f}"
          f" ({min(ratios):.3f}-{max(ratios):.3f})", flush=True)


if __name__ == "__main__":
  main()
