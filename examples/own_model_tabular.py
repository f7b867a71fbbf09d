"""Your own Linen module on your own tabular data: an Optuna study through run_trial.

scikit-learn's breast_cancer ships with scikit-learn (569 rows, 30 features,
2 classes), so this runs without a network. The README's "Your model and your
data" section shows this file whole; CI runs it.

    python examples/own_model_tabular.py [--n-trials 8] [--epochs 10] [--cohort-size 1]

With ``--cohort-size 8`` the trials train 8 at a time in one vmapped program
(``orchard_jax.optimize``), each still reported, pruned and stored on its own.
"""

from __future__ import annotations

import argparse
import logging

import flax.linen as nn
import optuna
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from orchard_jax import OptunaConfig, TrainingConfig, TrialConfig, optimize, run_trial
from orchard_jax.data import make_loader


class TabularMLP(nn.Module):
  """The contract: __call__(x, train) -> logits [B, num_classes] (2 logits for 2 classes)."""
  num_classes: int = 2
  hidden: int = 64

  @nn.compact
  def __call__(self, x, train: bool):  # x: float32 [B, 30]
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.Dropout(0.1, deterministic=not train)(x)  # the "dropout" stream: training.seed
    return nn.Dense(self.num_classes)(x)


def loaders(batch_size: int = 32, seed: int = 0):
  """Standardised float32 features [B, 30] and int64 class ids [B], in torch DataLoaders."""
  x, y = load_breast_cancer(return_X_y=True)
  x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, stratify=y,
                                                    random_state=seed)
  scaler = StandardScaler().fit(x_train)

  def dataset(features, labels):
    return torch.utils.data.TensorDataset(
        torch.tensor(scaler.transform(features), dtype=torch.float32), torch.tensor(labels))

  return (make_loader(dataset(x_train, y_train), batch_size, shuffle=True, seed=seed),
          make_loader(dataset(x_val, y_val), 256, shuffle=False))


def main(argv=None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n-trials", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=10, help="epochs per trial (>= 2)")
  parser.add_argument("--cohort-size", type=int, default=1, help="trials trained together")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  optuna.logging.set_verbosity(optuna.logging.WARNING)

  train_loader, val_loader = loaders()
  model = TabularMLP()  # one model for every trial: its steps compile once
  base = TrainingConfig(optimizer_type="adamw", mixup_alpha=0.0,  # MixUp suits images
                        monitor_metric="auc", monitor_direction="maximize")
  study_cfg = OptunaConfig(epochs=args.epochs, pruning_warmup_epochs=min(3, args.epochs - 1))

  def configure(trial: optuna.Trial) -> TrialConfig:
    training = base.replace(
        learning_rate=trial.suggest_float("learning_rate", 1e-3, 3e-2, log=True),
        weight_decay=trial.suggest_float("weight_decay", 1e-5, 1e-2, log=True),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.1))
    return TrialConfig(model=model, train_loader=train_loader, val_loader=val_loader,
                       num_classes=2, training=training, optuna=study_cfg)

  study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
  if args.cohort_size == 1:  # one trial at a time, in your own objective
    study.optimize(lambda trial: run_trial(trial, configure(trial)), n_trials=args.n_trials)
  else:  # cohort_size trials at a time, in one vmapped program
    optimize(study, configure, n_trials=args.n_trials, cohort_size=args.cohort_size)
  best = study.best_trial
  print(f"best trial #{best.number}: validation auc {best.value:.4f}")
  print("best params: " + ", ".join(f"{k}={v:.3g}" for k, v in best.params.items()))
  return best.value


if __name__ == "__main__":
  main()
