"""Per-epoch learning-rate schedules that match torch's LR schedulers.

The reference steps its torch LR scheduler once per epoch, after validation.
Epoch ``e`` (1-indexed) therefore trains with the learning rate the scheduler
holds after ``e - 1`` steps. Everything here is indexed the same way: a
schedule maps ``count`` = number of scheduler steps taken (0-based) to the
learning rate, so epoch ``e`` uses ``schedule(e - 1)``.

* :func:`epoch_schedule` -- closed forms of ``CosineAnnealingLR``, ``StepLR``
  and a constant, as ``optax.Schedule`` callables (jit-safe, vectorised over
  array counts).
* :func:`plateau` -- ``ReduceLROnPlateau`` (``threshold_mode="rel"``,
  ``cooldown=0``) as an optax-style pair of pure ``init`` / ``update``
  functions over a :class:`PlateauState` of arrays, float32 (jit-safe) or,
  on the host, float64 (torch's arithmetic).
* :class:`LRController` -- a small host-side object for the epoch loop:
  ``lr_for_epoch(epoch)`` before training, ``step(metric)`` after validation.

Learning rates are float32 (host counts: computed in float64, then rounded
to float32), except the controller's plateau rate: torch keeps it in a
Python float and multiplies it by the factor at each reduction, and a
float32 rate multiplied by a float32 factor rounds at every reduction, so the
error compounds (1.1e-7 relative after 5 reductions, 3.9e-7 after 11). The
controller's plateau state is therefore float64, as torch's arithmetic is
(comparisons of the metric included), and its rate is rounded to float32
once, when :meth:`~orchard_jax.core.state.TrainState.with_learning_rate`
writes it into the state. A float32 plateau state (the default of
:func:`plateau`, and the only one under jit) compares in float32, which only
matters for a metric within float32 rounding of the improvement threshold.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULER_TYPES = ("cosine", "step", "none", "plateau")
MONITOR_DIRECTIONS = {"maximize": "max", "minimize": "min"}
PLATEAU_MODES = ("max", "min")


# ----------------------------------------------------------------- checks ---


def _check_number(name: str, value: float, low: float, high: float,
                  *, low_open: bool = False, high_open: bool = False) -> None:
  """Raises ValueError unless ``value`` lies in the stated interval."""
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if isinstance(value, bool) or not math.isfinite(value) or too_low or too_high:
    interval = ("(" if low_open else "[") + f"{low}, {high}" + (
        ")" if high_open else "]")
    raise ValueError(f"{name} must be in {interval}, got {name}={value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
  """Raises ValueError unless ``value`` is an int >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(
        f"{name} must be an integer >= {minimum}, got {name}={value!r}")


