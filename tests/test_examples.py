"""The README's own-model example is examples/own_model_tabular.py, verbatim, and it runs."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "own_model_tabular.py"
MARKER = "<!-- example: examples/own_model_tabular.py -->"


def readme_block() -> str:
  """The ```python block that follows the example's marker in the README."""
  readme = (ROOT / "README.md").read_text()
  assert readme.count(MARKER) == 1, "the README must show the example once, after its marker"
  after = readme.split(MARKER, 1)[1]
  match = re.match(r"\s*```python\n(.*?)^```$", after, re.S | re.M)
  assert match, "the marker must be followed by a ```python block"
  return match.group(1)


def test_the_readme_shows_the_example_file_verbatim():
  assert readme_block() == EXAMPLE.read_text()


def test_the_readme_example_is_in_the_your_model_section():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Your model and your data", 1)[1].split("\n## ", 1)[0]
  assert MARKER in section
  for words in ("make_loader", "NCHW", "integer class ids", "training.seed", "nnx.Rngs",
                "batch_size", "pruning_warmup_epochs"):
    assert words in section, words


def test_the_example_runs_a_short_study_of_its_own_linen_module(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, str(EXAMPLE), "--n-trials", "2", "--epochs", "3"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  best = re.search(r"^best trial #(\d+): validation auc ([0-9.]+)$", proc.stdout, re.M)
  assert best, proc.stdout
  assert float(best.group(2)) >= 0.95
  assert re.search(r"^best params: learning_rate=\S+, weight_decay=\S+, label_smoothing=\S+$",
                   proc.stdout, re.M), proc.stdout
  # The visible defaults: each trial says what it runs with, MixUp off as the example asks.
  lines = re.findall(r"^Trial (\d): precision \w+, MixUp off, label smoothing [0-9.]+, "
                     r"class weights off$", proc.stderr, re.M)
  assert lines == ["0", "1"], proc.stderr[-3000:]
  assert "\r" not in proc.stderr  # no progress bar in a redirected log (use_tqdm defaults on)


def test_the_example_trains_its_trials_in_a_cohort(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, str(EXAMPLE), "--n-trials", "3", "--epochs", "3",
                         "--cohort-size", "2"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Cohort of 2: trials 0, 1" in proc.stderr, proc.stderr[-3000:]
  best = re.search(r"^best trial #(\d+): validation auc ([0-9.]+)$", proc.stdout, re.M)
  assert best and float(best.group(2)) >= 0.95, proc.stdout
