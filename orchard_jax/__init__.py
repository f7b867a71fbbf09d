"""orchard_jax: Optuna trials on JAX.

The public API. The pure core (``orchard_jax.core``) imports neither optuna
nor torch; the shell (data adapter, epoch loop, Optuna, command line) sits
around it.

Importing the package first sets glibc's allocator to keep freed memory
(``orchard_jax.hostmem``; ``ORCHARD_JAX_MALLOC=system`` leaves it alone),
before JAX is imported.
"""

from orchard_jax import hostmem as _hostmem

_hostmem.tune_on_import()

from orchard_jax.config import ConfigError, OptunaConfig, TrainingConfig, TrialConfig, resolve_precision
from orchard_jax.core.losses import compute_class_weights, cross_entropy, focal_loss, mixup
from orchard_jax.core.metrics import classification_metrics, macro_f1, roc_auc
from orchard_jax.core.optim import optimizer, set_hyperparams
from orchard_jax.core.precision import LossScale, Policy, parse_policy
from orchard_jax.core.schedules import LRController, epoch_schedule, plateau
from orchard_jax.core.state import Hyperparams, StepSpec, TrainState, create_train_state, state_from_config
from orchard_jax.core.steps import eval_step, train_step
from orchard_jax.engine import (FitResult, TrialTrainingExecutor, evaluate, fit, load_best_state,
                                run_trial, train_epoch)
from orchard_jax.models import MLP, MiniCNN, Model, as_model, build_model

__version__ = "0.1.0"