def _check_choice(name: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(
        f"{name} must be one of {sorted(allowed)}, got {name}={value!r}")


# -------------------------------------------------------------- schedules ---


def _namespace(*values) -> tuple:
  """``(jnp, jnp.float32)`` for JAX arrays and tracers, else ``(np, np.float64)``.

  Host values (ints, floats, numpy arrays) are computed with numpy, in
  float64 before the final float32 rounding: the epoch loop reads one value
  per epoch, and an eager JAX op would dispatch (and, once per process,
  compile) a program for it.
  """
  if any(isinstance(v, jax.Array) for v in values):
    return jnp, jnp.float32
  return np, np.float64


def _cosine(learning_rate: float, min_lr: float, epochs: int) -> optax.Schedule:
  """torch ``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)``, closed form.

  ``lr(t) = min_lr + (lr0 - min_lr) * (1 + cos(pi t / T)) / 2``, written as
  ``min_lr + (lr0 - min_lr) * sin(pi (T - r) / (2T))**2`` with
  ``r = t mod 2T``. The two are equal; the second keeps float32 relative error
  near 2e-7 where the naive form loses ~1e-5 close to ``min_lr``. Past
  ``T_max`` torch's recursive update follows the same periodic curve (the lr
  climbs back towards ``lr0``), and so does this.
  """
  half_period_rad = math.pi / (2 * epochs)

  def schedule(count):
    xp, real = _namespace(count)
    r = xp.mod(xp.asarray(count, xp.int32), 2 * epochs)
    s = xp.sin((epochs - r).astype(real) * half_period_rad)
    return (min_lr + (learning_rate - min_lr) * s * s).astype(xp.float32)

  return schedule


def _step(learning_rate: float, step_size: int, factor: float) -> optax.Schedule:
  """torch ``StepLR(step_size, gamma=factor)``: ``lr0 * factor**(t // step)``."""

  def schedule(count):
    xp, real = _namespace(count)
    k = xp.floor_divide(xp.asarray(count, xp.int32), step_size)
    return (learning_rate * xp.power(real(factor), k)).astype(xp.float32)

  return schedule


def _constant(learning_rate: float) -> optax.Schedule:

  def schedule(count):
    xp, _ = _namespace(count)
    return xp.full(xp.shape(count), learning_rate, xp.float32)

  return schedule


def epoch_schedule(scheduler_type: str, *, learning_rate: float, min_lr: float,
                   epochs: int, step_size: int, factor: float
                   ) -> optax.Schedule:
  """Returns the per-epoch learning-rate schedule for ``scheduler_type``.

  Args:
    scheduler_type: ``"cosine"`` (torch ``CosineAnnealingLR(T_max=epochs,
      eta_min=min_lr)``), ``"step"`` (``StepLR(step_size, gamma=factor)``),
      ``"none"`` (constant) or ``"plateau"`` (constant base; reductions come
      from :func:`plateau`).
    learning_rate: initial learning rate, > 0.
    min_lr: cosine floor, >= 0 (unused by the other types).
    epochs: cosine period ``T_max``, >= 1.
    step_size: epochs between StepLR decays, >= 1.
    factor: StepLR decay ``gamma``, in [0, 1].

  Returns:
    ``schedule(count) -> float32`` where ``count`` (int or int array) is the
    number of scheduler steps taken; epoch ``e`` (1-indexed) uses
    ``schedule(e - 1)``. The result has the shape of ``count``.

  Raises:
    ValueError: naming the bad argument and what is allowed.
  """
  _check_choice("scheduler_type", scheduler_type, SCHEDULER_TYPES)
  _check_number("learning_rate", learning_rate, 0.0, math.inf, low_open=True,
                high_open=True)
  _check_number("min_lr", min_lr, 0.0, math.inf, high_open=True)
  _check_int("epochs", epochs, 1)
  _check_int("step_size", step_size, 1)
  _check_number("factor", factor, 0.0, 1.0)
  if scheduler_type == "cosine":
    return _cosine(learning_rate, min_lr, epochs)
  if scheduler_type == "step":
    return _step(learning_rate, step_size, factor)
  return _constant(learning_rate)


# ---------------------------------------------------------------- plateau ---


class PlateauState(NamedTuple):
  """State of :func:`plateau`; every field is a scalar array.

  ``best`` and ``lr`` are float32, or float64 for a host state made by
  ``init(learning_rate, dtype=np.float64)``, which ``update`` then computes
  in (as torch does, in Python floats).
  """
  best: jax.Array  # float32/64 []: best metric so far; -inf (max) / +inf (min).
  num_bad_epochs: jax.Array  # int32 []: epochs since the last improvement.
  lr: jax.Array  # float32/64 []: current learning rate.


class PlateauTransform(NamedTuple):
  """Pure ``init`` / ``update`` pair returned by :func:`plateau`."""
  init: Callable[..., PlateauState]
  update: Callable[[PlateauState, float], PlateauState]


def plateau(mode: str, factor: float, patience: int, min_lr: float,
            threshold: float = 1e-4, eps: float = 1e-8) -> PlateauTransform:
  """torch ``ReduceLROnPlateau`` with ``threshold_mode="rel"``, ``cooldown=0``.

  Each ``update(state, metric)`` is one ``scheduler.step(metric)``:

  1. ``metric`` improves when ``metric > best * (1 + threshold)`` (mode
     ``"max"``) or ``metric < best * (1 - threshold)`` (mode ``"min"``); then
     ``best = metric`` and ``num_bad_epochs = 0``, else ``num_bad_epochs += 1``.
     A NaN metric never improves (torch's comparisons with NaN are False).
  2. When ``num_bad_epochs > patience``: ``new = max(lr * factor, min_lr)``,
     applied only if ``lr - new > eps``; ``num_bad_epochs`` resets to 0 either
     way.

  Unlike ``optax.contrib.reduce_on_plateau`` this reduces on the same epoch as
  torch, supports ``"max"`` and follows torch on negative metrics (the
  relative threshold scales a negative ``best`` away from zero).

  Args:
    mode: ``"max"`` or ``"min"``.
    factor: multiplier applied on a reduction, in [0, 1) (torch refuses 1).
    patience: bad epochs tolerated before a reduction, >= 0.
    min_lr: lower bound on the learning rate, >= 0.
    threshold: relative improvement threshold, >= 0.
    eps: smallest reduction that is applied, >= 0.

  Returns:
    A :class:`PlateauTransform`. ``init(learning_rate, dtype=np.float32)``
    makes the state; ``update`` computes in the state's precision. A float32
    state (the default) is jit-safe; on host values (floats, numpy arrays)
    it computes with numpy, with the same float32 results. A float64 state
    (``dtype=np.float64``, host values only: under jit without x64 it would
    be float32) computes as torch does, in float64: its rate does not
    accumulate a float32 rounding at each reduction.
  """
  _check_choice("mode", mode, PLATEAU_MODES)
  _check_number("factor", factor, 0.0, 1.0, high_open=True)
  _check_int("patience", patience, 0)
  _check_number("min_lr", min_lr, 0.0, math.inf, high_open=True)
  _check_number("threshold", threshold, 0.0, math.inf, high_open=True)
  _check_number("eps", eps, 0.0, math.inf, high_open=True)
  maximize = mode == "max"
  rel = 1.0 + threshold if maximize else 1.0 - threshold

  def init(learning_rate, dtype=np.float32) -> PlateauState:
    xp, _ = _namespace(learning_rate)
    if xp is jnp and np.dtype(dtype) != np.float32:
      raise ValueError(f"a plateau state of device arrays is float32, got dtype={dtype!r}")
    return PlateauState(
        best=xp.asarray(-np.inf if maximize else np.inf, dtype),
        num_bad_epochs=xp.zeros((), xp.int32),
        lr=xp.asarray(learning_rate, dtype))

  def update(state: PlateauState, metric) -> PlateauState:
    # In the state's precision throughout: float32 (numpy and XLA agree bitwise) or, on the
    # host, float64 (torch's Python floats: the rate is rounded by no float32 step).
    xp, _ = _namespace(metric, *state)
    real = np.float64 if xp is np and state.lr.dtype == np.float64 else np.float32  # constants
    metric = xp.asarray(metric, real)
    limit = state.best * real(rel)
    better = metric > limit if maximize else metric < limit
    best = xp.where(better, metric, state.best)
    num_bad = xp.where(better, 0, state.num_bad_epochs + 1)
    reduce = num_bad > patience
    new_lr = xp.maximum(state.lr * real(factor), real(min_lr))
    apply = reduce & (state.lr - new_lr > real(eps))
    return PlateauState(
        best=best.astype(real),
        num_bad_epochs=xp.where(reduce, 0, num_bad).astype(xp.int32),
        lr=xp.where(apply, new_lr, state.lr).astype(real))

  return PlateauTransform(init, update)


# ------------------------------------------------------------- controller ---


class LRController:
  """Host-side learning rate for the epoch loop, as the reference steps it.

  Usage, once per 1-indexed ``epoch``::

    lr = controller.lr_for_epoch(epoch)   # before training the epoch
    ...train, validate...
    controller.step(val_metrics[monitor_metric])  # after validation

  For ``"plateau"`` the lr comes from a float64 :func:`plateau` state, which
  ``step`` advances with the metric, in torch's arithmetic (a Python float
  multiplied by the factor at each reduction; ``lr_for_epoch`` returns that
  float, which the state rounds to float32 once); the other types read
  :func:`epoch_schedule` and ``step`` only counts (the metric is ignored).

  Args:
    scheduler_type: one of ``"cosine"``, ``"step"``, ``"none"``, ``"plateau"``.
    learning_rate, min_lr, epochs, step_size, factor: see
      :func:`epoch_schedule`; for ``"plateau"`` ``factor`` must be < 1.
    patience: plateau patience, >= 0.
    monitor_direction: ``"maximize"`` or ``"minimize"`` (plateau mode).
  """

  def __init__(self, scheduler_type: str, *, learning_rate: float,
               min_lr: float, epochs: int, step_size: int, factor: float,
               patience: int, monitor_direction: str) -> None:
    self.scheduler_type = scheduler_type
    self.schedule = epoch_schedule(
        scheduler_type, learning_rate=learning_rate, min_lr=min_lr,
        epochs=epochs, step_size=step_size, factor=factor)
    _check_int("patience", patience, 0)
    _check_choice("monitor_direction", monitor_direction, MONITOR_DIRECTIONS)
    self.plateau_transform = None
    self.plateau_state = None
    if scheduler_type == "plateau":
      self.plateau_transform = plateau(MONITOR_DIRECTIONS[monitor_direction],
                                       factor, patience, min_lr)
      self.plateau_state = self.plateau_transform.init(learning_rate, np.float64)
    self.steps_taken = 0

  def lr_for_epoch(self, epoch: int) -> float:
    """Learning rate for 1-indexed ``epoch``.

    Raises:
      ValueError: if ``epoch < 1``, or, for ``"plateau"`` (whose lr depends on
        the metrics seen), if ``epoch != steps_taken + 1``.
    """
    _check_int("epoch", epoch, 1)
    if self.plateau_state is None:
      return float(self.schedule(epoch - 1))
    if epoch != self.steps_taken + 1:
      raise ValueError(
          f"plateau lr is only known for the current epoch "
          f"{self.steps_taken + 1} (steps taken: {self.steps_taken}), "
          f"got epoch={epoch}")
    return float(self.plateau_state.lr)

  def step(self, metric: float | None = None) -> None:
    """Ends an epoch: one ``scheduler.step()`` (``step(metric)`` for plateau).

    Raises:
      ValueError: for ``"plateau"`` when ``metric`` is None.
    """
    if self.plateau_state is not None:
      if metric is None:
        raise ValueError(
            "scheduler_type='plateau' needs the monitored metric, got "
            "metric=None")
      self.plateau_state = self.plateau_transform.update(
          self.plateau_state, float(metric))
    self.steps_taken += 1
