"""Training-step time and page faults with glibc's allocator tuned (the default) vs left alone.

Each measurement is a fresh process (the allocator is set when orchard_jax is
imported) that times MiniCNN's ``train_step`` on one device-resident batch
and counts the minor page faults per step. Tuned and system processes
alternate; the median of the per-pair ratios is printed (below 1.0: the tuned
allocator is faster).

  python benchmarks/host_malloc.py [--repeats 3] [--batches 16 64] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import orchard_jax
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)
import jax, jax.numpy as jnp, numpy as np
from orchard_jax import MiniCNN, create_train_state, train_step
batch_size, steps = int(sys.argv[1]), int(sys.argv[2])
state = create_train_state(MiniCNN(num_classes=10), input_shape=(28, 28, 1), num_classes=10,
                           mixup_alpha=0.0)
rng = np.random.default_rng(0)
batch = {"image": jnp.asarray(rng.normal(size=(batch_size, 28, 28, 1)), jnp.float32),
         "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
         "mask": jnp.ones(batch_size, bool)}
for _ in range(steps):  # compile, then let the heap settle
  state, metrics = train_step(state, batch)
jax.block_until_ready(metrics)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
for _ in range(steps):
  state, metrics = train_step(state, batch)
jax.block_until_ready(metrics)
seconds = (time.perf_counter() - start) / steps
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
print(json.dumps({"tuned": orchard_jax.hostmem.malloc_tuned(), "ms": 1e3 * seconds,
                  "faults": faults}))
"""


def _measure(batch_size: int, steps: int, choice: str) -> dict:
  env = {**os.environ, "ORCHARD_JAX_MALLOC": choice}
  out = subprocess.run([sys.executable, "-c", _CHILD, str(batch_size), str(steps)], env=env,
                       check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--steps", type=int, default=40)
  args = parser.parse_args()
  for batch_size in args.batches:
    rows = []
    for _ in range(args.repeats):
      tuned = _measure(batch_size, args.steps, "tuned")
      system = _measure(batch_size, args.steps, "system")
      rows.append((tuned, system))
    ratios = [t["ms"] / s["ms"] for t, s in rows]
    med = lambda key, side: statistics.median(r[side][key] for r in rows)  # noqa: E731
    print(f"MiniCNN batch {batch_size:3d}: step tuned {med('ms', 0):6.1f} ms "
          f"({med('faults', 0):6.0f} faults)  system {med('ms', 1):6.1f} ms "
          f"({med('faults', 1):6.0f} faults)  ratio {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f})", flush=True)


if __name__ == "__main__":
  main()
