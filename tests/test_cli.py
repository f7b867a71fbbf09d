"""The orchard-jax command, end to end: real subprocesses on a tiny MedMNIST-format .npz.

The subprocesses share a JAX persistent compilation cache (a temporary
folder), so only the first one pays the compiles.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from orchard_jax.cli import main
from orchard_jax.records import INTERRUPTED, RETRY_OF
from orchard_jax.study.recipe import bundled_recipe_text, load_recipe, parse_recipe

SCRIPT = pathlib.Path(sys.executable).parent / "orchard-jax"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "orchard_jax.cli"]
PNG = b"\x89PNG\r\n\x1a\n"
TIMEOUT = 180


def synthetic(n: int, seed: int, classes: int = 3):
  """uint8 8x8 images; class c brightens rows 2c..2c+1 (easy); labels [n, 1] as MedMNIST."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % classes
  images = rng.normal(0.3, 0.1, (n, 8, 8))
  for c in range(classes):
    images[labels == c, 2 * c:2 * c + 2, :] += 0.5
  return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels.astype(np.uint8)[:, None]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("cli")
  arrays = {}
  for split, n, seed in (("train", 96, 0), ("val", 48, 1), ("test", 48, 2)):
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = synthetic(n, seed)
  np.savez(root / "tiny.npz", **arrays)
  return root


@pytest.fixture(scope="module")
def env(workdir) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
          "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def recipe(workdir: pathlib.Path, name: str, **optuna_keys) -> pathlib.Path:
  """A study of an MLP on tiny.npz: 4 trials of 2 epochs; random sampler; only the learning
  rate is searched, between a good value and one too small to learn (pruned)."""
  data = {
      "dataset": {"source": "npz", "path": str(workdir / "tiny.npz")},
      "architecture": {"name": "mlp", "options": {"hidden": [16]}},
      # Seed 2: the random sampler (seeded by seed + trial number) draws 0.5, 1e-7, 0.5, 1e-7,
      # so a trial that cannot learn follows one that did, and is pruned.
      "training": {"seed": 2, "batch_size": 16, "epochs": 3, "use_amp": False,
                   "monitor_metric": "accuracy", "mixup_alpha": 0.0, "mixup_epochs": 0,
                   "scheduler_type": "none", "use_tqdm": False},
      "optuna": {"study_name": name, "n_trials": 4, "epochs": 2, "sampler_type": "random",
                 "pruner_type": "median", "pruning_warmup_epochs": 1, "pruner_startup_trials": 1,
                 "enable_early_stopping": False, "search_space_preset": "quick",
                 "search_space_overrides": {
                     "learning_rate": [0.5, 1.0e-7], "optimizer_type": None,
                     "batch_size_low_res": None, "dropout": None, "weight_decay": None,
                     "momentum": None, "min_lr": None},
                 **optuna_keys},
      "telemetry": {"log_interval": 1, "output_dir": str(workdir / name)},
  }
  path = workdir / f"{name}.yaml"
  path.write_text(yaml.safe_dump(data))
  return path


