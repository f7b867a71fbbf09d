"""The digits example's objective trains to >= 95% and its best state reloads."""

from __future__ import annotations

import pathlib
import runpy

import optuna

from orchard_jax.engine import evaluate, load_best_state, read_summary

EXAMPLE = runpy.run_path(str(pathlib.Path(__file__).parents[2] / "examples" / "optuna_digits.py"))


def test_digits_objective_reaches_95_percent_and_its_best_state_reloads(tmp_path):
  base = EXAMPLE["base_config"](epochs=8, n_trials=1, storage="memory", output_dir=tmp_path)
  params = {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
            "label_smoothing": 0.1, "mixup_alpha": 0.1}
  value = EXAMPLE["make_objective"](base)(optuna.trial.FixedTrial(params, number=3))
  assert value >= 0.95
  best_cfg = base.replace(training=base.training.replace(**params))
  reloaded = evaluate(load_best_state(best_cfg, 3), base.val_loader)
  assert reloaded["accuracy"] == value == read_summary(tmp_path / "trial_3")["value"]
