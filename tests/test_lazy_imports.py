"""Modules imported only on the paths that need them, each checked in a fresh process.

flax's NNX only for NNX models, orbax only when a checkpoint is written or read,
matplotlib and scikit-learn (fANOVA's forests) only when a study writes its plots.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TIMEOUT = 180
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _child(code: str, *args: str, cwd=None) -> str:
  proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                        timeout=TIMEOUT, env=ENV, cwd=cwd)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


LINEN = """
import sys
import jax, jax.numpy as jnp
from orchard_jax.models import as_model, build_model
model = build_model("mlp", num_classes=3)
x = jnp.zeros((2, 8, 8, 1))
params, state = model.init(jax.random.key(0), x)
model.apply(params, state, x, train=True, rng=jax.random.key(1))
try:
  as_model(3)
except TypeError:
  pass
print("flax.nnx" in sys.modules)
"""


def test_a_linen_model_never_imports_nnx():
  assert _child(LINEN).split() == ["False"]


NNX_AFTER = """
import jax, jax.numpy as jnp
from orchard_jax.models import NNXModel, as_model
from flax import nnx  # imported after orchard_jax's models, as a user's model file does
model = as_model(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
params, state = model.init(jax.random.key(0), jnp.zeros((2, 4)))
logits, _ = model.apply(params, state, jnp.ones((2, 4)), train=True, rng=jax.random.key(1))
print(type(model).__name__, logits.shape)
"""


def test_an_nnx_module_made_after_importing_orchard_jax_is_still_adapted():
  assert _child(NNX_AFTER).split() == ["NNXModel", "(2,", "3)"]


TRIAL = """
import pathlib, sys
import numpy as np, optuna
from orchard_jax import MLP, run_trial
from orchard_jax.config import OptunaConfig, TrainingConfig, TrialConfig
x = np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32)
y = np.arange(32) % 2
loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 32, 16)]
cfg = TrialConfig(model=MLP(num_classes=2, hidden=(8,)), train_loader=loader, val_loader=loader,
                  num_classes=2, output_dir=pathlib.Path(sys.argv[1]) if sys.argv[1:] else None,
                  training=TrainingConfig(batch_size=16, use_amp=False, use_tqdm=False, epochs=1,
                                          mixup_alpha=0.0, scheduler_type="none"),
                  optuna=OptunaConfig(epochs=1, enable_pruning=False, pruner_type="none",
                                      storage="memory"))
run_trial(optuna.create_study(direction="maximize").ask(), cfg)
print("orbax" in sys.modules)
"""


@pytest.mark.parametrize("writes", [False, True])
def test_orbax_is_imported_only_by_a_trial_that_writes_checkpoints(writes, tmp_path):
  args = [str(tmp_path / "trials")] if writes else []
  assert _child(TRIAL, *args).split() == [str(writes)]


STUDY = """
import atexit, sys
atexit.register(lambda: print(sorted(m for m in ("matplotlib", "sklearn", "optuna.importance")
                                     if m in sys.modules)))
from orchard_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("plots", [False, True])
def test_a_study_imports_the_plotting_modules_only_when_it_writes_plots(plots, tmp_path):
  sets = {"architecture.name": "mlp", "optuna.n_trials": 2, "optuna.epochs": 1,
          "optuna.enable_pruning": "false", "optuna.enable_early_stopping": "false",
          "optuna.save_plots": str(plots).lower(), "optuna.show_progress_bar": "false",
          "telemetry.compilation_cache": "null"}
  args = ["run", "--output", str(tmp_path / "run")]
  for key, value in sets.items():
    args += ["--set", f"{key}={value}"]
  out = _child(STUDY, *args, cwd=tmp_path)
  expected = ["matplotlib", "optuna.importance", "sklearn"] if plots else []
  assert out.splitlines()[-1] == str(expected)
  assert (tmp_path / "run" / "plots" / "param_importances.png").exists() == plots