def run(args, env, cwd) -> subprocess.CompletedProcess:
  return subprocess.run([*COMMAND, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=TIMEOUT)


def stored(url: str, name: str) -> list:
  return sorted(optuna.load_study(study_name=name, storage=url).trials, key=lambda t: t.number)


@pytest.fixture(scope="module")
def study_run(workdir, env):
  proc = run(["run", recipe(workdir, "tiny")], env, workdir)
  assert proc.returncode == 0, proc.stderr
  return proc, workdir / "tiny"


def test_study_completes_and_pruned_trials_are_pruned_in_storage(study_run):
  proc, run_dir = study_run
  trials = stored(f"sqlite:///{run_dir / 'study.db'}", "tiny")
  states = [t.state for t in trials]
  assert [t.number for t in trials] == [0, 1, 2, 3]
  assert TrialState.PRUNED in states and TrialState.COMPLETE in states
  assert all(t.state != TrialState.PRUNED or t.params["learning_rate"] == 1e-7 for t in trials)
  assert "Best validation accuracy: 1.0000" in proc.stdout


def test_study_outputs_exist_and_parse(study_run):
  _, run_dir = study_run
  rows = list(csv.DictReader(open(run_dir / "trials.csv")))
  assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
  best = parse_recipe(yaml.safe_load((run_dir / "best_config.yaml").read_text()))
  assert best.study is None and best.training.learning_rate == 0.5
  for name in ("optimization_history", "intermediate_values", "param_importances",
               "best_trial_curves"):
    assert (run_dir / "plots" / f"{name}.png").read_bytes().startswith(PNG), name
  assert (run_dir / "best_model" / "checkpoint").is_dir()
  best = optuna.load_study(study_name="tiny", storage=f"sqlite:///{run_dir / 'study.db'}").best_trial
  assert list((run_dir / "trials").iterdir()) == [run_dir / "trials" / f"trial_{best.number}"]


def test_the_run_ends_with_a_tested_and_exported_model(study_run):
  """After the search, ``run`` retrains the best configuration, writes the test report and
  exports both formats, each checked against the JAX model (the export extra is part of the
  test command's install)."""
  proc, run_dir = study_run
  final = run_dir / "retrain"
  report = json.loads((final / "test_report.json").read_text())
  assert 0.0 <= report["without_tta"]["accuracy"] <= 1.0, report
  assert (final / "test_report.txt").read_text().strip()
  assert (final / "confusion_matrix.png").read_bytes().startswith(PNG)
  exported = json.loads((final / "export" / "export.json").read_text())
  for name in ("model.stablehlo", "model.onnx"):
    assert (final / "export" / name).stat().st_size > 0, name
  assert not exported["errors"], exported
  for fmt in ("stablehlo", "onnx"):
    assert exported["checks"][fmt]["passed"], exported


def test_the_run_writes_its_compiled_steps_beside_jax_cache(study_run, workdir):
  names = sorted(p.name.split("-")[0] for p in (workdir / "jax_cache" / "executables").glob("*.exe"))
  assert set(names) == {"init", "train_step", "eval_step"}


def test_best_config_retrains_and_reports_validation_and_test_metrics(study_run, env):
  _, run_dir = study_run
  proc = run(["run", run_dir / "best_config.yaml", "--set", "training.epochs=2"], env, run_dir)
  assert proc.returncode == 0, proc.stderr
  metrics = yaml.safe_load((run_dir / "retrain" / "metrics.json").read_text())
  assert metrics["epochs_run"] == 2 and set(metrics) >= {"val", "test"}
  assert metrics["val"]["accuracy"] == 1.0 and 0.0 <= metrics["test"]["accuracy"] <= 1.0
  assert "Validation: loss" in proc.stdout and "Test:       loss" in proc.stdout


def interrupt(args, env, cwd, *triggers: str) -> subprocess.CompletedProcess:
  """Runs the command and sends one SIGINT each time a stderr line contains the next trigger.

  Waiting for a line between signals matters: Python merges signals that arrive before
  its handler runs.
  """
  proc = subprocess.Popen([*COMMAND, *map(str, args)], env=env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  seen, pending = [], list(triggers)
  for line in proc.stderr:
    seen.append(line)
    if pending and pending[0] in line:
      proc.send_signal(signal.SIGINT)
      pending.pop(0)
    if not pending:
      break
  out, err = proc.communicate(timeout=TIMEOUT)
  return subprocess.CompletedProcess(args, proc.returncode, out, "".join(seen) + err)


def check_resumed(url: str, name: str, n_trials: int) -> list:
  trials = stored(url, name)
  assert [t.number for t in trials] == list(range(len(trials)))  # none duplicated or missing
  assert [t.state for t in trials].count(TrialState.COMPLETE) == n_trials
  for t in trials:  # an interrupted trial was retried once, with its parameters
    if t.state != TrialState.COMPLETE:
      assert t.state == TrialState.FAIL and t.user_attrs[INTERRUPTED]
      retries = [r for r in trials if r.user_attrs.get(RETRY_OF) == t.number]
      assert len(retries) == 1 and retries[0].params == t.params
  return trials


def test_sigint_stops_after_the_running_trial_and_the_same_command_resumes(workdir, env):
  args = ["run", recipe(workdir, "graceful", enable_pruning=False, pruner_type="none",
                         save_plots=False)]
  first = interrupt(args, env, workdir, "Trial 0 COMPLETE")
  assert first.returncode == 130, first.stderr
  assert "Stopped by Ctrl-C" in first.stdout
  url = f"sqlite:///{workdir / 'graceful' / 'study.db'}"
  assert len(stored(url, "graceful")) < 4
  second = run(args, env, workdir)
  assert second.returncode == 0, second.stderr
  trials = check_resumed(url, "graceful", 4)
  assert len(trials) == 4
  assert len(list(csv.DictReader(open(workdir / "graceful" / "trials.csv")))) == 4


def test_second_sigint_stops_mid_trial_and_the_trial_is_retried_on_resume(workdir, env):
  args = ["run", recipe(workdir, "hard", enable_pruning=False, pruner_type="none", epochs=30,
                         save_plots=False)]
  first = interrupt(args, env, workdir, "T1 E1/30", "Interrupted:")
  assert first.returncode == 130, first.stderr
  assert "Traceback" not in first.stderr
  url = f"sqlite:///{workdir / 'hard' / 'study.db'}"
  before = stored(url, "hard")
  assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.FAIL]
  assert before[1].user_attrs.get(INTERRUPTED), (before[1].user_attrs, first.stderr[-2000:])
  assert "T1 E30/30" not in first.stderr
  second = run(args, env, workdir)
  assert second.returncode == 0, second.stderr
  check_resumed(url, "hard", 4)


def test_bad_recipe_stops_with_one_line_and_no_traceback(workdir, env):
  proc = run(["run", recipe(workdir, "bad"), "--set", "optuna.n_trails=3"], env, workdir)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      "orchard-jax: error: unknown key 'optuna.n_trails' in the recipe (did you mean 'n_trials'?)"]
  assert not (workdir / "bad").exists()


