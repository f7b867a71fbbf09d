"""``orchard-jax run``'s phases after the search (train the best configuration, evaluate,
export), and ``orchard-jax evaluate`` / ``export`` alone on a finished run folder."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import numpy as np
import optuna
import pytest
import yaml

from orchard_jax import load_model
from orchard_jax.cli import main
from orchard_jax.core.metrics import classification_metrics

CLASSES = 3
EXPORT_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("onnx", "jax2onnx"))


def features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """[n, 4, 4, 1] images; class c lifts row c (easy, not perfectly)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % CLASSES
  x = rng.normal(0.0, 1.0, (n, 4, 4, 1)).astype(np.float32)
  for c in range(CLASSES):
    x[labels == c, c] += 1.0
  return x, labels


SPLITS = {"train": features(96, 0), "val": features(45, 1), "test": features(48, 2)}


def write_recipe(root: pathlib.Path, **training) -> pathlib.Path:
  np.savez(root / "data.npz", **{f"{split}_{kind}": arr for split, (x, y) in SPLITS.items()
                                 for kind, arr in (("images", x), ("labels", y))})
  recipe = {
      "dataset": {"source": "npz", "path": "data.npz"},
      "architecture": {"name": "mlp", "options": {"hidden": [16]}},
      "training": {"seed": 1, "batch_size": 16, "epochs": 4, "use_amp": False,
                   "monitor_metric": "auc", "mixup_alpha": 0.0, "mixup_epochs": 0,
                   "scheduler_type": "none", **training},
      "optuna": {"study_name": "s", "n_trials": 2, "epochs": 2, "sampler_type": "random",
                 "enable_pruning": False, "enable_early_stopping": False, "save_plots": False,
                 "show_progress_bar": False, "search_space_overrides": {
                     "learning_rate": [0.3, 0.05], "optimizer_type": None,
                     "batch_size_low_res": None, "dropout": None, "weight_decay": None,
                     "momentum": None, "min_lr": None}},
      "telemetry": {"output_dir": "run", "compilation_cache": None},
  }
  path = root / "recipe.yaml"
  path.write_text(yaml.safe_dump(recipe))
  return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A study whose final run trains the best trial's own epochs (--final trial)."""
  root = tmp_path_factory.mktemp("phases")
  capture = root / "log.txt"
  import contextlib, io, sys  # noqa: E401  pylint: disable=import-outside-toplevel,multiple-imports
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    status = main(["run", str(write_recipe(root)), "--final", "trial", "--no-export"])
  capture.write_text(err.getvalue() + out.getvalue())
  assert status == 0, err.getvalue()[-2000:]
  return root / "run", err.getvalue(), out.getvalue()


def test_final_trial_retrains_the_best_trial_and_reproduces_its_value(finished):
  run_dir, err, out = finished
  best = optuna.load_study(study_name="s", storage=f"sqlite:///{run_dir / 'study.db'}").best_trial
  metrics = json.loads((run_dir / "retrain" / "metrics.json").read_text())
  assert metrics["epochs"] == 2 and metrics["epochs_run"] == 2  # the trial's optuna.epochs
  assert metrics["val"]["auc"] == pytest.approx(best.value, abs=1e-6)
  assert "for 2 epochs (the trial's own optuna.epochs)" in err
  assert "Test:       loss" in out and "Export" not in out


def test_the_final_run_leaves_a_test_report_and_a_loadable_model(finished):
  run_dir, _, _ = finished
  retrain = run_dir / "retrain"
  report = json.loads((retrain / "test_report.json").read_text())
  loaded = load_model(retrain)
  assert loaded.path == retrain / "fit"
  x, y = SPLITS["test"]
  probs = loaded.predict(x).astype(np.float64)
  expected = classification_metrics(probs / probs.sum(1, keepdims=True), y, 0.0, len(y))
  assert report["without_tta"]["accuracy"] == expected["accuracy"]
  assert report["without_tta"]["auc"] == pytest.approx(expected["auc"], abs=1e-6)
  assert report["with_tta"] is None and (retrain / "test_report.txt").is_file()
  assert not list(retrain.glob("*.png"))  # optuna.save_plots: false


def test_evaluate_alone_on_a_study_folder_reports_its_best_model(finished, capsys):
  run_dir, _, _ = finished
  assert main(["evaluate", str(run_dir)]) == 0
  report = json.loads((run_dir / "test_report.json").read_text())
  assert report["model"] == str(run_dir / "best_model")
  assert "without TTA" in capsys.readouterr().out


