"""The engine: one epoch loop with epoch-end callbacks, and what runs it.

* :func:`run_trial` -- the body of an Optuna objective (the reference's
  ``TrialTrainingExecutor`` plus its objective guard); :func:`train_trial` -- the same,
  returning the trial's :class:`Outcome` instead of raising.
* :func:`fit` -- the same loop without Optuna, with early stopping.
* :func:`train_epoch`, :func:`evaluate` -- one pass over a loader;
  :func:`compile_steps` -- their programs, compiled without training.
* :func:`run_loop` and the callbacks, for custom loops.
"""

from orchard_jax.engine.callbacks import (BestState, EarlyStopping, LRSchedulerStep,
                                          OptunaReportPrune)
from orchard_jax.engine.checkpoint import load_best, read_summary, save_best
from orchard_jax.engine.epoch import compile_steps, evaluate, train_epoch
from orchard_jax.engine.loop import (Callback, EpochLog, EpochLoop, LoopResult, fallback_metrics,
                                     run_loop, update_best, worst_value)
from orchard_jax.engine.outcome import Outcome
from orchard_jax.engine.trial import (FitResult, TrialTrainingExecutor, best_state_dir, fit,
                                      initial_state, load_best_state, run_trial, train_trial,
                                      trial_training_config)

__all__ = [
    "BestState", "Callback", "EarlyStopping", "EpochLog", "EpochLoop", "FitResult",
    "LRSchedulerStep", "LoopResult", "OptunaReportPrune", "Outcome", "TrialTrainingExecutor",
    "best_state_dir", "compile_steps", "evaluate", "fallback_metrics", "fit", "initial_state",
    "load_best", "load_best_state", "read_summary", "run_loop", "run_trial", "save_best",
    "train_epoch", "train_trial", "trial_training_config", "update_best", "worst_value",
]
