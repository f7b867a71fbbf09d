"""``orchard_jax.load_model``: a command-line run folder, a Python study's outputs and a ``fit``
folder each give back the model whose validation value the run stored."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import optuna
import pytest
import yaml
from flax import linen as nn

import orchard_jax
from orchard_jax import (MLP, OptunaConfig, StudyOutputs, TrainingConfig, TrialConfig, fit,
                         load_model, run_trial)
from orchard_jax.cli import main
from orchard_jax.config import ConfigError
from orchard_jax.core.metrics import roc_auc

CLASSES = 3


def features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """[n, 16] features; class c lifts features 4c..4c+3 (easy, not perfectly)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % CLASSES
  x = rng.normal(0.0, 1.0, (n, 16)).astype(np.float32)
  for c in range(CLASSES):
    x[labels == c, 4 * c:4 * c + 4] += 1.0
  return x, labels


(X_TRAIN, Y_TRAIN), (X_VAL, Y_VAL), (X_TEST, Y_TEST) = (features(96, 0), features(45, 1),
                                                        features(48, 2))
TRAIN = [(X_TRAIN[i:i + 16], Y_TRAIN[i:i + 16]) for i in range(0, 96, 16)]
VAL = [(X_VAL[i:i + 16], Y_VAL[i:i + 16]) for i in range(0, 45, 16)]


def accuracy(loaded, x, y) -> float:
  return float(np.mean(loaded.predict(x).argmax(axis=1) == y))


def config(lr: float, output_dir: pathlib.Path, epochs: int = 3) -> TrialConfig:
  return TrialConfig(
      model=MLP(num_classes=CLASSES, hidden=(16,)), train_loader=TRAIN, val_loader=VAL,
      num_classes=CLASSES, output_dir=str(output_dir), log_interval=1,
      training=TrainingConfig(learning_rate=lr, batch_size=16, epochs=epochs, use_amp=False,
                              use_tqdm=False, mixup_alpha=0.0, scheduler_type="none",
                              monitor_metric="auc"),
      optuna=OptunaConfig(epochs=epochs, enable_pruning=False, pruner_type="none",
                          storage="memory"))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> pathlib.Path:
  """A command-line study of an MLP on an .npz (3 trials of 2 epochs), its phases off."""
  root = tmp_path_factory.mktemp("cli_run")
  np.savez(root / "data.npz", train_images=X_TRAIN, train_labels=Y_TRAIN, val_images=X_VAL,
           val_labels=Y_VAL, test_images=X_TEST, test_labels=Y_TEST)
  recipe = {
      "dataset": {"source": "npz", "path": "data.npz"},
      "architecture": {"name": "mlp", "options": {"hidden": [16]}},
      "training": {"seed": 1, "batch_size": 16, "use_amp": False, "monitor_metric": "auc",
                   "mixup_alpha": 0.0, "mixup_epochs": 0, "scheduler_type": "none"},
      "optuna": {"study_name": "s", "n_trials": 3, "epochs": 2, "sampler_type": "random",
                 "enable_pruning": False, "enable_early_stopping": False, "save_plots": False,
                 "show_progress_bar": False, "search_space_overrides": {
                     "learning_rate": [0.3, 0.05, 0.01], "optimizer_type": None,
                     "batch_size_low_res": None, "dropout": None, "weight_decay": None,
                     "momentum": None, "min_lr": None}},
      "telemetry": {"output_dir": "run", "compilation_cache": None},
  }
  (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
  assert main(["run", str(root / "recipe.yaml"), "--final", "off"]) == 0
  return root / "run"


def test_a_command_line_run_folder_gives_its_best_trial_value_on_the_validation_split(cli_run):
  stored = json.loads((cli_run / "best_model" / "trial.json").read_text())["value"]
  loaded = load_model(cli_run)
  assert loaded.path == cli_run / "best_model" and loaded.input_shape == (16,)
  assert roc_auc(loaded.predict(X_VAL), Y_VAL) == pytest.approx(stored, abs=1e-6)
  record = json.loads((cli_run / "best_model" / "model.json").read_text())
  assert record["architecture"]["name"] == "mlp" and record["num_classes"] == CLASSES


def test_the_checkpoint_folder_itself_loads_too(cli_run):
  a, b = load_model(cli_run / "best_model"), load_model(cli_run / "best_model" / "checkpoint")
  np.testing.assert_array_equal(a.predict(X_VAL), b.predict(X_VAL))


def test_predict_pads_the_last_batch_and_equals_apply(cli_run):
  loaded = load_model(cli_run)
  probs = loaded.predict(X_VAL, batch_size=16)  # 45 rows: the last batch of 13 is padded
  assert probs.shape == (45, CLASSES) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
  logits = np.asarray(loaded.apply(X_VAL))
  expected = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-6)