@pytest.mark.parametrize("sets, message", [
    (["training.batch_size=big"], "training.batch_size must be an int"),
    (["dataset.path=missing.npz"], "dataset.path: file not found: missing.npz"),
    (["dataset.path=partial.npz"], "lacks val_images, val_labels"),
    (["optuna.pruning_warmup_epochs=2"], "optuna.pruning_warmup_epochs must be < epochs"),
    (["architecture.options={width: 3}"], "architecture 'mlp' cannot be built"),
])
def test_bad_recipe_values_stop_before_training(workdir, capsys, monkeypatch, sets, message):
  monkeypatch.chdir(workdir)
  np.savez(workdir / "partial.npz", train_images=np.zeros((4, 8, 8), np.uint8),
           train_labels=np.zeros(4, np.uint8))
  output = workdir / "not_created"
  argv = ["run", str(recipe(workdir, "inproc")), "--output", str(output)]
  assert main(argv + [a for s in sets for a in ("--set", s)]) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and message in err
  assert not output.exists()


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["init", "--help"]])
def test_every_command_has_help(argv, capsys):
  with pytest.raises(SystemExit) as info:
    main(argv)
  assert info.value.code == 0 and "usage: orchard-jax" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
  assert main([]) == 2 and "usage: orchard-jax" in capsys.readouterr().err


def test_init_writes_the_commented_default_recipe_and_keeps_existing_files(tmp_path, capsys):
  path = tmp_path / "recipe.yaml"
  assert main(["init", str(path)]) == 0
  assert path.read_text() == bundled_recipe_text()
  assert load_recipe(path).to_dict() == load_recipe(None).to_dict()
  path.write_text("# mine\n")
  assert main(["init", str(path)]) == 2 and "use --force" in capsys.readouterr().err
  assert path.read_text() == "# mine\n"
  assert main(["init", str(path), "--force"]) == 0 and path.read_text() == bundled_recipe_text()


def test_the_installed_command_freezes_the_collector_after_loading_and_at_exit(
    workdir, tmp_path, monkeypatch):
  import importlib.metadata

  from orchard_jax import cli

  (script,) = importlib.metadata.entry_points(group="console_scripts", name="orchard-jax")
  assert script.value == "orchard_jax.cli:console"
  freezes = []
  monkeypatch.setattr(cli.gc, "freeze", lambda: freezes.append("freeze"))
  assert cli.console(["init", str(tmp_path / "a.yaml")]) == 0
  assert freezes == ["freeze"]  # when main returns
  assert main(["init", str(tmp_path / "b.yaml")]) == 0
  assert freezes == ["freeze"]  # main alone leaves the collector alone
  args = cli._parser().parse_args(["run", str(recipe(workdir, "frozen"))])
  cli._load(args)
  assert freezes == ["freeze"]
  args.freeze_imports = True  # as main(..., freeze_imports=True) sets it
  cli._load(args)
  assert freezes == ["freeze", "freeze"]  # once the recipe and data are loaded


# ------------------------------------------------ quick answers, package, repository --

