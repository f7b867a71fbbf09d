"""Per-epoch time of orchard_jax vs the reference's torch loop, side by side.

Same work on both sides: MiniCNN (or the 784-256-256-10 MLP) on 28x28x1
inputs, 10 classes, 4096 training samples per epoch from the same torch
DataLoader, SGD + momentum + coupled weight decay + clipping, cosine schedule,
float32. Epochs alternate between the two implementations after a warm-up
(compilation excluded), and the median of the per-pair ratios is printed:
below 1.0 means orchard_jax is faster.

  python benchmarks/epoch_vs_torch.py [--repeats 5] [--samples 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as ref  # noqa: E402

import jax  # noqa: E402

from orchard_jax import MLP, LRController, MiniCNN, create_train_state, evaluate, train_epoch  # noqa: E402
from orchard_jax import tune_host_memory  # noqa: E402
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)


def _pairs(repeats, fn_a, fn_b):
  """Alternates a and b ``repeats`` times; returns median times and median ratio a/b."""
  ta, tb, ratios = [], [], []
  for _ in range(repeats):
    start = time.perf_counter()
    fn_a()
    a = time.perf_counter() - start
    start = time.perf_counter()
    fn_b()
    b = time.perf_counter() - start
    ta.append(a)
    tb.append(b)
    ratios.append(a / b)
  return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def bench(name, jax_model, torch_model, x, y, batch, repeats, epochs=60):
  dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
  loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
  val_loader = DataLoader(dataset, batch_size=256)
  state = create_train_state(jax_model, input_shape=(28, 28, 1), num_classes=10, mixup_alpha=0.0)
  lrs = LRController("cosine", learning_rate=0.008, min_lr=1e-6, epochs=epochs, step_size=20,
                     factor=0.1, patience=5, monitor_direction="maximize")
  opt, sched = ref.make_optimizer(torch_model, epochs=epochs)
  box = {"state": state, "epoch": 0}

  def ours():
    box["epoch"] += 1
    box["state"] = box["state"].with_learning_rate(lrs.lr_for_epoch(box["epoch"]))
    box["state"], _ = train_epoch(box["state"], loader, epoch=box["epoch"])
    lrs.step(None)

  def theirs():
    ref.train_epoch(torch_model, loader, opt, sched)

  def ours_val():
    evaluate(box["state"], val_loader)

  def theirs_val():
    probs, labels, loss_sum = ref.validate(torch_model, val_loader)
    preds = probs.argmax(1)
    roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    f1_score(labels, preds, average="macro", zero_division=0)

  ours(); theirs(); ours_val(); theirs_val()  # warm-up: compile, allocate
  a, b, r = _pairs(repeats, ours, theirs)
  print(f"{name:16s} train epoch  orchard_jax {a:6.3f}s  torch {b:6.3f}s  ratio {r:.3f}", flush=True)
  a, b, r = _pairs(repeats, ours_val, theirs_val)
  print(f"{name:16s} validation   orchard_jax {a:6.3f}s  torch {b:6.3f}s  ratio {r:.3f}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--samples", type=int, default=4096)
  parser.add_argument("--only", choices=["mini_cnn", "mlp"], default=None)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.samples, 1, 28, 28)).astype(np.float32)
  y = rng.integers(0, 10, args.samples)
  torch.manual_seed(0)
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), samples={args.samples}, repeats={args.repeats}")
  cases = [("mini_cnn b16", "mini_cnn", 16), ("mini_cnn b64", "mini_cnn", 64),
           ("mlp b64", "mlp", 64), ("mlp b16", "mlp", 16)]
  for name, kind, batch in cases:
    if args.only and kind != args.only:
      continue
    if kind == "mini_cnn":
      bench(name, MiniCNN(num_classes=10), ref.TorchMiniCNN(), x, y, batch, args.repeats)
    else:
      bench(name, MLP(num_classes=10), ref.torch_mlp(), x, y, batch, args.repeats)


if __name__ == "__main__":
  main()
