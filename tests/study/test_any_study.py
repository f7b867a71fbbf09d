"""Study outputs for any Optuna study whose objective calls run_trial (no recipe):
``orchard_jax.write_outputs`` and the ``orchard_jax.StudyOutputs`` callback."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

import orchard_jax
from orchard_jax import (MLP, OptunaConfig, StudyOutputs, TrainingConfig, TrialConfig,
                         run_trial, write_outputs)

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = 3


def synthetic(n: int, seed: int):
  """[n, 16] features; class c lifts features 4c..4c+3 (easy)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % CLASSES
  x = rng.normal(0.0, 0.5, (n, 16)).astype(np.float32)
  for c in range(CLASSES):
    x[labels == c, 4 * c:4 * c + 4] += 1.5
  return [(x[i:i + 16], labels[i:i + 16]) for i in range(0, n, 16)]


TRAIN, VAL = synthetic(96, 0), synthetic(48, 1)


def objective_for(checkpoints: pathlib.Path):
  """A user's objective: their own TrialConfig, run_trial; trial 1 cannot learn (pruned or
  worse), the others can."""
  def objective(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("learning_rate", 5e-8, 0.5, log=True)
    cfg = TrialConfig(
        model=MLP(num_classes=CLASSES, hidden=(16,)), train_loader=TRAIN, val_loader=VAL,
        num_classes=CLASSES, output_dir=str(checkpoints), log_interval=1,
        training=TrainingConfig(learning_rate=lr, min_lr=2e-8, batch_size=16, use_amp=False,
                                use_tqdm=False,
                                mixup_alpha=0.0, scheduler_type="none", monitor_metric="accuracy"),
        optuna=OptunaConfig(epochs=2, enable_pruning=False, pruner_type="none", storage="memory"))
    return run_trial(trial, cfg)  # records what cfg held (trial_config)
  return objective


@pytest.fixture(scope="module")
def api_study(tmp_path_factory):
  """Three trials of a plain study (sqlite) with StudyOutputs as its callback."""
  root = tmp_path_factory.mktemp("any")
  study = optuna.create_study(direction="maximize", storage=f"sqlite:///{root / 'study.db'}",
                              study_name="mine")
  for lr in (0.3, 1e-7, 0.2):
    study.enqueue_trial({"learning_rate": lr})
  outputs = StudyOutputs(root / "run")
  study.optimize(objective_for(root / "checkpoints"), n_trials=3, callbacks=[outputs])
  return study, outputs, root


def test_the_callback_writes_trials_csv_plots_best_trial_and_best_model(api_study):
  study, outputs, root = api_study
  run_dir = root / "run"
  best = study.best_trial
  assert outputs.best.number == best.number
  rows = list(csv.DictReader(open(run_dir / "trials.csv")))
  assert [r["number"] for r in rows] == ["0", "1", "2"]
  assert {r["state"] for r in rows} == {"COMPLETE"} and float(rows[0]["params_learning_rate"]) == 0.3
  for name in ("optimization_history", "intermediate_values", "param_importances",
               "best_trial_curves"):
    assert (run_dir / "plots" / f"{name}.png").read_bytes().startswith(PNG), name
  assert not (run_dir / "best_config.yaml").exists()  # the name of a recipe to retrain
  config = yaml.safe_load((run_dir / "best_trial.yaml").read_text())
  assert config["trial"] == best.number and config["value"] == best.value
  assert config["metric"] == "accuracy" and config["params"] == best.params
  recorded = config["trial_config"]
  assert recorded["training"]["learning_rate"] == best.params["learning_rate"]
  assert recorded["optuna"]["epochs"] == 2 and recorded["num_classes"] == CLASSES
  assert recorded["model"].startswith("MLP(")
  assert recorded["output_dir"] == str((root / "checkpoints").absolute())
  trial_json = json.loads((run_dir / "best_model" / "trial.json").read_text())
  assert trial_json["number"] == best.number and (run_dir / "best_model" / "checkpoint").is_dir()
  assert json.loads((run_dir / "best_model" / "best.json").read_text())["metric"] == "accuracy"


def test_the_best_model_loads_as_the_trial_state(api_study):
  from orchard_jax.engine import initial_state, load_best

  study, _, root = api_study
  cfg = TrialConfig(model=MLP(num_classes=CLASSES, hidden=(16,)), train_loader=TRAIN,
                    val_loader=VAL, num_classes=CLASSES,
                    training=TrainingConfig(use_amp=False, use_tqdm=False, mixup_alpha=0.0,
                                            monitor_metric="accuracy"))
  state = load_best(root / "run" / "best_model", initial_state(cfg))
  metrics = orchard_jax.evaluate(state, VAL)
  assert metrics["accuracy"] == pytest.approx(study.best_value)


def test_the_study_gets_its_metric_name_from_the_recorded_config(api_study):
  study, _, _ = api_study
  assert study.metric_names == ["accuracy"]


def test_write_outputs_of_an_objective_without_run_trial(tmp_path):
  study = optuna.create_study(direction="maximize")
  study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
  assert write_outputs(study, tmp_path / "bare", plots=False).number == study.best_trial.number
  assert not (tmp_path / "bare" / "best_model").exists()  # nowhere known to copy it from
  assert study.metric_names is None  # nothing to name it by
  config = yaml.safe_load((tmp_path / "bare" / "best_trial.yaml").read_text())
  assert config["metric"] == "value" and "trial_config" not in config


def test_write_outputs_takes_the_checkpoints_from_where_it_is_told(tmp_path):
  study = optuna.create_study(direction="maximize")
  study.optimize(objective_for(tmp_path / "ckpt"), n_trials=2)
  best = write_outputs(study, tmp_path / "named", metric="accuracy",
                       checkpoint_dir=tmp_path / "ckpt")
  assert (tmp_path / "named" / "best_model" / "trial.json").is_file()
  assert json.loads((tmp_path / "named" / "best_model" / "trial.json").read_text())["number"] == \
      best.number
  assert study.metric_names == ["accuracy"]
  assert (tmp_path / "named" / "plots" / "best_trial_curves.png").read_bytes().startswith(PNG)


def test_write_outputs_of_a_study_without_a_finished_trial(tmp_path):
  study = optuna.create_study(direction="minimize")
  assert write_outputs(study, tmp_path / "run", metric="loss") is None
  assert (tmp_path / "run" / "trials.csv").read_text().startswith("number,state,value")
  assert not (tmp_path / "run" / "best_trial.yaml").exists()


def test_write_outputs_refuses_another_direction_and_several_objectives(tmp_path):
  with pytest.raises(ValueError, match="not the study's"):
    write_outputs(optuna.create_study(direction="maximize"), tmp_path, direction="minimize")
  with pytest.raises(ValueError, match="single-objective"):
    write_outputs(optuna.create_study(directions=["maximize", "minimize"]), tmp_path)


def test_a_failed_trial_is_in_trials_csv_with_its_error(tmp_path):
  study = optuna.create_study(direction="maximize")

  def objective(trial):
    if trial.number == 1:
      trial.set_user_attr("error", "ValueError: mine")
      raise ValueError("mine")
    return objective_for(tmp_path / "ckpt")(trial)

  study.optimize(objective, n_trials=2, catch=(ValueError,),
                 callbacks=[StudyOutputs(tmp_path / "run", plots=False)])
  rows = list(csv.DictReader(open(tmp_path / "run" / "trials.csv")))
  assert [r["state"] for r in rows] == ["COMPLETE", "FAIL"] and rows[1]["error"] == "ValueError: mine"
  assert study.trials[0].state == TrialState.COMPLETE


@pytest.mark.parametrize("name", ["best_trial.yaml", "best_config.yaml"])  # the latter: before
def test_run_on_a_best_trial_file_says_it_is_not_a_recipe(api_study, name, tmp_path, capsys):
  from orchard_jax.cli import main
  _, _, root = api_study
  path = tmp_path / name
  path.write_text((root / "run" / "best_trial.yaml").read_text())
  assert main(["run", str(path)]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err == (
      f"orchard-jax: error: {path} describes the best trial of a study of your own objective "
      f"(best_trial.yaml of orchard_jax.write_outputs), not a recipe: rerun its params with your "
      f"objective; orchard-jax run takes a recipe, such as the best_config.yaml of an orchard-jax "
      f"run study\n")
