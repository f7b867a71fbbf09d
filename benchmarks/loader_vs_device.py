"""Loader-fed epoch vs the same steps on data already on the device.

Prints, for MiniCNN and the MLP on 28x28x1 inputs at batch 64, the median
ratio of a ``train_epoch`` fed by a torch DataLoader to a Python loop of
``train_step`` over pre-built device batches, measured side by side
(alternating, after warm-up) in one run. Target: <= 1.10.

  python benchmarks/loader_vs_device.py [--samples 4096] [--repeats 5]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from orchard_jax import MLP, MiniCNN, create_train_state, train_epoch, train_step
from orchard_jax import tune_host_memory
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)


def device_epoch(state, batches):
  metrics = None
  for batch in batches:
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  return state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.samples, 1, 28, 28)).astype(np.float32)
  y = rng.integers(0, 10, args.samples)
  loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=args.batch)
  batches = [{"image": jnp.asarray(np.transpose(x[i:i + args.batch], (0, 2, 3, 1))),
              "label": jnp.asarray(y[i:i + args.batch], jnp.int32),
              "mask": jnp.ones(args.batch, bool)} for i in range(0, args.samples, args.batch)]
  print(f"backend={jax.default_backend()} samples={args.samples} batch={args.batch} "
        f"repeats={args.repeats}")
  for name, model in (("mini_cnn", MiniCNN(num_classes=10)), ("mlp", MLP(num_classes=10))):
    state = create_train_state(model, input_shape=(28, 28, 1), num_classes=10, mixup_alpha=0.0)
    state = device_epoch(state, batches[:2])  # compile
    state, _ = train_epoch(state, loader)
    ratios, dev_times, loader_times = [], [], []
    for _ in range(args.repeats):
      start = time.perf_counter()
      state = device_epoch(state, batches)
      dev = time.perf_counter() - start
      start = time.perf_counter()
      state, _ = train_epoch(state, loader)  # ends with its one host sync
      fed = time.perf_counter() - start
      dev_times.append(dev)
      loader_times.append(fed)
      ratios.append(fed / dev)
    print(f"{name:9s} device-fed {statistics.median(dev_times):.3f}s  loader-fed "
          f"{statistics.median(loader_times):.3f}s  ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
  main()
