"""First-trial compile time with a cold cache, JAX's persistent cache, and executables.

Each child process builds a MiniCNN trial state (28x28x1, batch 64) and gets
the compiled ``train_step`` and ``eval_step`` the way an epoch does
(``orchard_jax.engine.executables.compiled``) -- the compile cost a first trial
pays -- then runs one train and one eval step. Each repeat runs two pairs of
processes, each pair on a fresh cache directory: a cold and a warm process
with only JAX's persistent cache (the warm one still traces and lowers every
program to look it up), and a cold and a warm process with orchard_jax's
executable cache on (the warm one loads the executables without tracing, the
steps ahead of being asked for). Medians over ``--repeats`` fresh
directories.

  python benchmarks/compile_cache.py [--repeats 3]
"""

import argparse
import json
import os
import subprocess
import sys
import statistics
import tempfile
import time

CHILD = r'''
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from orchard_jax import MiniCNN, create_train_state, eval_step, train_step
from orchard_jax.engine import executables
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)
if sys.argv[2] == "on":
  executables.set_cache_dir(os.path.join(sys.argv[1], "executables"))
t0 = time.perf_counter()
state = create_train_state(MiniCNN(num_classes=10), input_shape=(28, 28, 1), num_classes=10, mixup_alpha=0.2)
jax.block_until_ready(state)
t_init = time.perf_counter() - t0
batch = {"image": jnp.zeros((64, 28, 28, 1)), "label": jnp.zeros(64, jnp.int32), "mask": jnp.ones(64, bool)}
t0 = time.perf_counter()
step = executables.compiled(train_step, (state, batch), name="train_step", model=state.spec.model)
evaluate = executables.compiled(eval_step, (state, batch), name="eval_step", model=state.spec.model)
t_compile = time.perf_counter() - t0
t0 = time.perf_counter()
state, m = step(state, batch)
out = evaluate(state, batch)
jax.block_until_ready((m, out))
t_first = time.perf_counter() - t0
print("RESULT" + json.dumps({"init": t_init, "compile": t_compile, "first_steps": t_first,
                             "stats": executables.stats()}))
'''


def run(cache_dir, executable_cache):
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", CHILD, cache_dir, executable_cache],
                       capture_output=True, text=True, env=env, check=True)
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
  return {**json.loads(line[6:]), "process": time.perf_counter() - start}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  rows = {"cold": [], "jax": [], "exe": []}
  for _ in range(args.repeats):
    with tempfile.TemporaryDirectory() as jax_only, tempfile.TemporaryDirectory() as both:
      run(jax_only, "off")                         # fills JAX's persistent cache
      rows["jax"].append(run(jax_only, "off"))     # warm: JAX's cache only
      rows["cold"].append(run(both, "on"))         # fills the executable cache
      rows["exe"].append(run(both, "on"))          # warm: executables load without tracing
  print(f"{'':26s}{'cold':>9s}{'warm, JAX cache':>17s}{'warm, + executables':>21s}"
        f"{'exe/cold':>10s}")
  for rs in rows.values():  # jit compiles on the first call where nothing is loaded
    for r in rs:
      r["to_first"] = r["compile"] + r["first_steps"]
  for key, label in (("init", "create_train_state"), ("compile", "compile train+eval step"),
                     ("first_steps", "first train+eval step"),
                     ("to_first", "compile + first steps"), ("process", "whole process")):
    med = {k: statistics.median(r[key] for r in v) for k, v in rows.items()}
    lo, hi = (f(r[key] for r in rows["exe"]) for f in (min, max))
    print(f"{label:26s}{med['cold']:8.3f}s{med['jax']:16.3f}s{med['exe']:13.3f}s "
          f"({lo:.3f}-{hi:.3f}){med['exe'] / med['cold']:8.3f}")
  first = rows["exe"][-1]
  print(f"warm process, init + compile (the first trial's compile cost): "
        f"{statistics.median(r['init'] + r['compile'] for r in rows['exe']):.3f}s; "
        f"executables: {first['stats']}")


if __name__ == "__main__":
  main()
