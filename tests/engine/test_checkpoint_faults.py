"""The best-state checkpoint on a really full disk (a size-limited tmpfs, filled).

A trained trial must keep its value when its checkpoint cannot be written,
the cause must be named in one line, and nothing half-written may be left.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from orchard_jax.engine import (best_state_dir, fit, initial_state, load_best, read_summary,
                                run_trial, save_best)

NO_SPACE = "No space left on device"


@pytest.fixture
def full_disk(tmpfs, disk_filler):
  """A 1 MiB tmpfs filled until two pages stay free: orbax starts writing, then fails."""
  path = tmpfs("1m")
  disk_filler(path, leave=8192)
  return path


def left_in(path):
  """What a run left on the full disk besides the filler."""
  return sorted(p.name for p in path.iterdir() if p.name != "filler")


def test_a_full_disk_keeps_the_trials_value_and_records_the_cause(make_cfg, study_factory,
                                                                  full_disk, tmp_path, caplog):
  expected = run_trial(study_factory().ask(), make_cfg(output_dir=tmp_path / "roomy"))
  assert (best_state_dir(tmp_path / "roomy", 0) / "checkpoint").is_dir()

  study = study_factory()
  with caplog.at_level(logging.WARNING, logger="orchard_jax.engine.callbacks"):
    value = run_trial(study.ask(), make_cfg(output_dir=full_disk))

  assert value == expected
  attrs = study.trials[0].user_attrs
  assert "error" not in attrs and NO_SPACE in attrs["checkpoint_error"]
  assert "\n" not in attrs["checkpoint_error"] and len(attrs["checkpoint_error"]) <= 300
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(m.startswith(f"Trial 0: the best state could not be written to "
                          f"{best_state_dir(full_disk, 0)}: ") and NO_SPACE in m
             and m.endswith("; the trial keeps its value") for m in warnings), warnings
  assert left_in(full_disk) == []  # no trial_0/, no .trial_0.tmp-*, no orbax tmp folder


def test_a_full_disk_under_fit_keeps_the_result_without_a_checkpoint_dir(make_cfg, full_disk,
                                                                         tmp_path, caplog):
  expected = fit(make_cfg(output_dir=tmp_path))
  assert expected.checkpoint_dir == best_state_dir(tmp_path)

  with caplog.at_level(logging.WARNING, logger="orchard_jax.engine.callbacks"):
    result = fit(make_cfg(output_dir=full_disk))

  assert (result.best, result.best_epoch) == (expected.best, expected.best_epoch)
  assert result.checkpoint_dir is None and result.best_state is not None
  assert f"Fit: the best state could not be written to {best_state_dir(full_disk)}" in caplog.text
  assert NO_SPACE in caplog.text and left_in(full_disk) == []


def test_a_failed_save_leaves_the_previous_checkpoint_whole_and_loadable(make_cfg, tmpfs,
                                                                         disk_filler):
  root = tmpfs("1m")
  directory = root / "trial_0"
  state = initial_state(make_cfg())
  first = {"epoch": 1, "value": 0.5, "metric": "auc"}
  save_best(directory, state.params, state.model_state, first)

  disk_filler(root, leave=0)
  doubled = jax.tree.map(lambda p: p * 2, state.params)
  with pytest.raises(Exception, match=NO_SPACE):
    save_best(directory, doubled, state.model_state, {"epoch": 2, "value": 0.9, "metric": "auc"})

  assert left_in(root) == ["trial_0"]  # the temporary folder is gone
  assert sorted(p.name for p in directory.iterdir()) == ["best.json", "checkpoint"]
  assert read_summary(directory) == first
  (root / "filler").unlink()
  restored = load_best(directory, initial_state(make_cfg(training={"seed": 7})))
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


THREADED_SAVES = """
import pathlib, sys, threading
import jax.numpy as jnp
from orchard_jax.engine import save_best
root = pathlib.Path(sys.argv[1])
def work(i):
  for j in range(8):
    save_best(root / f"t{i}" / f"{j}", {"w": jnp.full((4, 4), float(j))}, {}, {"j": j})
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print("saved", sum(1 for _ in root.glob("t*/*/checkpoint")))
"""


def test_saves_from_several_threads_of_one_process_all_finish(tmp_path):
  # optuna.n_jobs trains trials in threads: orbax checkpointers saving at once in one process
  # wait on each other's process-wide signals for ever unless the saves take turns.
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  proc = subprocess.run([sys.executable, "-c", THREADED_SAVES, str(tmp_path)], text=True,
                        capture_output=True, timeout=60, env={"JAX_PLATFORMS": "cpu",
                                                               "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["saved", "32"]


LIBRARY_USER = """
import logging, pathlib, sys
if sys.argv[2] == "configured":
  logging.basicConfig(level=logging.INFO)  # as the README shows
