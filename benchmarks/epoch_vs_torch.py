"""Per-epoch time of orchard_jax vs the reference's torch loop, side by side.

Same work on both sides: MiniCNN (or the 784-256-256-10 MLP) on 28x28x1
inputs, 10 classes, 4096 training samples per epoch from the same torch
DataLoader, SGD + momentum + coupled weight decay + clipping, cosine schedule,
float32. Epochs alternate between the two implementations after a warm-up
(compilation excluded), and the median of the per-pair ratios is printed:
below 1.0 means orchard_jax is faster.

``--augment``: MiniCNN's training epoch with the reference's training
augmentation on both sides, on the same uint8 images. The torch side is the
reference's (orchard-ml 0.2.6, ``data_handler``): a Dataset whose
``__getitem__`` makes a PIL image of each sample and applies the training
pipeline of ``transforms.py`` (ToImage, ToDtype(scale), RandomHorizontalFlip(0.5),
RandomRotation(10), ColorJitter(0.2, 0.2, 0), RandomResizedCrop(28, (0.9, 1),
bilinear, antialias), Normalize), read by the DataLoader of ``loader.py`` in
trial mode: ``num_workers`` by ``get_num_workers`` (2 on up to 4 cores, capped
at 6 in trials), ``persistent_workers=False``, its ``worker_init_fn``,
``drop_last=True``, no pinned memory on the CPU, and torch's threads set by
``apply_cpu_threads``. The orchard_jax side reads the same images from a
TensorDataset (device-resident) and augments them inside the training step at
the same strengths, two ways: scaled to [0, 1] (``AugmentationConfig()``, as
the command line's sources are), and normalised once with the reference's
mean and std (``AugmentationConfig(mean=..., std=...)``: the step
un-normalises, augments in [0, 1] and normalises again, the reference's
order). Each round also times orchard_jax's epoch without augmentation on
the [0, 1] loader, for augmentation's share of the epoch.

  python benchmarks/epoch_vs_torch.py [--repeats 5] [--samples 4096]
  python benchmarks/epoch_vs_torch.py --augment [--repeats 5] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as ref  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.torchvision_cpu import import_functional  # noqa: E402  (torchvision on the CPU torch)

import jax  # noqa: E402

from orchard_jax import (MLP, AugmentationConfig, LRController, MiniCNN,  # noqa: E402
                         create_train_state, evaluate, train_epoch)
from orchard_jax import tune_host_memory  # noqa: E402
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)


def _rounds(repeats, *fns):
  """Runs ``fns`` in turn ``repeats`` times (reversed every other round); their times per round."""
  times = [[] for _ in fns]
  for r in range(repeats):
    for i in (range(len(fns)) if r % 2 == 0 or len(fns) == 2 else reversed(range(len(fns)))):
      start = time.perf_counter()
      fns[i]()
      times[i].append(time.perf_counter() - start)
  return times


def _pairs(repeats, fn_a, fn_b):
  """Alternates a and b ``repeats`` times; returns median times and median ratio a/b."""
  ta, tb = _rounds(repeats, fn_a, fn_b)
  return statistics.median(ta), statistics.median(tb), statistics.median(a / b for a, b in zip(ta, tb))


def _trainer(jax_model, loader, epochs, **state_kwargs):
  """orchard_jax's training epoch as a closure: a fresh state, the cosine schedule, one epoch per call."""
  state = create_train_state(jax_model, input_shape=(28, 28, 1), num_classes=10, mixup_alpha=0.0,
                             **state_kwargs)
  lrs = LRController("cosine", learning_rate=0.008, min_lr=1e-6, epochs=epochs, step_size=20,
                     factor=0.1, patience=5, monitor_direction="maximize")
  box = {"state": state, "epoch": 0}

  def run():
    box["epoch"] += 1
    box["state"] = box["state"].with_learning_rate(lrs.lr_for_epoch(box["epoch"]))
    box["state"], _ = train_epoch(box["state"], loader, epoch=box["epoch"])
    lrs.step(None)
  return run, box


def bench(name, jax_model, torch_model, x, y, batch, repeats, epochs=60):
  dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
  loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
  val_loader = DataLoader(dataset, batch_size=256)
  ours, box = _trainer(jax_model, loader, epochs)
  opt, sched = ref.make_optimizer(torch_model, epochs=epochs)

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


# ---- --augment: the reference's torchvision pipeline against augmentation in the step ----

def reference_workers(optuna: bool = True) -> int:
  """The reference's ``num_workers``: ``get_num_workers`` (core/environment/hardware.py),
  capped at 6 for a trial below 224 px (data_handler/loader.py, ``_OPTUNA_WORKERS_LOWRES``)."""
  cores = os.cpu_count() or 2
  workers = 2 if cores <= 4 else min(cores // 2, 8)
  return min(workers, 6) if optuna else workers


def reference_worker_init(worker_id: int) -> None:
  """The reference's ``worker_init_fn`` (core/environment/reproducibility.py)."""
  seed = (torch.utils.data.get_worker_info().seed + worker_id) % 2**32
  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)


def reference_train_transform(mean, std, size=28):
  """The reference's training pipeline for 1-channel data, neither anatomical nor texture-based,
  without RGB promotion, at the default strengths (data_handler/transforms.py)."""
  import_functional()
  from torchvision.transforms import v2
  return v2.Compose([
      v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
      v2.RandomHorizontalFlip(p=0.5), v2.RandomRotation(10),
      v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.0),
      v2.RandomResizedCrop(size=size, scale=(0.9, 1.0), antialias=True,
                           interpolation=v2.InterpolationMode.BILINEAR),
      v2.Normalize(mean=list(mean), std=list(std))])


