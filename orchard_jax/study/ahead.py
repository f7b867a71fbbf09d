"""The first trial's programs, compiled while the study opens.

Before its first trial a study opens its storage and creates or loads the
study (about 2 s of Python with sqlite), and the first trial then compiles
its state build, training step and evaluation step (about 5 s for MiniCNN on
2 CPU cores with nothing cached). When every trial of the study compiles the
same programs -- the search space samples nothing that changes a program --
those are the programs of the recipe's own values, and
:class:`CompileAhead` compiles them on a background thread while the study
opens: XLA compiles without holding the GIL. The first trial then finds them
in memory (:mod:`orchard_jax.engine.executables`). With a warm executable cache
the thread loads them from disk instead.

The thread trains nothing the study keeps: it builds a state from the
recipe's values, runs one training step and one evaluation step on the first
batch of loaders of its own, and drops them. It only runs for sources whose
loaders are independent in-memory arrays (digits, npz): a user's loader
function could hand back shared loaders whose shuffling the extra pass
would move. If it fails, the failure is logged at debug level and the first
trial compiles as it would have (and raises the error itself).

The thread starts before the study is opened, so a resumed study with no
trial left to run also waits for it (once: with a warm cache the thread
only loads the programs).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from orchard_jax.study.build import trial_config
from orchard_jax.study.sources import ArraySource

logger = logging.getLogger(__name__)

__all__ = ["CompileAhead", "PROGRAM_PARAMS", "program_params"]

# Sampled parameters whose values change a compiled program (model, optimizer
# kind, criterion, batch shape, whether MixUp is compiled in).
PROGRAM_PARAMS = ("optimizer_type", "criterion_type", "dropout", "batch_size", "mixup_alpha",
                  "model_name")


def program_params(space: Any) -> list[str]:
  """The parameters ``space`` samples that change the compiled programs."""
  names = [name for name in space.dists if name in PROGRAM_PARAMS]
  return names + (["model_name"] if space.model_pool else [])


class CompileAhead:
  """Compiles the first trial's programs on a thread; :meth:`wait` before the first trial.

  A context manager: leaving the ``with`` block waits for the thread too.

  ``CompileAhead(recipe, source, space)`` starts nothing when the space
  samples a parameter of :data:`PROGRAM_PARAMS` (the first trial's programs
  are not known yet) or the source is not an :class:`ArraySource`;
  ``reason`` then says why.
  """

  def __init__(self, recipe: Any, source: Any, space: Any):
    self.reason: str | None = None
    self.seconds: float | None = None
    self.error: BaseException | None = None
    sampled = program_params(space)
    if sampled:
      self.reason = f"the search space samples {', '.join(sampled)}"
    elif not isinstance(source, ArraySource):
      self.reason = "the data come from a user's loader function"
    self._thread = None
    if self.reason is None:
      self._thread = threading.Thread(target=self._run, args=(recipe, source),
                                      name="orchard_jax-compile-ahead")
      self._thread.start()
    else:
      logger.debug("Not compiling ahead: %s", self.reason)

  @property
  def started(self) -> bool:
    return self._thread is not None

  def _run(self, recipe: Any, source: Any) -> None:
    from orchard_jax.engine import compile_steps, initial_state, trial_training_config

    start = time.perf_counter()
    try:
      cfg = trial_config(recipe, source, {}, output_dir=None)
      training = trial_training_config(cfg)
      state, cohort_size = initial_state(cfg, training), recipe.study.config.cohort_size
      if cohort_size > 1:  # the first cohort's programs, not a solo trial's
        from orchard_jax.engine.cohort_run import compile_cohort_steps
        compile_cohort_steps(state, cfg.train_loader, cfg.val_loader, layout=cfg.layout,
                             cohort_size=cohort_size)
      else:
        compile_steps(state, cfg.train_loader, cfg.val_loader, layout=cfg.layout)
    except Exception as e:  # pylint: disable=broad-except  # the first trial meets it again
      self.error = e
      logger.debug("Compiling ahead failed (%s: %s); the first trial compiles", type(e).__name__, e)
    self.seconds = time.perf_counter() - start
    if self.error is None:
      logger.debug("The first trial's programs were ready in %.1f s", self.seconds)

  def wait(self) -> None:
    """Returns once the thread is done (at once if none was started)."""
    if self._thread is not None:
      self._thread.join()

  def __enter__(self) -> "CompileAhead":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.wait()  # on every way out, errors included: no compile outlives the study