NO_JAX = """
import sys
from orchard_jax import cli
try:
  status = cli.main(sys.argv[1:])
except SystemExit as e:  # --help
  status = e.code
assert 'jax' not in sys.modules and 'optuna' not in sys.modules, sorted(
    m for m in ('jax', 'optuna', 'torch') if m in sys.modules)
sys.exit(status)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"],
                                  ["init", "recipe.yaml"]])
def test_help_version_and_init_do_not_import_jax(argv, tmp_path):
  proc = subprocess.run([sys.executable, "-c", NO_JAX, *argv], cwd=tmp_path, capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr
  assert argv[0] != "init" or (tmp_path / "recipe.yaml").read_text() == bundled_recipe_text()


def test_init_refuses_an_existing_file_without_importing_jax(tmp_path):
  (tmp_path / "recipe.yaml").write_text("# mine\n")
  proc = subprocess.run([sys.executable, "-c", NO_JAX, "init", "recipe.yaml"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 2 and "AssertionError" not in proc.stderr
  assert proc.stderr.splitlines() == [
      "orchard-jax: error: recipe.yaml exists; use --force to overwrite it"]


@pytest.mark.parametrize("where", ["read-only", "missing"])
def test_init_into_a_folder_it_cannot_write_is_one_line(tmpfs, tmp_path, where):
  if where == "read-only":  # root ignores permission bits: a read-only mount
    folder = tmpfs("64k")
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    want = f"orchard-jax: error: cannot write {folder}/recipe.schema.json: Read-only file system"
  else:
    folder = tmp_path / "absent" / "deeper"
    want = f"orchard-jax: error: folder {folder} does not exist"
  proc = subprocess.run([*COMMAND, "init", str(folder / "recipe.yaml")], capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert proc.returncode == 2 and proc.stderr.splitlines() == [want], proc.stderr
  assert not folder.exists() or list(folder.iterdir()) == []


# What `import orchard_jax` exported before its names were imported on first use.
EXPORTS = """ConfigError OptunaConfig TrainingConfig TrialConfig resolve_precision
compute_class_weights cross_entropy focal_loss mixup classification_metrics macro_f1 roc_auc
optimizer set_hyperparams LossScale Policy parse_policy LRController epoch_schedule plateau
Hyperparams StepSpec TrainState create_train_state state_from_config eval_step train_step
FitResult TrialTrainingExecutor evaluate fit load_best_state run_trial train_epoch MLP MiniCNN
Model as_model build_model""".split()


def test_the_package_exports_what_it_did_and_its_version():
  import importlib.metadata

  import orchard_jax
  from orchard_jax import engine, models

  assert set(EXPORTS) <= set(orchard_jax.__all__) <= set(dir(orchard_jax))
  assert orchard_jax.run_trial is engine.run_trial and orchard_jax.MLP is models.MLP
  assert all(getattr(orchard_jax, name) is not None for name in orchard_jax.__all__)
  assert orchard_jax.engine is engine and orchard_jax.hostmem.malloc_tuned() in (True, False)
  assert orchard_jax.__version__ == importlib.metadata.version("orchard_jax")
  with pytest.raises(AttributeError):
    orchard_jax.no_such_name  # noqa: B018


def test_outputs_folder_is_ignored_by_git():
  root = pathlib.Path(__file__).parents[1]
  if not (root / ".git").exists():
    pytest.skip("not a git checkout")
  proc = subprocess.run(["git", "check-ignore", "-q", "outputs/tiny/study.db"], cwd=root)
  assert proc.returncode == 0, ".gitignore does not ignore outputs/"


def test_best_config_retrains_from_another_folder(study_run, env, tmp_path):
  # Its paths are relative to it, and read from its folder.
  _, run_dir = study_run
  proc = run(["run", run_dir / "best_config.yaml", "--set", "training.epochs=1"], env, tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert (run_dir / "retrain" / "metrics.json").is_file()


TENSOR_LOADERS = '''
import numpy as np
import torch
from orchard_jax.data import make_loader


def loaders(batch_size, seed):
  """tiny.npz as torch DataLoaders over TensorDatasets (NCHW floats in [0, 1])."""
  arrays = np.load(__file__.replace("tensor_data.py", "tiny.npz"))
  def dataset(split):
    x = torch.from_numpy(arrays[f"{split}_images"][:, None].astype(np.float32) / 255)
    return torch.utils.data.TensorDataset(x, torch.from_numpy(arrays[f"{split}_labels"][:, 0].astype(np.int64)))
  return (make_loader(dataset("train"), batch_size, shuffle=True, seed=seed),
          make_loader(dataset("val"), 64, shuffle=False))
'''


@pytest.mark.parametrize("source", ["npz", "TensorDataset function"])
def test_a_study_compiles_each_step_once(workdir, tmp_path, source):
  """Counted from JAX's own log (JAX_LOG_COMPILES=1: one "Finished XLA compilation of ..." per
  XLA compile), in a process with empty caches; 4 trials of 2 epochs share the two programs."""
  path = recipe(workdir, f"compiles_{source.split()[0]}")
  if source != "npz":  # a user's function: its TensorDataset loaders take the resident path
    (workdir / "tensor_data.py").write_text(TENSOR_LOADERS)
    data = yaml.safe_load(path.read_text())
    data["dataset"] = {"source": "function", "function": f"{workdir / 'tensor_data.py'}:loaders",
                       "num_classes": 3}
    path.write_text(yaml.safe_dump(data))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "JAX_LOG_COMPILES": "1",
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
  proc = run(["run", path], env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("Trial ") >= 4 and "Trial 3 " in proc.stderr, proc.stderr[-3000:]
  counts = {step: proc.stderr.count(f"Finished XLA compilation of jit({step})")
            for step in ("_train_step", "_eval_step")}
  assert counts == {"_train_step": 1, "_eval_step": 1}, (source, counts)
