"""Shared fixtures of the engine tests: small separable data, configs, pruners."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from orchard_jax.config import OptunaConfig, TrainingConfig, TrialConfig
from orchard_jax.models import MLP

NUM_CLASSES = 3
BATCH = 16


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``n`` NCHW images [n, 1, 8, 8]; class c brightens rows 2c..2c+1 (easy to learn)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % NUM_CLASSES
  images = rng.normal(0.0, 0.5, (n, 1, 8, 8)).astype(np.float32)
  for c in range(NUM_CLASSES):
    images[labels == c, 0, 2 * c:2 * c + 2, :] += 1.5
  return images, labels.astype(np.int64)


def batches(images: np.ndarray, labels: np.ndarray, batch: int = BATCH) -> list:
  """A re-iterable loader: a list of (inputs, labels) numpy batches."""
  return [(images[i:i + batch], labels[i:i + batch]) for i in range(0, len(labels), batch)]


class FixedPruner(optuna.pruners.BasePruner):
  """Always (or never) prunes; records the step at which it was asked."""

  def __init__(self, prune: bool):
    self.prune_value, self.asked_at = prune, []

  def prune(self, study, trial) -> bool:
    self.asked_at.append(trial.last_step)
    return self.prune_value


@pytest.fixture
def fixed_pruner():
  """``fixed_pruner(prune)``: a :class:`FixedPruner`."""
  return FixedPruner


@pytest.fixture
def train_data():
  return synthetic(80, seed=0)


@pytest.fixture
def make_cfg(train_data):
  """``make_cfg(**overrides)``: a small TrialConfig; ``training=``/``optuna=`` take dicts
  of field overrides on top of fast defaults."""
  val = synthetic(48, seed=1)

  def make(training=None, optuna=None, **overrides) -> TrialConfig:
    training_cfg = TrainingConfig(**{
        "batch_size": BATCH, "use_amp": False, "use_tqdm": False, "learning_rate": 0.05,
        "mixup_alpha": 0.0, "scheduler_type": "none", "epochs": 3, **(training or {})})
    optuna_cfg = OptunaConfig(**{"epochs": 3, "enable_pruning": False, "pruner_type": "none",
                                 "storage": "memory", **(optuna or {})})
    fields = dict(model=MLP(num_classes=NUM_CLASSES, hidden=(16,)),
                  train_loader=batches(*train_data), val_loader=batches(*val),
                  num_classes=NUM_CLASSES, training=training_cfg, optuna=optuna_cfg,
                  log_interval=1)
    fields.update(overrides)
    return TrialConfig(**fields)

  return make


@pytest.fixture
def study_factory():
  """``study_factory(pruner=None, direction="maximize")``: an in-memory study."""
  def make(pruner=None, direction="maximize", storage=None):
    return optuna.create_study(direction=direction, pruner=pruner or optuna.pruners.NopPruner(),
                               storage=storage)
  return make


@pytest.fixture(autouse=True)
def _quiet_optuna():
  verbosity = optuna.logging.get_verbosity()
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  yield
  optuna.logging.set_verbosity(verbosity)
