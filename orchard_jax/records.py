"""Every key a trial's records are stored under: the trial user attributes of Optuna.

One module for the engine (what :func:`~orchard_jax.engine.run_trial` and a
cohort write) and the study layer (what a study's driver, objective and
outputs write and read), so that a key is spelled once. Pure constants: no
imports, nothing global.
"""

# written by the engine, for every trial it trains
TRIAL_CONFIG = "trial_config"          # what the trial's TrialConfig held (run_trial)
ERROR = "error"                        # "<Type>: <message>": why the trial failed
CHECKPOINT_ERROR = "checkpoint_error"  # why the trial's best state could not be written
COHORT = "cohort"                      # {"size": K, "slot": i}: the cohort it trained in
SHARED_ORDER = "cohort_shared_order"   # a cohort member that read another loader order

# written by a study's driver and objective
CONFIG = "config"                      # the resolved recipe the trial trained with
HISTORY = "history"                    # a trial's epochs, as older studies stored them
INTERRUPTED = "interrupted"            # stopped by a signal (retried)
RETRY_OF = "retry_of"                  # the number of the trial whose parameters it repeats
STORAGE_FAULT = "storage_fault"        # the storage's error that stopped the trial (retried)
LOST = "lost"                          # the process running the trial died (retried)
RESOURCE_FAULT = "resource_fault"      # "memory: <the error>": it ran out of memory (retried once)
WORKER = "worker"                      # the name of the process that ran it
WORKER_ID = "worker_id"                # the unique id of the process that ran it
# scalar attributes (sortable in optuna-dashboard)
BEST_EPOCH, EPOCHS_RUN, SECONDS = "best_epoch", "epochs_run", "seconds"
EPOCH_PREFIX = "epoch_"                # epoch_01, epoch_02, ...: one epoch's values each
