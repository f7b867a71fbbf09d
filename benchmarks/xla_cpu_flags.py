"""MiniCNN training-epoch time on XLA:CPU under candidate XLA flags, vs no flags.

Each flag set runs in its own process (XLA reads ``XLA_FLAGS`` once), timing
a device-fed epoch of ``train_step`` (4096 samples of 28x28x1, batch 64) and
an ``eval_step`` pass (batch 256) after a warm-up. Processes alternate with a
no-flags baseline, and each line gives the median ratio flags / baseline over
``--repeats`` pairs. Only flags that keep float32 semantics are listed (no
fast-math).

  python benchmarks/xla_cpu_flags.py [--repeats 3] [--batch 64]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CANDIDATES = {
    "vector width 512": "--xla_cpu_prefer_vector_width=512",
    "oneDNN dot fusions": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "XNNPACK dots and convolutions":
        "--xla_cpu_experimental_xnn_fusion_type=individual_dot,individual_convolution",
    "YNNPACK dots and convolutions":
        "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution",
    "concurrency-optimised scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
}

CHILD = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from orchard_jax import MiniCNN, create_train_state, eval_step, train_step
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)
batch_size, samples = int(sys.argv[1]), 4096
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(samples, 28, 28, 1)).astype(np.float32))
y = jnp.asarray(rng.integers(0, 10, samples).astype(np.int32))
state = create_train_state(MiniCNN(num_classes=10), input_shape=(28, 28, 1), num_classes=10)
def batches(b):
  return [{"image": x[i:i + b], "label": y[i:i + b], "mask": jnp.ones(b, bool)}
          for i in range(0, samples, b)]
train, val = batches(batch_size), batches(256)
for b in train[:2]:
  state, m = train_step(state, b)
jax.block_until_ready(eval_step(state, val[0]))
times = {"train": [], "eval": []}
for _ in range(2):
  t = time.perf_counter()
  for b in train:
    state, m = train_step(state, b)
  jax.block_until_ready(m)
  times["train"].append(time.perf_counter() - t)
  t = time.perf_counter()
  out = [eval_step(state, b)["loss_sum"] for b in val]
  jax.block_until_ready(out)
  times["eval"].append(time.perf_counter() - t)
print("RESULT" + json.dumps({k: min(v) for k, v in times.items()}))
'''


def run(flags, batch):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = subprocess.run([sys.executable, "-c", CHILD, str(batch)], capture_output=True, text=True,
                       env=env)
  if out.returncode != 0:
    return None, out.stderr.strip().splitlines()[-1][:160]
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[6:]), None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--only", nargs="*", default=None, help="names of CANDIDATES to run")
  args = parser.parse_args()
  for name, flags in CANDIDATES.items():
    if args.only and name not in args.only:
      continue
    ratios = {"train": [], "eval": []}
    error = None
    for _ in range(args.repeats):
      base, _ = run("", args.batch)
      got, error = run(flags, args.batch)
      if got is None:
        break
      for k in ratios:
        ratios[k].append(got[k] / base[k])
    if error:
      print(f"{name:34s} failed: {error}", flush=True)
      continue
    print(f"{name:34s} train {statistics.median(ratios['train']):.3f} "
          f"({min(ratios['train']):.3f}-{max(ratios['train']):.3f})  eval "
          f"{statistics.median(ratios['eval']):.3f} ({min(ratios['eval']):.3f}-"
          f"{max(ratios['eval']):.3f})   [{flags}]", flush=True)


if __name__ == "__main__":
  main()
