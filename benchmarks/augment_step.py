"""The cost of on-device augmentation in MiniCNN's training step, side by side in one run.

Three programs on the same batch (64 images of 28x28x1, MiniCNN, the
reference's default strengths: hflip 0.5, rotation 10, jitter 0.2, min_scale
0.9), timed in turn for ``--rounds`` rounds of ``--steps`` calls after a
warm-up:

* ``step``: ``orchard_jax.train_step`` on a state from ``create_train_state``
  without augmentation;
* ``step + augment``: the same step on a state built with
  ``augmentation=AugmentationConfig()`` (the step augments the gathered batch);
* ``step + augment (mean/std)``: the same on normalised inputs
  (``AugmentationConfig(mean=..., std=...)``: the step un-normalises, augments and
  normalises again);
* ``augment``: ``jax.jit(augment)`` alone on the batch.

Prints milliseconds per call (median of the rounds) and the medians of the
per-round ratios (augmented step / step, augment alone / step) with their
range. The issue's target: augmentation adds at most 15 % to the step.

  python benchmarks/augment_step.py [--rounds 15] [--steps 20] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax import AugmentationConfig, MiniCNN, create_train_state, train_step
from orchard_jax.core import augment as aug
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)

SIDE = 28
MEAN, STD = (0.5,), (0.25,)  # the normalised side's statistics


def _batch(size: int):
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.uniform(size=(size, SIDE, SIDE, 1)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32),
          "mask": jnp.ones(size, bool)}


def _state(augmentation):
  return create_train_state(MiniCNN(num_classes=10), input_shape=(SIDE, SIDE, 1), num_classes=10,
                            augmentation=augmentation)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=20, help="calls per round and program")
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  batch, config = _batch(args.batch), AugmentationConfig()
  states = {"step": _state(None), "step + augment": _state(config),
            "step + augment (mean/std)": _state(AugmentationConfig(mean=MEAN, std=STD))}
  params = aug.AugmentParams.create(config.hflip, config.rotation_angle, config.jitter_val, config.min_scale)
  spec = states["step + augment"].spec.augment
  augment = jax.jit(aug.augment, static_argnames="spec")
  keys = jax.random.split(jax.random.key(0), args.steps)

  def run(name):
    if name == "augment":
      for i in range(args.steps):
        out = augment(keys[i], batch["image"], params, spec=spec)
      return out
    for _ in range(args.steps):
      states[name], metrics = train_step(states[name], batch)
    return metrics

  names = ("step", "step + augment", "step + augment (mean/std)", "augment")
  for name in names:  # compile and warm up
    jax.block_until_ready(run(name))
  times = {name: [] for name in names}
  for r in range(args.rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      jax.block_until_ready(run(name))
      times[name].append((time.perf_counter() - start) / args.steps * 1e3)

  def ratio(name):
    ratios = [a / b for a, b in zip(times[name], times["step"])]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"

  device = jax.devices()[0]
  print(f"MiniCNN, batch {args.batch} of {SIDE}x{SIDE}x1, {device.platform} ({device.device_kind}), "
        f"{args.rounds} rounds of {args.steps} calls; ms per call (median):")
  print("  " + ", ".join(f"{name} {statistics.median(t):.3f}" for name, t in times.items()))
  print(f"  step + augment / step {ratio('step + augment')}; "
        f"step + augment (mean/std) / step {ratio('step + augment (mean/std)')}; "
        f"augment alone / step {ratio('augment')}")


if __name__ == "__main__":
  main()
