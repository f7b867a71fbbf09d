"""orchard_jax: Optuna trials on JAX.

The public API. The pure core (``orchard_jax.core``) imports neither optuna
nor torch; the shell (data adapter, epoch loop, Optuna, command line) sits
around it.

Importing the package changes nothing in the process: the allocator setting
that speeds up XLA:CPU's large step buffers is an explicit call,
:func:`tune_host_memory` (``orchard_jax.hostmem``), which the ``orchard-jax``
command makes. The names below are imported on first use (PEP 562),
so that ``orchard-jax --help`` and ``init`` answer without importing JAX;
``from orchard_jax import run_trial`` and ``orchard_jax.run_trial`` work as
ever.
"""

import importlib as _importlib
from typing import TYPE_CHECKING

from orchard_jax import hostmem
from orchard_jax._version import __version__
from orchard_jax.hostmem import tune_host_memory

# name -> the module it comes from
_EXPORTS = {
    **dict.fromkeys(("AugmentationConfig", "ConfigError", "OptunaConfig", "TrainingConfig", "TrialConfig",
                     "resolve_precision"), "orchard_jax.config"),
    **dict.fromkeys(("compute_class_weights", "cross_entropy", "focal_loss", "mixup"),
                    "orchard_jax.core.losses"),
    **dict.fromkeys(("classification_metrics", "macro_f1", "roc_auc"), "orchard_jax.core.metrics"),
    **dict.fromkeys(("optimizer", "set_hyperparams"), "orchard_jax.core.optim"),
    **dict.fromkeys(("LossScale", "Policy", "parse_policy"), "orchard_jax.core.precision"),
    **dict.fromkeys(("LRController", "epoch_schedule", "plateau"), "orchard_jax.core.schedules"),
    **dict.fromkeys(("Hyperparams", "StepSpec", "TrainState"), "orchard_jax.core.state"),
    **dict.fromkeys(("eval_step", "train_step"), "orchard_jax.core.steps"),
    **dict.fromkeys(("FitResult", "TrialTrainingExecutor", "evaluate", "fit", "load_best_state",
                     "run_trial", "train_epoch"), "orchard_jax.engine"),
    **dict.fromkeys(("create_train_state", "state_from_config"), "orchard_jax.engine.first_state"),
    "optimize": "orchard_jax.engine.driver",
    **dict.fromkeys(("MLP", "MiniCNN", "Model", "as_model", "build_model"), "orchard_jax.models"),
    **dict.fromkeys(("write_outputs",), "orchard_jax.study.outputs"),
    "load_model": "orchard_jax.study.loading",
    "StudyOutputs": "orchard_jax.study.study_callbacks",
}
# Subpackages and modules, bound as attributes on first use as an import would.
_MODULES = ("config", "core", "data", "engine", "errors", "fileio", "models", "study")

__all__ = [*_EXPORTS, "__version__", "tune_host_memory"]


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is not None:
    value = getattr(_importlib.import_module(module), name)
  elif name in _MODULES:
    value = _importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *_EXPORTS, *_MODULES})


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
  from orchard_jax.config import (AugmentationConfig, ConfigError, OptunaConfig, TrainingConfig,
                                  TrialConfig, resolve_precision)
  from orchard_jax.core.losses import compute_class_weights, cross_entropy, focal_loss, mixup
  from orchard_jax.core.metrics import classification_metrics, macro_f1, roc_auc
  from orchard_jax.core.optim import optimizer, set_hyperparams
  from orchard_jax.core.precision import LossScale, Policy, parse_policy
  from orchard_jax.core.schedules import LRController, epoch_schedule, plateau
  from orchard_jax.core.state import Hyperparams, StepSpec, TrainState
  from orchard_jax.core.steps import eval_step, train_step
  from orchard_jax.engine import (FitResult, TrialTrainingExecutor, evaluate, fit,
                                  load_best_state, run_trial, train_epoch)
  from orchard_jax.engine.driver import optimize
  from orchard_jax.engine.first_state import create_train_state, state_from_config
  from orchard_jax.models import MLP, MiniCNN, Model, as_model, build_model
  from orchard_jax.study.loading import load_model
  from orchard_jax.study.study_callbacks import StudyOutputs
  from orchard_jax.study.outputs import write_outputs
