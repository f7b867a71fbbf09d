"""Compiling the first trial's programs while the study opens (orchard_jax.study.ahead)."""

from __future__ import annotations

import threading

import jax
import numpy as np
import optuna
import pytest

from orchard_jax.engine import executables
from orchard_jax.study import opening, runner
from orchard_jax.study.ahead import CompileAhead, program_params
from orchard_jax.study.recipe import parse_recipe
from orchard_jax.study.sources import array_source
from orchard_jax.study.space import build_space

def tiny_source():
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 40), ("val", 20)):
    labels = np.arange(n) % 3
    images = rng.normal(0.0, 0.1, (n, 4, 4)).astype(np.float32)
    for c in range(3):
      images[labels == c, c, :] += 1.0
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
  return array_source("tiny", arrays, None, eval_batch_size=16)


def tiny_recipe(tmp_path, **overrides):
  keep = {"optimizer_type": None, "batch_size_low_res": None, "dropout": None}
  return parse_recipe({
      "architecture": {"name": "mlp", "dropout": 0.1, "options": {"hidden": [8]}},
      "training": {"seed": 0, "batch_size": 16, "mixup_alpha": 0.0, "mixup_epochs": 0,
                   "scheduler_type": "none"},
      "optuna": {"study_name": "ahead", "n_trials": 3, "epochs": 2, "sampler_type": "random",
                 "search_space_preset": "quick",
                 "enable_pruning": False, "enable_early_stopping": False, "storage": "memory",
                 "show_progress_bar": False, "save_plots": False,
                 "search_space_overrides": {**keep, **overrides}},
      "telemetry": {"output_dir": str(tmp_path / "run"), "compilation_cache": None}})


def fresh_caches():
  executables.clear()
  jax.clear_caches()


def run(tmp_path, recipe=None) -> None:
  recipe = recipe or tiny_recipe(tmp_path)
  tmp_path.mkdir(parents=True, exist_ok=True)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  with open(tmp_path / "out", "w") as out:
    assert runner.run_study(recipe, tiny_source(), tmp_path / "run", out=out) == 0


def values(tmp_path) -> list[float]:
  import csv
  with open(tmp_path / "run" / "trials.csv") as f:
    return [float(row["value"]) for row in csv.DictReader(f)]


def test_the_study_compiles_every_program_ahead_and_its_trials_compile_none(tmp_path,
                                                                             xla_compiles):
  fresh_caches()
  with xla_compiles() as compiles:
    run(tmp_path)
  assert compiles.threads.count("orchard_jax-compile-ahead") >= 3  # build, train, eval, packing
  assert set(compiles.threads) == {"orchard_jax-compile-ahead"}


def test_a_study_in_cohorts_compiles_its_cohort_programs_ahead_and_its_trials_none(
    tmp_path, xla_compiles):
  # 5 trials in cohorts of 2: formation, refills, steps, packing, best copies -- all ahead
  import dataclasses  # pylint: disable=import-outside-toplevel
  recipe = tiny_recipe(tmp_path)
  recipe = dataclasses.replace(recipe, study=dataclasses.replace(
      recipe.study, config=recipe.study.config.replace(cohort_size=2, n_trials=5)))
  fresh_caches()
  with xla_compiles() as compiles:
    run(tmp_path, recipe)
  assert compiles.by_name["jit(_cohort_train_step)"] == 1, compiles.by_name
  assert set(compiles.threads) == {"orchard_jax-compile-ahead"}, [
      (name, thread) for name, thread in zip(compiles.by_name, compiles.threads)]
  assert len(values(tmp_path)) == 5


def test_compiling_ahead_changes_no_result(tmp_path, monkeypatch, xla_compiles):
  fresh_caches()
  run(tmp_path / "ahead")

  class Off(CompileAhead):
    def __init__(self, *args):
      self.reason, self._thread = "off", None

  monkeypatch.setattr(runner, "CompileAhead", Off)
  fresh_caches()
  with xla_compiles() as compiles:
    run(tmp_path / "off")
  assert set(compiles.threads) == {"MainThread"}  # the trials compiled them instead
  assert values(tmp_path / "ahead") == values(tmp_path / "off")


@pytest.mark.parametrize("key, choices, name", [("dropout", [0.1, 0.2], "dropout"),
                                                ("optimizer_type", ["sgd"], "optimizer_type"),
                                                ("batch_size_low_res", [8, 16], "batch_size")])
def test_nothing_is_compiled_ahead_when_the_space_samples_a_program_parameter(tmp_path, key,
                                                                            choices, name):
  recipe = tiny_recipe(tmp_path, **{key: choices})
  space = build_space(recipe.study, (4, 4, 1), "mlp")
  assert program_params(space) == [name]
  ahead = CompileAhead(recipe, tiny_source(), space)
  assert not ahead.started and name in ahead.reason
  ahead.wait()  # nothing to wait for


def test_the_bundled_recipe_compiles_ahead_and_the_full_preset_does_not():
  from orchard_jax.study.recipe import load_recipe
  bundled = load_recipe(None)
  assert program_params(build_space(bundled.study, (8, 8, 1), "mini_cnn")) == []
  full = load_recipe(None, ["optuna.search_space_preset=full"])
  assert {"criterion_type", "mixup_alpha"} <= set(
      program_params(build_space(full.study, (8, 8, 1), "mini_cnn")))


def test_a_function_source_is_not_compiled_ahead(tmp_path):
  recipe = tiny_recipe(tmp_path)

  class Loaders:  # not an ArraySource: its loaders may be shared with the trials
    input_shape, num_classes = (4, 4, 1), 3

  ahead = CompileAhead(recipe, Loaders(), build_space(recipe.study, (4, 4, 1), "mlp"))
  assert not ahead.started and "loader function" in ahead.reason


def test_a_failure_ahead_is_left_to_the_first_trial(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("no programs today")

  monkeypatch.setattr("orchard_jax.engine.compile_steps", broken)
  recipe = tiny_recipe(tmp_path)
  ahead = CompileAhead(recipe, tiny_source(), build_space(recipe.study, (4, 4, 1), "mlp"))
  ahead.wait()
  assert isinstance(ahead.error, RuntimeError)


def test_a_study_that_fails_to_open_waits_for_the_compile_before_raising(tmp_path, monkeypatch):
  def unreachable(recipe, url, *args, **kwargs):
    raise RuntimeError("storage is down")

  monkeypatch.setattr(opening, "open_study", unreachable)
  fresh_caches()
  with pytest.raises(RuntimeError, match="storage is down"):
    run(tmp_path)
  assert not [t for t in threading.enumerate() if t.name == "orchard_jax-compile-ahead"]
  assert executables.stats("train_step")["compiled"] == 1  # it had finished, not been dropped
