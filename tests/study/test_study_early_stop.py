"""A study stopped by early stopping says so: one line (metric, value, threshold, trials run) in
the log and in the end summary, for ``run`` and ``worker``; exit status 0."""

from __future__ import annotations

import io
import logging

import optuna
import pytest
from optuna.trial import TrialState

from orchard_jax.study.recipe import parse_recipe
from orchard_jax.study.runner import run_study
from orchard_jax.study.opening import join_study
from orchard_jax.study.workers import run_worker

from tests.study.test_ahead import tiny_source  # noqa: E402  (the tiny data of the study tests)

N_TRIALS = 4


def early_recipe(tmp_path, name: str):
  """4 one-epoch trials of a tiny MLP, validation loss minimized; early stopping at loss <= 50,
  which every trial reaches: the study stops after 2 (the patience)."""
  return parse_recipe({
      "architecture": {"name": "mlp", "options": {"hidden": [8]}},
      "training": {"seed": 0, "batch_size": 16, "mixup_alpha": 0.0, "mixup_epochs": 0,
                   "scheduler_type": "none", "monitor_metric": "loss",
                   "monitor_direction": "minimize"},
      "optuna": {"study_name": name, "n_trials": N_TRIALS, "epochs": 1, "sampler_type": "random",
                 "search_space_preset": "quick", "enable_pruning": False,
                 "enable_early_stopping": True, "early_stopping_threshold": 50.0,
                 "early_stopping_patience": 2, "storage": f"sqlite:///{tmp_path / 'study.db'}",
                 "show_progress_bar": False, "save_plots": False,
                 "search_space_overrides": {"optimizer_type": None, "batch_size_low_res": None,
                                            "dropout": None}},
      "telemetry": {"output_dir": str(tmp_path / "run"), "compilation_cache": None}})


def run_in_process(tmp_path, caplog, path: str):
  recipe = early_recipe(tmp_path, path)
  url = recipe.study.config.storage
  out = io.StringIO()
  caplog.set_level(logging.INFO, logger="orchard_jax")
  if path == "run":
    status = run_study(recipe, tiny_source(), tmp_path / "run", out=out)
  else:
    joined = join_study(recipe, url)
    status = run_worker(recipe, tiny_source(), tmp_path / "run", joined, name="w1", out=out)
  trials = optuna.load_study(study_name=path, storage=url).trials
  return status, trials, out.getvalue(), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("path", ["run", "worker"])
def test_a_study_stopped_by_early_stopping_announces_it_in_one_line(tmp_path, caplog, path):
  status, trials, out, logged = run_in_process(tmp_path, caplog, path)
  assert status == 0
  assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # 2 of 4: stopped early
  assert all(t.value <= 50.0 for t in trials)
  line = (f"Early stopping: loss {trials[1].value:.6f} <= threshold 50 in 2 consecutive trials; "
          f"the study stopped after 2 of {N_TRIALS} trials (2 not run)")
  assert [m for m in logged if m.startswith("Early stopping")] == [line]  # logged once
  assert f"Study '{path}': 2 trials, 2 complete, 0 pruned, 0 failed" in out
  assert out.rstrip().endswith(f"\n{line}.")  # the summary says so too
  assert "short of optuna.n_trials" not in out
