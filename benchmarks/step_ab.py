"""Two step-level changes, each A/B-timed in one process: the unit loss scale and BatchNorm's mask count.

* ``unit loss scale``: ``train_step`` with ``LossScale.static(1.0)`` (gradients
  returned as they are) vs the same state with ``unit=False`` (every gradient
  divided by 1.0). Same bits either way.
* ``BatchNorm count``: MiniCNN with ``orchard_jax.models.layers.BatchNorm``
  vs the same model built with ``flax.linen.BatchNorm``, whose masked mean sums
  the mask broadcast to each activation's full shape. Same bits either way.

Both sides are jitted from the same step function, run ``--steps`` steps in
turn for ``--rounds`` rounds after a warm-up, and the median of the per-round
ratios (new / old; below 1.0: the change is faster) is printed with its range.

  python benchmarks/step_ab.py [--rounds 15] [--steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from orchard_jax import MLP, MiniCNN, create_train_state
from orchard_jax.core import steps
from orchard_jax.models import mini_cnn
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)


def _batch(size: int):
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.normal(size=(size, 28, 28, 1)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32),
          "mask": jnp.ones(size, bool)}


def _state(model):
  return create_train_state(model, input_shape=(28, 28, 1), num_classes=10, mixup_alpha=0.0)


def _ab(name, new, old, batch, steps_per_round, rounds):
  """``new`` and ``old`` are (jitted step, state) pairs, timed in turn."""
  sides = [list(new), list(old)]
  for side in sides:  # compile and warm up
    for _ in range(3):
      side[1], metrics = side[0](side[1], batch)
    jax.block_until_ready(metrics)
  times = ([], [])
  for _ in range(rounds):
    for i, side in enumerate(sides):
      start = time.perf_counter()
      for _ in range(steps_per_round):
        side[1], metrics = side[0](side[1], batch)
      jax.block_until_ready(metrics)
      times[i].append((time.perf_counter() - start) / steps_per_round * 1e3)
  ratios = [a / b for a, b in zip(*times)]
  print(f"{name:34s} new {statistics.median(times[0]):7.3f} ms  old {statistics.median(times[1]):7.3f} ms"
        f"  new/old {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=100, help="MLP steps per round (MiniCNN: a tenth)")
  args = parser.parse_args()
  step = jax.jit(steps._train_step, donate_argnums=0)
  for label, model, size, n in (("MLP", MLP(num_classes=10), 64, args.steps),
                                ("MLP", MLP(num_classes=10), 16, args.steps),
                                ("MiniCNN", MiniCNN(num_classes=10), 16, max(1, args.steps // 10))):
    unit, divided = _state(model), _state(model)  # separate buffers: steps donate them
    divided = divided.replace(loss_scale=divided.loss_scale.replace(unit=False))
    _ab(f"unit loss scale, {label} batch {size}", (step, unit), (step, divided), _batch(size), n,
        args.rounds)

  flax_step = jax.jit(steps._train_step, donate_argnums=0)
  flax_state = _state(MiniCNN(num_classes=10))
  ours_state = _state(MiniCNN(num_classes=10))
  batch = _batch(64)
  mini_cnn.BatchNorm = nn.BatchNorm  # flax_step traces MiniCNN with flax's BatchNorm
  try:
    flax_state, metrics = flax_step(flax_state, batch)
    jax.block_until_ready(metrics)
  finally:
    from orchard_jax.models.layers import BatchNorm
    mini_cnn.BatchNorm = BatchNorm
  _ab("BatchNorm count, MiniCNN batch 64", (step, ours_state), (flax_step, flax_state), batch,
      max(1, args.steps // 10), args.rounds)


if __name__ == "__main__":
  main()