def test_evaluate_alone_with_tta_adds_the_ensembles_evaluation(finished, capsys):
  run_dir, _, _ = finished
  assert main(["evaluate", str(run_dir / "retrain"), "--tta"]) == 0
  report = json.loads((run_dir / "retrain" / "test_report.json").read_text())
  assert report["tta"]["resolution"] == 4 and report["tta"]["mode"] == "full"
  assert report["with_tta"]["support"] == [16, 16, 16]
  assert "with TTA" in capsys.readouterr().out


def test_tta_for_feature_rows_is_one_line():
  from orchard_jax import TrainingConfig
  from orchard_jax.config import ConfigError
  from orchard_jax.study.final import tta_spec
  assert tta_spec(TrainingConfig(use_tta=False), (16,)) is None
  with pytest.raises(ConfigError, match=r"inputs have shape \(16,\): test-time augmentation "
                                        r"needs images \(H, W, C\); set training.use_tta: false"):
    tta_spec(TrainingConfig(use_tta=True), (16,))


def test_export_alone_writes_the_files_or_says_how_to_get_the_extra(finished, capsys):
  run_dir, _, _ = finished
  status = main(["export", str(run_dir / "retrain")])
  out = capsys.readouterr().out
  if EXPORT_EXTRA:
    if not hasattr(importlib.import_module("orchard_jax.export"), "export_all"):
      pytest.skip("orchard_jax.export has no export_all yet")
    assert status == 0, out
    folder = run_dir / "retrain" / "export"
    assert {"model.stablehlo", "model.onnx", "export.json"} <= {p.name for p in folder.iterdir()}
    figures = json.loads((folder / "export.json").read_text())
    assert figures["checks"]["onnx"]["passed"] and figures["checks"]["stablehlo"]["passed"]
    report = json.loads((run_dir / "retrain" / "test_report.json").read_text())
    assert figures["accuracy"]["onnx"] == pytest.approx(report["without_tta"]["accuracy"])
    assert figures["latency"]["onnx"]["runs"] == 100 and "ms per image" in out
  else:
    assert status == 1 and 'pip install -e ".[export]"' in out and out.count("\n") == 1
    assert out.startswith("Export skipped: ")


def test_a_failing_phase_names_itself_and_keeps_what_the_earlier_phases_wrote(finished, capsys):
  run_dir, _, _ = finished
  copy = run_dir / "damaged"  # beside retrain/: its recipe's relative data path still holds
  shutil.copytree(run_dir / "retrain", copy)
  for item in (copy / "fit" / "checkpoint").iterdir():  # a damaged checkpoint
    if item.is_dir():
      shutil.rmtree(item)
  (copy / "test_report.json").unlink()
  assert main(["evaluate", str(copy)]) == 1
  err = capsys.readouterr().err.splitlines()
  assert err[-1].startswith("orchard-jax: error: the evaluate phase failed: ")
  assert f"what the earlier phases wrote is kept in {copy}" in err[-1]
  assert (copy / "metrics.json").is_file() and (copy / "fit" / "model.json").is_file()
  assert not (copy / "test_report.json").exists()


def test_run_keep_checkpoints_keeps_every_trials_checkpoint(tmp_path):
  status = main(["run", str(write_recipe(tmp_path)), "--keep-checkpoints", "--final", "off"])
  assert status == 0
  assert sorted(p.name for p in (tmp_path / "run" / "trials").iterdir()) == ["trial_0", "trial_1"]
  assert not (tmp_path / "run" / "retrain").exists()  # --final off: the search only


def test_use_tta_on_feature_rows_stops_before_any_training(tmp_path, capsys):
  path = write_recipe(tmp_path, use_tta=True)
  data = yaml.safe_load(path.read_text())
  data["dataset"] = {"source": "function", "function": "rows.py:loaders", "num_classes": 3}
  (tmp_path / "rows.py").write_text(
      "import numpy as np\n"
      "def loaders(batch_size, seed):\n"
      "  x, y = np.zeros((6, 16), np.float32), np.arange(6) % 3\n"
      "  return [(x, y)], [(x, y)]\n")
  path.write_text(yaml.safe_dump(data))
  assert main(["run", str(path)]) == 2
  assert "test-time augmentation needs images (H, W, C)" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_evaluate_alone_writes_no_metrics_file_into_a_study_folder(finished):
  run_dir, _, _ = finished
  assert main(["evaluate", str(run_dir)]) == 0
  assert not (run_dir / "metrics.json").exists()
