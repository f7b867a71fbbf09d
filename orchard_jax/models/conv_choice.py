"""Which lowering a convolution layer uses, chosen by measuring it on the machine at hand.

A 3x3 convolution can run as XLA's own convolution (``lax.conv_general_dilated``) or as
im2col (shifted views concatenated, then one matmul). Which is faster for a training step
depends on the CPU (XLA:CPU's convolution backward is slow on some, fast on others) and on
the layer's shapes. :func:`choose` times the forward and backward pass of one layer alone
with each lowering -- a few warm repetitions, the minimum of each, about a tenth of a second
of running after two small compiles -- and keeps the faster (XLA's only if at least
:data:`MARGIN` faster than im2col, the rule before), once per layer (:class:`LayerKey`:
backend, device kind, shapes, dtype, whether vmapped over the weights and over the inputs,
whether the input's gradient is taken). A layer vmapped over its weights (a cohort's members)
is measured vmapped, over two members: there XLA's convolution becomes one with the members'
outputs side by side (inputs shared) or a grouped one (inputs vmapped too, as after a
cohort's first layer), im2col a matmul or a batched matmul.

:envvar:`ORCHARD_JAX_CONV` forces one lowering: ``auto`` (the default, the rule of the
layer), ``im2col`` or ``xla``; it is read when a program is traced. Choices live in this
process; the engine attaches a :class:`Store` that keeps them across processes (next to
the compiled executables, whose key holds :func:`key_part`), and without one a layer is not
measured: a cold process would pay the measurement every time (1.4x MiniCNN's first trial). This module does no file I/O.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax.config_base import ConfigError

__all__ = ["ENV", "LOWERINGS", "LayerKey", "Store", "choose", "clear", "differentiated", "forced",
           "key_part", "layer_key", "measurements", "min_times", "set_store", "vmapped"]

ENV = "ORCHARD_JAX_CONV"
LOWERINGS = ("im2col", "xla")  # on a tie the first wins
# How much faster than the first candidate (the rule before: im2col) another must measure to be
# chosen: a layer timed while other processes load the machine can flip by more than noise,
# and a choice is kept for the machine's later processes.
MARGIN = 0.15
VMAPPED_MEMBERS = 2  # members a vmapped layer is measured with

Timer = Callable[[dict[str, Callable[[], Any]]], dict[str, float]]


class LayerKey(NamedTuple):
  """What a choice is made for (shapes are one member's when vmapped)."""
  backend: str
  device_kind: str
  input_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  dtype: str
  vmapped: bool  # the kernel is batched by jax.vmap (a cohort's members)
  inputs_vmapped: bool  # so is the input (after a cohort's first layer)
  input_gradient: bool  # the input is differentiated (every layer but the first)


class Store(Protocol):
  """Keeps choices across processes (the engine's, on disk)."""
  identity: str  # names the table; a new table, a new identity

  def get(self, key: LayerKey) -> str | None: ...

  def put(self, key: LayerKey, lowering: str) -> str:
    """Records ``lowering`` unless the table has one for ``key``; returns the recorded one."""


_lock = threading.Lock()
_choices: dict[LayerKey, str] = {}
_measured: Counter = Counter()  # LayerKey -> times measured
_store: list[Store] = []


def forced() -> str | None:
  """The lowering :envvar:`ORCHARD_JAX_CONV` forces, or None for ``auto`` (the default)."""
  value = os.environ.get(ENV, "auto")
  if value not in ("auto", *LOWERINGS):
    raise ConfigError(f"{ENV} must be 'auto', 'im2col' or 'xla', got {value!r}")
  return None if value == "auto" else value


def key_part() -> tuple[str, str | None]:
  """What an executable's key holds of the choices: the setting and the attached table."""
  lowering = forced()
  if lowering is not None:
    return lowering, None
  return "auto", _store[0].identity if _store else None


def set_store(store: Store | None) -> None:
  """Attaches ``store`` (None detaches). The choices this process made before are offered to
  it; where it holds another, that one is used from now on."""
  with _lock:
    _store[:] = [] if store is None else [store]
    made = dict(_choices)
  if store is not None:
    kept = {key: store.put(key, lowering) for key, lowering in made.items()}
    with _lock:
      _choices.update(kept)


def clear() -> None:
  """Forgets this process's choices and measurement counts (an attached store stays)."""
  with _lock:
    _choices.clear()
    _measured.clear()


def measurements() -> dict[LayerKey, int]:
  """How many times each layer was measured since :func:`clear`."""
  return dict(_measured)


def vmapped(value: Any) -> bool:
  """Whether ``value``, as a layer sees it while traced, is batched by ``jax.vmap`` (the
  members of a cohort). Looks through differentiation to the batching; a ``vmap`` applied
  outside a ``jax.jit`` is not seen. Where JAX's batching tracer cannot be found (a JAX that
  moved it), True: measured as a cohort's layer."""
  try:
    from jax._src.interpreters.batching import BatchTracer  # pylint: disable=import-outside-toplevel
  except ImportError:
    return True
  while isinstance(value, jax.core.Tracer):
    if isinstance(value, BatchTracer):
      return type(value.batch_dim) is int
    value = getattr(value, "primal", None) if hasattr(value, "primal") else getattr(value, "val", None)
  return False


def differentiated(value: Any) -> bool:
  """Whether ``value``, as a layer sees it while traced, is differentiated (``jax.grad``)."""
  while isinstance(value, jax.core.Tracer):
    if hasattr(value, "primal") and hasattr(value, "tangent"):
      return True
    value = getattr(value, "val", None)
  return False


def layer_key(x: Any, kernel: Any, dtype: Any) -> LayerKey:
  device = jax.devices()[0]
  return LayerKey(jax.default_backend(), device.device_kind, tuple(x.shape), tuple(kernel.shape),
                  str(jnp.dtype(dtype)), vmapped(kernel), vmapped(kernel) and vmapped(x),
                  differentiated(x))


def choose(key: LayerKey, candidates: dict[str, Callable[[jax.Array, jax.Array], jax.Array]],
           timer: Timer | None = None) -> str:
  """The faster of ``candidates`` (lowering name -> ``f(x, kernel)``) for the layer ``key``:
  from this process's choices, the attached store, or measured now (on this thread,
  outside any trace in progress) and kept in the store. Without a store (no executables
  cache: nothing would keep it for the next process) nothing is measured and the first
  candidate, the rule before, is used. ``timer`` maps zero-argument programs to seconds
  (default :func:`min_times`)."""
  with _lock:
    if key in _choices:
      return _choices[key]
    store = _store[0] if _store else None
  if store is None:  # nowhere to keep a measurement: each process would pay it; the rule,
    return next(iter(candidates))  # not recorded as a choice (a later store measures it)
  lowering = store.get(key)
  if lowering not in candidates:
    # JAX's private door out of the trace in progress (a thread of its own would also do, but
    # would compile elsewhere than where the caller compiles)
    from jax._src.core import eval_context  # pylint: disable=import-outside-toplevel
    with eval_context():
      times = _measure(key, candidates, timer or min_times)
    lowering = _faster(times, list(candidates))
    with _lock:
      _measured[key] += 1
    lowering = store.put(key, lowering)
  with _lock:
    return _choices.setdefault(key, lowering)


def _faster(times: dict[str, float], names: list[str]) -> str:
  """The first of ``names`` unless another measured at least :data:`MARGIN` faster (then the
  fastest)."""
  first, fastest = names[0], min(names, key=lambda name: (times[name], names.index(name)))
  return fastest if times[fastest] <= (1.0 - MARGIN) * times[first] else first


def _measure(key: LayerKey, candidates: dict, timer: Timer) -> dict[str, float]:
  """Seconds of each candidate's forward and backward pass of the layer, by ``timer``."""
  rng = np.random.default_rng(0)
  members = (VMAPPED_MEMBERS,) if key.vmapped else ()
  x_members = members if key.inputs_vmapped else ()
  b, h, w, _ = key.input_shape
  x = jnp.asarray(rng.standard_normal(x_members + key.input_shape), key.dtype)
  kernel = jnp.asarray(rng.standard_normal(members + key.kernel_shape) * 0.1, key.dtype)
  cotangent = jnp.asarray(rng.standard_normal(x_members + (b, h, w, key.kernel_shape[-1])),
                          key.dtype)
  programs = {}
  for name, fn in candidates.items():
    # the value keeps the forward pass (a gradient alone would not need it)
    grad = jax.value_and_grad(lambda x, k, g, fn=fn: jnp.vdot(fn(x, k), g),
                              argnums=(0, 1) if key.input_gradient else 1)
    axis = 0 if key.inputs_vmapped else None
    step = jax.jit(jax.vmap(grad, in_axes=(axis, 0, axis)) if key.vmapped else grad)
    programs[name] = lambda step=step: step(x, kernel, cotangent)
  return timer(programs)


def min_times(programs: dict[str, Callable[[], Any]], repeats: int = 5,
              budget_s: float = 0.15) -> dict[str, float]:
  """The least of ``repeats`` timed calls of each program (after a warm call), in turns; the
  rounds stop early once ``budget_s`` is spent (at least two are timed)."""
  for program in programs.values():
    jax.block_until_ready(program())
  best = {name: math.inf for name in programs}
  start = time.perf_counter()
  for round_ in range(repeats):
    for name, program in programs.items():
      t = time.perf_counter()
      jax.block_until_ready(program())
      best[name] = min(best[name], time.perf_counter() - t)
    if round_ >= 1 and time.perf_counter() - start > budget_s:
      break
  return best