class ReferenceImages(Dataset):
  """The reference's ``VisionDataset.__getitem__`` (data_handler/dataset.py): uint8 ``[N, H, W, C]``
  images, each made a PIL image and passed through ``transform``; labels as long tensors."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
    self.images, self.labels, self.transform = images, labels, transform

  def __len__(self):
    return len(self.images)

  def __getitem__(self, idx):
    from PIL import Image
    img = self.images[idx]
    image = self.transform(Image.fromarray(img.squeeze() if img.shape[-1] == 1 else img))
    return image, torch.tensor(int(self.labels[idx]), dtype=torch.long)


def augment_images(samples: int, seed: int = 0):
  """``samples`` uint8 28x28x1 images (a bright blob on noise, so rotations and crops move
  content), labels in [0, 10), and the images' mean and std in [0, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:28, :28]
  centres = rng.uniform(8, 20, size=(samples, 2, 1, 1))
  blob = np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 18.0)
  images = np.clip(200 * blob + rng.normal(30, 20, size=blob.shape), 0, 255).astype(np.uint8)[..., None]
  scaled = images / 255.0
  return images, rng.integers(0, 10, samples), (float(scaled.mean()),), (float(scaled.std()),)


def _line(name, what, times, base, base_name):
  ratios = [a / b for a, b in zip(times, base)]
  med = statistics.median
  print(f"{name:13s} {what:34s} orchard_jax {med(times):6.3f}s  {base_name} {med(base):6.3f}s  "
        f"ratio {med(ratios):.3f}  pairs {' '.join(f'{r:.3f}' for r in ratios)}", flush=True)


def bench_augment(name, batch, samples, repeats, workers, epochs=60):
  """Prints the augmented epochs' times and per-round ratios against torch's augmented epoch
  and against orchard_jax's epoch without augmentation on the same [0, 1] loader.

  orchard_jax augments two ways: images in [0, 1] (``AugmentationConfig()``, as the
  command line's sources are) and images normalised once with the reference's mean/std
  (``AugmentationConfig(mean, std)``: the step un-normalises, augments and normalises).
  """
  images, labels, mean, std = augment_images(samples)
  torch_loader = DataLoader(ReferenceImages(images, labels, reference_train_transform(mean, std)),
                            batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                            pin_memory=False, persistent_workers=False,
                            worker_init_fn=reference_worker_init if workers > 0 else None,
                            generator=torch.Generator().manual_seed(0))
  unit = (images / 255.0).astype(np.float32).transpose(0, 3, 1, 2)

  def loader(x):
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(labels)), batch_size=batch,
                      shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
  unit_loader, normalised_loader = loader(unit), loader((unit - mean[0]) / std[0])
  augmented, _ = _trainer(MiniCNN(num_classes=10), unit_loader, epochs,
                          augmentation=AugmentationConfig())
  augmented_norm, _ = _trainer(MiniCNN(num_classes=10), normalised_loader, epochs,
                               augmentation=AugmentationConfig(mean=mean, std=std))
  plain, _ = _trainer(MiniCNN(num_classes=10), unit_loader, epochs)
  torch_model = ref.TorchMiniCNN()
  opt, sched = ref.make_optimizer(torch_model, epochs=epochs)

  def theirs():
    ref.train_epoch(torch_model, torch_loader, opt, sched)

  fns = (augmented, theirs, augmented_norm, plain)
  for fn in fns:  # warm-up: compile, allocate, first workers
    fn()
  ours, torch_times, ours_norm, plain_times = _rounds(repeats, *fns)
  _line(name, "augmented epoch, [0, 1] inputs", ours, torch_times, "torch")
  _line(name, "augmented epoch, mean/std inputs", ours_norm, torch_times, "torch")
  _line(name, "augmented [0, 1] / unaugmented", ours, plain_times, "unaug")
  _line(name, "augmented mean/std / unaugmented", ours_norm, plain_times, "unaug")


def main_augment(args):
  # The DataLoader forks its workers (the reference's default start method); they run torch and
  # PIL only, never JAX, so JAX's warning about forking its threads does not apply to them.
  warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
  import_functional()
  import torchvision
  workers = reference_workers() if args.workers is None else args.workers
  threads = max(2, (os.cpu_count() or 1) - workers)  # the reference's apply_cpu_threads
  torch.set_num_threads(threads)
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({threads} threads), "
        f"torchvision {torchvision.__version__}, samples={args.samples}, repeats={args.repeats}, "
        f"torch DataLoader num_workers={workers} persistent_workers=False drop_last=True")
  for batch in args.batch or (16, 64):
    bench_augment(f"mini_cnn b{batch}", batch, args.samples, args.repeats, workers)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--samples", type=int, default=4096)
  parser.add_argument("--only", choices=["mini_cnn", "mlp"], default=None)
  parser.add_argument("--augment", action="store_true",
                      help="MiniCNN with the reference's training augmentation on both sides")
  parser.add_argument("--batch", type=int, action="append",
                      help="with --augment: a batch size to run (repeatable; default 16 and 64)")
  parser.add_argument("--workers", type=int, default=None,
                      help="with --augment: the torch DataLoader's num_workers (default: the reference's)")
  args = parser.parse_args()
  if not args.augment and (args.batch or args.workers is not None):
    parser.error("--batch and --workers apply only with --augment")
  if args.augment and args.only:
    parser.error("--augment runs MiniCNN only; leave out --only")
  if args.augment:
    main_augment(args)
    return
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
