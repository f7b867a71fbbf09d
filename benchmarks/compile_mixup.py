"""Compile time of MiniCNN's training step with and without MixUp, side by side.

A state built with ``mixup_alpha=0`` (or from a config with ``mixup_epochs=0``)
has ``spec.mixup`` False, and its training step leaves MixUp out: no Gamma
sampler, no permutation. Each round traces, lowers and compiles both steps
anew (JAX's caches cleared, persistent cache off), alternating the order, and
checks that three steps of each give bit-equal parameters (MixUp switched off
in the other). Prints seconds per compile (median, min-max) and the ratio.

  python benchmarks/compile_mixup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax.core.state import create_train_state
from orchard_jax.core.steps import _train_step
from orchard_jax.models import build_model
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)


def compile_seconds(state, batch) -> float:
  jax.clear_caches()
  start = time.perf_counter()
  jax.jit(lambda s, b: _train_step(s, b)).lower(state, batch).compile()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  rng = np.random.default_rng(0)
  for side, size in ((8, 32), (28, 64)):
    model = build_model("mini_cnn", num_classes=10, dropout=0.1, in_channels=1, resolution=side)
    states = {name: create_train_state(model, input_shape=(side, side, 1), num_classes=10,
                                       seed=0, mixup_alpha=alpha)
              for name, alpha in (("with MixUp", 0.2), ("without", 0.0))}
    batch = {"image": jnp.asarray(rng.normal(size=(size, side, side, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32),
             "mask": jnp.arange(size) < size - 3}
    times = {name: [] for name in states}
    for r in range(args.rounds):
      for name in (list(states) if r % 2 == 0 else list(states)[::-1]):
        times[name].append(compile_seconds(states[name], batch))
    a, b = states["with MixUp"].with_mixup(False), states["without"]
    step = jax.jit(_train_step)
    for _ in range(3):
      a, _ = step(a, batch)
      b, _ = step(b, batch)
    equal = all(jax.tree.leaves(jax.tree.map(np.array_equal, a.params, b.params)))
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"MiniCNN {side}x{side}x1, batch {size}: " + ", ".join(
        f"{n} {med[n]:.2f} s ({min(t):.2f}-{max(t):.2f})" for n, t in times.items())
        + f"; without / with {med['without'] / med['with MixUp']:.2f}; "
          f"parameters after 3 steps bit-equal: {equal}")


if __name__ == "__main__":
  main()
