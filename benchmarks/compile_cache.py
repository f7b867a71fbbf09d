"""First-trial compile time with and without JAX's persistent compilation cache.

Runs the same child process twice against one fresh cache directory: the
first fills the cache, the second should load every executable from it. Each
child builds a MiniCNN trial state (28x28x1, batch 64) and times
``lower().compile()`` of ``train_step`` and ``eval_step`` -- the compile cost a
first trial pays -- plus the whole first epoch-like sequence of one train and
one eval step. Prints both runs side by side and their ratio.

  python benchmarks/compile_cache.py
"""

import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from orchard_jax import MiniCNN, create_train_state, eval_step, train_step
t0 = time.perf_counter()
state = create_train_state(MiniCNN(num_classes=10), input_shape=(28, 28, 1), num_classes=10, mixup_alpha=0.2)
t_init = time.perf_counter() - t0
batch = {"image": jnp.zeros((64, 28, 28, 1)), "label": jnp.zeros(64, jnp.int32), "mask": jnp.ones(64, bool)}
t0 = time.perf_counter()
train_step.lower(state, batch).compile()
eval_step.lower(state, batch).compile()
t_compile = time.perf_counter() - t0
t0 = time.perf_counter()
state, m = train_step(state, batch)
out = eval_step(state, batch)
jax.block_until_ready((m, out))
t_first = time.perf_counter() - t0
print("RESULT" + json.dumps({"init": t_init, "compile": t_compile, "first_steps": t_first}))
'''


def run(cache_dir):
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", CHILD, cache_dir], capture_output=True, text=True,
                       env=env, check=True)
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
  return {**json.loads(line[6:]), "process": time.perf_counter() - start}


def main():
  with tempfile.TemporaryDirectory() as cache_dir:
    cold, warm = run(cache_dir), run(cache_dir)
  print(f"{'':22s}{'cold cache':>12s}{'warm cache':>12s}{'ratio':>8s}")
  for key, label in (("init", "create_train_state"), ("compile", "compile train+eval step"),
                     ("first_steps", "first train+eval step"), ("process", "whole process")):
    print(f"{label:22s}{cold[key]:11.3f}s{warm[key]:11.3f}s{warm[key] / cold[key]:8.3f}")


if __name__ == "__main__":
  main()
