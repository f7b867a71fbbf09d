"""Augmentation searched by a study, end to end through ``orchard-jax run`` and ``validate``.

One study of an MLP on tests/test_cli.py's tiny 8x8x1 npz (the ``workdir``
fixture of ``conftest.py``), run in process through :func:`orchard_jax.cli.main`
with the recipe's ``augmentation:`` section and the ``full`` preset: 3 trials
of 1 epoch, the parameters that change the compiled program fixed, no final
phase. Its outputs are checked against the search-space rule: the three
augmentation ranges (``rotation_angle``, ``jitter_val``, ``min_scale``) are
searched, shown in ``trials.csv`` and the first log line, stored in Optuna's
storage, written into each trial's configuration and ``best_config.yaml``, and
put into the state each trial trains (a wrapper around
:func:`orchard_jax.core.state.create_train_state` records it). A second, shorter
study (``quick`` preset) adds ``rotation_angle`` through a range; without the
section a range for it is refused in one line, by ``validate`` and ``run``, and
so is one for the strength a dataset's flag turns off (``rotation_angle`` for
anatomical data, ``jitter_val`` for texture-based), which the ``full`` preset
then does not search. The unit-level rules are tests/study/test_space_augment.py's.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import pathlib
import threading

import jax
import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from orchard_jax.cli import main
from orchard_jax.core import state as core_state
from orchard_jax.records import CONFIG
from orchard_jax.study.recipe import load_recipe
from orchard_jax.study.validate import validate_recipe

AUGMENTATION = ("rotation_angle", "jitter_val", "min_scale")
RANGES = {"rotation_angle": (0, 15), "jitter_val": (0.0, 0.15), "min_scale": (0.9, 1.0)}
SEARCHED = ("; searching learning_rate 0.05..0.5 log, weight_decay 1e-06..0.001 log, momentum "
            "0.85..0.95, min_lr 1e-07..1e-05 log, label_smoothing 0..0.2, rotation_angle 0..15, "
            "jitter_val 0..0.15, min_scale 0.9..1")
ROTATION = "optuna.search_space_overrides.rotation_angle={low: 2, high: 4}"


def write_recipe(root: pathlib.Path, npz: pathlib.Path, *, augment: bool = True) -> pathlib.Path:
  """A ``full`` study of 3 one-epoch trials; what would compile a program per value is fixed
  (optimizer, batch size, dropout, loss, MixUp, scheduler), the rest of the preset searched."""
  data = {
      "dataset": {"source": "npz", "path": str(npz)},
      "architecture": {"name": "mlp", "options": {"hidden": [16]}},
      "training": {"seed": 3, "batch_size": 16, "epochs": 2, "use_amp": False,
                   "monitor_metric": "accuracy", "mixup_alpha": 0.0, "mixup_epochs": 0,
                   "scheduler_type": "none", "use_tqdm": False},
      "optuna": {"study_name": "augment", "n_trials": 3, "epochs": 1, "sampler_type": "random",
                 "enable_pruning": False, "enable_early_stopping": False, "save_plots": False,
                 "show_progress_bar": False, "search_space_preset": "full",
                 "search_space_overrides": {
                     "learning_rate": {"low": 0.05, "high": 0.5, "log": True},
                     "optimizer_type": None, "batch_size_low_res": None, "dropout": None,
                     "criterion_type": None, "focal_gamma": None, "mixup_alpha": None,
                     "scheduler_type": None, "scheduler_patience": None}},
      "telemetry": {"output_dir": str(root / "run"), "compilation_cache": None},
  }
  if augment:
    data["augmentation"] = {"hflip": 0.0}  # the recipe's flip, not searched
  path = root / ("augment.yaml" if augment else "plain.yaml")
  path.write_text(yaml.safe_dump(data))
  return path


def run_in_process(*argv: str) -> tuple[int, str]:
  """``orchard-jax`` with ``argv`` in this process; its exit status and its log (stderr)."""
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    status = main(list(argv))
  return status, err.getvalue()


def csv_rows(run_dir: pathlib.Path) -> list[dict[str, str]]:
  return list(csv.DictReader(open(run_dir / "trials.csv", encoding="utf-8")))


@pytest.fixture(scope="module")
def study(tmp_path_factory, workdir):
  """The ``full`` study, run once; the strengths of every concrete state built during it."""
  root = tmp_path_factory.mktemp("augment_study")
  path = write_recipe(root, workdir / "tiny.npz")
  built = []
  create = core_state.create_train_state

  def recording(*args, **kwargs):
    state = create(*args, **kwargs)
    augment = state.hparams.augment
    # Not the states validate traces (shapes only), nor the one the compile-ahead thread builds
    # from the recipe's values (orchard_jax.study.ahead) and drops.
    if (augment is not None and not isinstance(augment.rotation_angle, jax.ShapeDtypeStruct)
        and threading.current_thread().name != "orchard_jax-compile-ahead"):
      built.append({k: float(v) for k, v in augment._asdict().items()})
    return state

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(core_state, "create_train_state", recording)
    status, log = run_in_process("run", str(path), "--final", "off")
  assert status == 0, log[-3000:]
  trials = sorted(optuna.load_study(study_name="augment",
                                    storage=f"sqlite:///{root / 'run' / 'study.db'}").trials,
                  key=lambda t: t.number)
  return path, root / "run", log, trials, built


def test_trials_csv_shows_the_three_sampled_inside_their_ranges(study):
  _, run_dir, _, _, _ = study
  rows = csv_rows(run_dir)
  assert [r["state"] for r in rows] == ["COMPLETE"] * 3
  for name, (low, high) in RANGES.items():
    values = [r[f"params_{name}"] for r in rows]
    assert all(low <= float(v) <= high for v in values), (name, values)
    assert len(set(values)) == 3, (name, values)  # sampled per trial, not the recipe's value
  assert all(v.isdigit() for v in (r["params_rotation_angle"] for r in rows))  # an int


def test_the_storage_holds_the_same_values_with_the_ranges_as_distributions(study):
  _, run_dir, _, trials, _ = study
  assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
  for trial, row in zip(trials, csv_rows(run_dir)):
    assert isinstance(trial.params["rotation_angle"], int)
    assert {n: trial.params[n] for n in AUGMENTATION} == {
        "rotation_angle": int(row["params_rotation_angle"]),
        "jitter_val": float(row["params_jitter_val"]),
        "min_scale": float(row["params_min_scale"])}
    assert [trial.distributions[n] for n in AUGMENTATION] == [
        IntDistribution(0, 15), FloatDistribution(0.0, 0.15), FloatDistribution(0.9, 1.0)]


def test_the_first_log_line_lists_them_among_the_searched_parameters(study):
  _, _, log, _, _ = study
  first = log.splitlines()[0]
  assert first.startswith("Study 'augment': 3 trials of 1 epochs, full preset") and \
      first.endswith(SEARCHED), first


def test_validate_accepts_the_recipe_and_checks_the_ranges_extremes(study, capsys):
  path, _, _, _, _ = study
  assert main(["validate", str(path)]) == 0
  out, err = capsys.readouterr()
  assert err == "" and out.splitlines() == [
      f"{path} is valid: tiny (96 train, 48 val, 48 test), inputs 8x8x1, 3 classes; model mlp; "
      f"2 search-space configurations checked (batch size 16), nothing trained"]
  checked = validate_recipe(path).configurations  # what the command checked
  assert {n: sorted({c[n] for c in checked}) for n in AUGMENTATION} == {
      n: list(r) for n, r in RANGES.items()}


def test_each_trial_trains_a_state_with_its_own_strengths(study):
  """The values reach the state (``Hyperparams.augment``) each trial trains, as float32."""
  _, _, _, trials, built = study
  expected = [{"hflip": 0.0, **{n: float(np.float32(t.params[n])) for n in AUGMENTATION}}
              for t in trials]
  assert sorted(built, key=str) == sorted(expected, key=str)


def test_the_trial_configs_and_best_config_carry_the_strengths_a_retraining_uses(study):
  _, run_dir, _, trials, _ = study
  for trial in trials:  # the configuration each trial stored as it started
    stored = trial.user_attrs[CONFIG]["augmentation"]
    assert {n: stored[n] for n in AUGMENTATION} == {n: trial.params[n] for n in AUGMENTATION}
    assert stored["hflip"] == 0.0
  best = trials[json.loads((run_dir / "best_model" / "trial.json").read_text())["number"]]
  # what the final phase (and orchard-jax run best_config.yaml) trains: orchard_jax.study.phases
  retrain = load_recipe(run_dir / "best_config.yaml").training.augmentation
  assert {n: getattr(retrain, n) for n in AUGMENTATION} == {
      n: best.params[n] for n in AUGMENTATION}
  assert retrain.hflip == 0.0
  # recipe.yaml keeps the recipe's ranges: the preset's three, not given, are not listed there
  saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
  assert not set(AUGMENTATION) & set(saved["optuna"]["search_space_overrides"])


def test_a_range_adds_rotation_angle_to_the_quick_preset(study, capsys):
  path, _, _, _, _ = study
  sets = ["--set", "optuna.search_space_preset=quick", "--set", ROTATION,
          "--set", "optuna.n_trials=2"]
  assert main(["validate", str(path), *sets]) == 0
  assert capsys.readouterr().err == ""
  run_dir = path.parent / "quick"
  status, log = run_in_process("run", str(path), *sets, "--output", str(run_dir),
                               "--final", "off")
  assert status == 0, log[-3000:]
  assert log.splitlines()[0].endswith(
      "; searching learning_rate 0.05..0.5 log, weight_decay 1e-06..0.001 log, momentum "
      "0.85..0.95, min_lr 1e-07..1e-05 log, rotation_angle 2..4")
  rows = csv_rows(run_dir)
  assert [r["state"] for r in rows] == ["COMPLETE"] * 2
  assert all(r["params_rotation_angle"] in ("2", "3", "4") for r in rows), rows
  assert not {"params_jitter_val", "params_min_scale", "params_label_smoothing"} & set(rows[0])
  saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
  assert saved["optuna"]["search_space_overrides"]["rotation_angle"] == {
      "low": 2, "high": 4, "step": 1}


def test_without_augmentation_a_range_for_it_is_refused_by_validate_and_run_alike(
    workdir, tmp_path, capsys):
  path = write_recipe(tmp_path, workdir / "tiny.npz", augment=False)
  line = ("orchard-jax: error: optuna.search_space_overrides.rotation_angle: the trials do not "
          "augment (the recipe has no augmentation: section), so rotation_angle would change "
          "nothing; add an augmentation: section or remove rotation_angle")
  assert main(["validate", str(path), "--set", ROTATION]) == 2
  out, err = capsys.readouterr()
  assert (out, err.splitlines()) == ("", [line])
  assert main(["run", str(path), "--set", ROTATION]) == 2
  out, err = capsys.readouterr()
  assert (out, err.splitlines()) == ("", [line])
  assert not (tmp_path / "run").exists()  # nothing trained, no storage opened


@pytest.mark.parametrize("flag, name, transform", [
    ("is_anatomical", "rotation_angle", "rotate"),
    ("is_texture_based", "jitter_val", "jitter colours"),
])
def test_a_strength_the_datasets_flag_turns_off_is_neither_searched_nor_given_a_range(
    flag, name, transform, study, capsys):
  """Anatomical data is never rotated, texture-based never colour-jittered: the full preset
  leaves that strength out, and a range for it is refused as without augmentation."""
  path, _, _, _, _ = study
  on = f"dataset.{flag}=true"
  checked = validate_recipe(path, [on]).configurations
  assert all(name not in c for c in checked)
  assert {n for c in checked for n in c} >= set(AUGMENTATION) - {name}
  given = f"optuna.search_space_overrides.{name}={{low: 0, high: 1}}"
  line = (f"orchard-jax: error: optuna.search_space_overrides.{name}: the trials do not "
          f"{transform} (dataset.{flag}: true), so {name} would change nothing; set "
          f"dataset.{flag}: false or remove {name}")
  assert main(["validate", str(path), "--set", on, "--set", given]) == 2
  out, err = capsys.readouterr()
  assert (out, err.splitlines()) == ("", [line])
  run_dir = path.parent / f"refused_{flag}"
  assert main(["run", str(path), "--set", on, "--set", given, "--output", str(run_dir)]) == 2
  out, err = capsys.readouterr()
  assert (out, err.splitlines()) == ("", [line]) and not run_dir.exists()
