"""Train MiniCNN on scikit-learn's bundled digits with the pure core.

No network needed: the 8x8 digits ship with scikit-learn. The learning rate
of each epoch comes from a cosine schedule and is written into the state, so
the step compiles once.

  python examples/train_digits.py
"""

import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from orchard_jax import LRController, MiniCNN, TrainingConfig, evaluate, state_from_config, train_epoch
from orchard_jax.data import make_loader


def digits_loaders(batch_size: int, seed: int = 0):
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[:, None]  # NCHW, as a torch pipeline gives
  labels = digits.target.astype(np.int64)
  order = np.random.default_rng(seed).permutation(len(labels))
  train, val = order[:1400], order[1400:]
  make = lambda idx, shuffle: make_loader(
      TensorDataset(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])), batch_size,
      shuffle=shuffle, seed=seed)
  return make(train, True), make(val, False)


def main():
  cfg = TrainingConfig(epochs=8, batch_size=32, learning_rate=0.05, mixup_epochs=3, use_amp=False)
  train_loader, val_loader = digits_loaders(cfg.batch_size)
  state = state_from_config(MiniCNN(num_classes=10), cfg, input_shape=(8, 8, 1), num_classes=10)
  lr = LRController(cfg.scheduler_type, learning_rate=cfg.learning_rate, min_lr=cfg.min_lr,
                    epochs=cfg.epochs, step_size=cfg.step_size, factor=cfg.scheduler_factor,
                    patience=cfg.scheduler_patience, monitor_direction=cfg.monitor_direction)
  for epoch in range(1, cfg.epochs + 1):
    start = time.perf_counter()
    state = state.with_learning_rate(lr.lr_for_epoch(epoch)).with_mixup(epoch <= cfg.mixup_epochs)
    state, loss = train_epoch(state, train_loader, epoch=epoch)
    metrics = evaluate(state, val_loader, epoch=epoch)
    lr.step(metrics[cfg.monitor_metric])
    print(f"epoch {epoch}/{cfg.epochs}  loss {loss:.4f}  val acc {metrics['accuracy']:.4f}  "
          f"auc {metrics['auc']:.4f}  f1 {metrics['f1']:.4f}  ({time.perf_counter() - start:.2f}s)")


if __name__ == "__main__":
  main()