@pytest.fixture(scope="module")
def python_study(tmp_path_factory):
  root = tmp_path_factory.mktemp("py_study")
  study = optuna.create_study(direction="maximize")
  for lr in (0.3, 0.01):
    study.enqueue_trial({"lr": lr})
  study.optimize(lambda t: run_trial(t, config(t.suggest_float("lr", 1e-3, 0.5), root / "ckpt")),
                 n_trials=2, callbacks=[StudyOutputs(root / "run", plots=False)])
  return study, root / "run"


def test_a_python_study_gives_its_best_value_with_the_model_passed(python_study):
  study, run_dir = python_study
  loaded = load_model(run_dir, model=MLP(num_classes=CLASSES, hidden=(16,)))
  assert loaded.num_classes == CLASSES
  assert roc_auc(loaded.predict(X_VAL), Y_VAL) == pytest.approx(study.best_value, abs=1e-6)


def test_a_python_studys_builtin_model_is_rebuilt_from_its_recorded_repr(python_study):
  study, run_dir = python_study
  loaded = load_model(run_dir)
  assert loaded.model.module == MLP(num_classes=CLASSES, hidden=(16,))
  assert roc_auc(loaded.predict(X_VAL), Y_VAL) == pytest.approx(study.best_value, abs=1e-6)


class OwnMLP(nn.Module):
  """A model of the user's own code."""
  num_classes: int = CLASSES

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(8)(x)))


def test_a_python_study_of_ones_own_model_says_to_pass_it_in_one_line(tmp_path):
  study = optuna.create_study(direction="maximize")
  cfg = config(0.3, tmp_path / "ckpt", epochs=1).replace(model=OwnMLP())
  study.optimize(lambda t: run_trial(t, cfg), n_trials=1)
  orchard_jax.write_outputs(study, tmp_path / "run", plots=False)
  with pytest.raises(ConfigError, match=r"cannot rebuild from files: pass it, load_model\(") as e:
    load_model(tmp_path / "run")
  assert "\n" not in str(e.value) and "OwnMLP(" in str(e.value)
  loaded = load_model(tmp_path / "run", model=OwnMLP())
  assert roc_auc(loaded.predict(X_VAL), Y_VAL) == pytest.approx(study.best_value, abs=1e-6)


def test_a_fit_folder_gives_its_best_value(tmp_path):
  """``fit`` writes model.json beside its best state: a built-in model loads from the folder
  alone, as from a study's."""
  result = fit(config(0.3, tmp_path))
  loaded = load_model(tmp_path)
  assert loaded.path == tmp_path / "fit"
  assert loaded.model.module == MLP(num_classes=CLASSES, hidden=(16,))
  assert roc_auc(loaded.predict(X_VAL), Y_VAL) == pytest.approx(result.best, abs=1e-6)
  passed = load_model(tmp_path, model=MLP(num_classes=CLASSES, hidden=(16,)))
  assert roc_auc(passed.predict(X_VAL), Y_VAL) == pytest.approx(result.best, abs=1e-6)


def test_a_fit_of_ones_own_model_says_to_pass_it_in_one_line(tmp_path):
  result = fit(config(0.3, tmp_path, epochs=1).replace(model=OwnMLP()))
  with pytest.raises(ConfigError, match=r"cannot rebuild from files: pass it, load_model\(") as e:
    load_model(tmp_path)
  assert "\n" not in str(e.value) and "OwnMLP(" in str(e.value)
  loaded = load_model(tmp_path, model=OwnMLP())
  assert roc_auc(loaded.predict(X_VAL), Y_VAL) == pytest.approx(result.best, abs=1e-6)


def test_a_folder_without_a_model_is_one_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no model: expected a run folder with "
                                              "best_model/"):
    load_model(tmp_path)


def test_a_python_study_keeps_only_the_best_trials_checkpoint(python_study):
  study, run_dir = python_study
  checkpoints = run_dir.parent / "ckpt"
  assert sorted(p.name for p in checkpoints.iterdir()) == [f"trial_{study.best_trial.number}"]


def test_keep_checkpoints_keeps_every_trials(tmp_path):
  study = optuna.create_study(direction="maximize")
  for lr in (0.3, 0.01):
    study.enqueue_trial({"lr": lr})
  outputs = StudyOutputs(tmp_path / "run", plots=False, keep_checkpoints=True)
  study.optimize(lambda t: run_trial(t, config(t.suggest_float("lr", 1e-3, 0.5),
                                               tmp_path / "ckpt", epochs=1)),
                 n_trials=2, callbacks=[outputs])
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["trial_0", "trial_1"]
  orchard_jax.write_outputs(study, tmp_path / "run", plots=False)  # the default policy
  assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [f"trial_{study.best_trial.number}"]