import numpy as np, optuna
from orchard_jax import MLP, run_trial
from orchard_jax.config import OptunaConfig, TrainingConfig, TrialConfig
from orchard_jax.engine import best_state_dir, initial_state, load_best
x = np.random.default_rng(0).normal(size=(48, 1, 8, 8)).astype(np.float32)
y = np.arange(48) % 3
loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
cfg = TrialConfig(model=MLP(num_classes=3, hidden=(8,)), train_loader=loader, val_loader=loader,
                  num_classes=3, output_dir=pathlib.Path(sys.argv[1]),
                  training=TrainingConfig(batch_size=16, use_amp=False, use_tqdm=False, epochs=2,
                                          mixup_alpha=0.0, scheduler_type="none"),
                  optuna=OptunaConfig(epochs=2, enable_pruning=False, pruner_type="none",
                                      storage="memory"))
def logging_state():
  root, absl = logging.getLogger(), logging.getLogger("absl")
  return root.level, list(root.handlers), absl.level, list(absl.filters), list(absl.handlers)
before = logging_state()
run_trial(optuna.create_study(direction="maximize").ask(), cfg)
load_best(best_state_dir(cfg.output_dir, 0), initial_state(cfg))
after = logging_state()
logging.getLogger("user").info("the user's own line")
print("UNCHANGED" if before == after else f"CHANGED {before} -> {after}")
"""


@pytest.mark.parametrize("logging_setup", ["configured", "bare"])
def test_checkpoints_log_nothing_of_orbax_and_leave_the_programs_logging_as_it_was(
    tmp_path, logging_setup):
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  proc = subprocess.run([sys.executable, "-c", LIBRARY_USER, str(tmp_path / "out"), logging_setup],
                        text=True, capture_output=True, timeout=120,
                        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["UNCHANGED"], proc.stdout  # bare: absl configured nothing
  assert (tmp_path / "out" / "trial_0" / "checkpoint").is_dir()
  lines = proc.stderr.splitlines()
  assert not [l for l in lines if "absl" in l or "orbax" in l.lower()], proc.stderr[-3000:]
  if logging_setup == "configured":  # the program's own INFO lines still show
    assert "INFO:user:the user's own line" in lines
    assert any(l.startswith("INFO:orchard_jax.engine.trial:Trial 0") for l in lines)


SAVES_ON_A_FULL_DISK = """
import logging, pathlib, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import jax
from orchard_jax.engine.callbacks import BestState
root, saves = pathlib.Path(sys.argv[1]), int(sys.argv[2])
key = jax.random.key(0)
params = {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (256, 256)) for i in range(32)}
for trial in range(saves):
  best = BestState(root / f"trial_{trial}", metric_name="auc", trial_number=trial)
  best.epoch, best.value, best.params, best.model_state = 1, 0.5, params, {}
  best.on_train_end(None)
  assert best.write_error is not None
"""


def test_a_save_that_fails_while_other_writes_run_prints_only_its_warning(tmpfs):
  # 32 arrays of 256 KiB on a 1 MiB disk: orbax closes its event loop at the first failed write
  # while TensorStore still writes others, whose results then reach the closed loop (a bare
  # "Event loop is closed" traceback on stderr, asyncio's "exception was never retrieved", and
  # files written into the temporary folder after its removal) unless the loop drains first.
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  root, saves = tmpfs("1m"), 20
  proc = subprocess.run([sys.executable, "-c", SAVES_ON_A_FULL_DISK, str(root), str(saves)],
                        text=True, capture_output=True, timeout=120,
                        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == saves, proc.stderr[-3000:]
  for trial, line in enumerate(lines):
    assert line.startswith(f"Trial {trial}: the best state could not be written to "
                           f"{root / f'trial_{trial}'}: ") and NO_SPACE in line, line
    assert line.endswith("; the trial keeps its value"), line
  assert left_in(root) == []
