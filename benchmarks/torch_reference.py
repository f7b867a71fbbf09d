"""The reference's training loop in torch, for side-by-side benchmarks.

Same semantics as orchard-ml's trial executor kernel: per batch
``zero_grad -> forward -> CrossEntropyLoss -> backward -> clip_grad_norm_ ->
SGD(momentum, coupled weight decay).step()`` and ``loss.item() * batch`` for
the epoch's sample-weighted loss; the LR scheduler steps once per epoch;
validation under ``torch.no_grad()`` with softmax probabilities collected for
the metrics. Not part of the package: it exists only to be measured against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TorchMiniCNN(nn.Module):
  """The reference's MiniCNN (NCHW)."""

  def __init__(self, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.0):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
    self.bn1 = nn.BatchNorm2d(32)
    self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
    self.bn2 = nn.BatchNorm2d(64)
    self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
    self.bn3 = nn.BatchNorm2d(128)
    self.pool = nn.MaxPool2d(2, 2)
    self.gap = nn.AdaptiveAvgPool2d(1)
    self.dropout = nn.Dropout(dropout)
    self.fc = nn.Linear(128, num_classes)

  def forward(self, x):
    x = self.pool(F.relu(self.bn1(self.conv1(x))))
    x = self.pool(F.relu(self.bn2(self.conv2(x))))
    x = F.relu(self.bn3(self.conv3(x)))
    return self.fc(self.dropout(torch.flatten(self.gap(x), 1)))


def torch_mlp(in_features: int = 784, hidden=(256, 256), num_classes: int = 10) -> nn.Module:
  layers, width = [nn.Flatten()], in_features
  for h in hidden:
    layers += [nn.Linear(width, h), nn.ReLU()]
    width = h
  return nn.Sequential(*layers, nn.Linear(width, num_classes))


def make_optimizer(model, *, lr=0.008, momentum=0.9, weight_decay=5e-4, epochs=60, min_lr=1e-6):
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
  return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=min_lr)


def train_epoch(model, loader, opt, scheduler, *, grad_clip=1.0) -> float:
  model.train()
  total, count = 0.0, 0
  for x, y in loader:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if grad_clip:
      nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    total += loss.item() * x.size(0)
    count += x.size(0)
  scheduler.step()
  return total / max(count, 1)


@torch.no_grad()
def validate(model, loader):
  model.eval()
  probs, labels, loss_sum = [], [], 0.0
  for x, y in loader:
    logits = model(x)
    loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
    probs.append(torch.softmax(logits, 1))
    labels.append(y)
  return torch.cat(probs).numpy(), torch.cat(labels).numpy(), loss_sum
