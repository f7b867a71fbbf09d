"""Which programs a cohort runs, and over how many devices and slots.

:func:`programs` chooses, per structure, whether a cohort's training and evaluation step all
members with one vmapped program or each member's solo program in turn
(:envvar:`ORCHARD_JAX_COHORT_PROGRAMS` forces one kind); :func:`devices_of` and
:func:`slots_for` size a cohort split over several devices.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from orchard_jax.config import ConfigError
from orchard_jax.core.state import TrainState

logger = logging.getLogger(__name__)

__all__ = ["PROGRAMS_ENV", "devices_of", "mesh_of", "programs", "slots_for"]


PROGRAMS_ENV = "ORCHARD_JAX_COHORT_PROGRAMS"
_PROGRAMS: dict[Any, tuple[bool, bool]] = {}


def _has_xla_conv(state: TrainState, train: bool) -> bool:
  """Whether the model's forward pass (training or evaluation mode) holds an XLA convolution;
  traced once, on a batch of 2 (no compile, no computation)."""
  spec = state.spec
  sample = jax.ShapeDtypeStruct((2, *spec.input_shape), jnp.float32)
  jaxpr = jax.make_jaxpr(
      lambda params, model_state, x: spec.model.apply(params, model_state, x, train=train,
                                                      rng=jax.random.key(0)))(
      state.params, state.model_state, sample)
  return "conv_general_dilated" in str(jaxpr)


def programs(state: TrainState, several_devices: bool = False) -> tuple[bool, bool]:
  """``(serial_train, serial_eval)``: which of a cohort's two programs step each member's solo
  program in turn instead of one vmapped program.

  The rule, from ``benchmarks/cohort_trials.py``: on XLA:CPU a program with an XLA
  convolution steps its members in turn (vmapped over weights, a convolution becomes a grouped
  one, about 6x slower per member there); every other program, and every program on other
  backends or split over several devices, is vmapped. ``ORCHARD_JAX_COHORT_PROGRAMS=vmap`` or
  ``serial`` forces one kind for both (``auto``, the default, is the rule).
  """
  forced = os.environ.get(PROGRAMS_ENV, "auto")
  if forced not in ("auto", "vmap", "serial"):
    raise ConfigError(f"{PROGRAMS_ENV} must be 'auto', 'vmap' or 'serial', got {forced!r}")
  if several_devices or forced == "vmap":
    return False, False
  if forced == "serial":
    return True, True
  if jax.default_backend() != "cpu":
    return False, False
  if state.spec not in _PROGRAMS:
    train = _has_xla_conv(state, train=True)
    _PROGRAMS[state.spec] = (train, train or _has_xla_conv(state, train=False))
  return _PROGRAMS[state.spec]


def mesh_of(state: TrainState) -> Any:
  """The multi-device mesh ``state`` is replicated on, or None on one device."""
  sharding = getattr(state.step, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


def devices_of(state: TrainState) -> int:
  """How many devices a cohort of ``state`` s splits its members over."""
  mesh = mesh_of(state)
  return 1 if mesh is None else mesh.size


def slots_for(cohort_size: int, devices: int) -> int:
  """A cohort's slots: ``cohort_size`` rounded up to a multiple of the devices it splits over."""
  slots = -(-cohort_size // devices) * devices
  if slots != cohort_size and slots not in _ROUNDED:
    _ROUNDED.add(slots)
    logger.warning("cohort_size %d on %d devices: cohorts of %d members, %d per device",
                   cohort_size, devices, slots, slots // devices)
  return slots


_ROUNDED: set[int] = set()
