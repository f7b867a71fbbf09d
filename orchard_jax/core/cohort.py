"""K trials of one :class:`StepSpec` trained together: a cohort, stacked on a leading member axis.

A cohort is a :class:`TrainState` whose every array leaf has a leading axis
of size ``K``, one row per member (trial); its static part, the ``spec``, is
the members' common one. :func:`cohort_train_step` and
:func:`cohort_eval_step` are the solo steps of :mod:`orchard_jax.core.steps`
under ``jax.vmap`` over that axis, with the batch shared (every member reads
the same batch) or, for device-resident images, each member's own rows of
them (a training batch's index per member), and each keeps its own parameters, optimizer state and
hyperparameters (learning rate, momentum, weight decay, clipping, label
smoothing, MixUp alpha and switch, focal gamma, class weights, augmentation
strengths), RNG key,
BatchNorm statistics and loss scale. Member ``i`` of a cohort after a step
is the solo step of member ``i`` (within float rounding: the batched
program may order a reduction differently).

Each step compiles once per (spec, K, batch shape). A member is replaced
(:func:`replace_member`) and the epoch's learning rates and MixUp switches
written (:func:`with_learning_rates`, :func:`with_mixup`) as arrays of the
same shapes, dtypes and placement, so none of them recompiles a step.

Members are independent under ``vmap``: nothing in a step reduces over the
member axis, so a member whose loss or parameters go non-finite changes
nothing in the others. For the same reason there is no ``active`` mask: an
empty slot (a member pruned or finished, with no trial to replace it) is
stepped like the others and its outputs are ignored. A mask would select
between the new and old state, a pass over every leaf of the state in every
step, to protect values nobody reads (``benchmarks/cohort_step.py`` times
it).

Typical use::

  cohort = stack([create_train_state(model, ..., seed=s, learning_rate=lr) for s, lr in ...])
  cohort = with_learning_rates(cohort, lrs_K)      # each epoch
  cohort, metrics = cohort_train_step(cohort, batch)  # metrics["loss_sum"]: [K]
  cohort = replace_member(cohort, 2, fresh_state)  # a pruned trial's slot, at an epoch boundary
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax.core import optim, steps
from orchard_jax.core.batches import Batch, IndexedBatch
from orchard_jax.core.state import StepSpec, TrainState, placed_like

__all__ = ["cohort_eval_step", "cohort_train_step", "member", "member_arrays", "repeat",
           "replace_member", "size", "stack", "with_learning_rates", "with_mixup"]

_LOSS_SCALE_STATIC = ("dynamic", "period", "factor", "min_scale", "unit")


def _leaf_types(state: TrainState, lead: int) -> list[tuple[str, tuple[int, ...], str]]:
  """``(path, shape without the first `lead` axes, dtype)`` of every leaf."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  return [(jax.tree_util.keystr(path), tuple(x.shape[lead:]), str(x.dtype)) for path, x in leaves]


def _difference(expected: TrainState, got: TrainState, lead: int) -> str | None:
  """What differs between a member of ``expected`` (``lead`` member axes) and solo ``got``, or None.

  Phrased to follow "its": e.g. "spec.optimizer is 'adamw', not 'sgd'".
  """
  for field in dataclasses.fields(StepSpec):
    want, have = getattr(expected.spec, field.name), getattr(got.spec, field.name)
    if want != have:
      return f"spec.{field.name} is {have!r}, not {want!r}"
  for name in _LOSS_SCALE_STATIC:
    want, have = getattr(expected.loss_scale, name), getattr(got.loss_scale, name)
    if want != have:
      return f"loss_scale.{name} is {have!r}, not {want!r}"
  want, have = _leaf_types(expected, lead), _leaf_types(got, 0)
  if [p for p, _, _ in want] != [p for p, _, _ in have]:
    only = sorted({p for p, _, _ in want} ^ {p for p, _, _ in have})
    return f"state tree differs (leaves in one only: {', '.join(only[:3])})"
  for (path, shape, dtype), (_, got_shape, got_dtype) in zip(want, have):
    if (shape, dtype) != (got_shape, got_dtype):
      return f"{path} is {got_dtype}{list(got_shape)}, not {dtype}{list(shape)}"
  if jax.tree.structure(expected) != jax.tree.structure(got):
    return "state tree differs in a static field"
  return None


def _check_solo(state: TrainState, what: str) -> None:
  if jnp.ndim(state.step) != 0:
    raise ValueError(f"{what} is already a cohort (step has shape {jnp.shape(state.step)}); "
                     "give a solo TrainState")


def _check_cohort(cohort: TrainState) -> int:
  """The cohort's K; raises ``ValueError`` if ``cohort`` is a solo state (at trace time)."""
  if jnp.ndim(cohort.step) != 1:
    raise ValueError(f"expected a cohort (a TrainState stacked by cohort.stack, step of shape "
                     f"[K]), got step of shape {jnp.shape(cohort.step)}")
  return jnp.shape(cohort.step)[0]


def _check_index(cohort: TrainState, i) -> np.int32:
  k, index = size(cohort), operator.index(i)
  if not 0 <= index < k:
    raise ValueError(f"member index must be in [0, {k}), got i={index}")
  return np.int32(index)


@jax.jit
def _stack(states: list[TrainState]) -> TrainState:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def stack(states) -> TrainState:
  """The cohort of ``states`` (K solo states of one spec and structure), member ``i`` = ``states[i]``.

  One compiled program per (spec, K). The states are not donated.

  Raises:
    ValueError: if ``states`` is empty, holds a cohort, or two states
      differ in spec, loss-scale kind, tree, or any leaf's shape or dtype
      (naming the first difference).
  """
  states = list(states)
  if not states:
    raise ValueError("stack needs at least one TrainState, got none")
  for i, state in enumerate(states):
    _check_solo(state, f"state {i}")
    what = _difference(states[0], state, lead=0)
    if what is not None:
      raise ValueError(f"cannot stack state {i} with state 0: its {what}; a cohort's members "
                       "share one StepSpec and one state structure")
  return _stack(states)


@functools.partial(jax.jit, static_argnums=1)
def _repeat(state: TrainState, k: int) -> TrainState:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *jnp.shape(x))), state)


def repeat(state: TrainState, k: int) -> TrainState:
  """The cohort of ``k`` copies of the solo ``state``: one small program per (spec, K), with
  one input state where :func:`stack` has ``k``; fill it with :func:`replace_member`."""
  _check_solo(state, "state")
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be an int >= 1, got k={k!r}")
  return _repeat(state, k)


@jax.jit
def _rows(tree, i: jax.Array):
  return jax.tree.map(lambda x: x[i], tree)


def member_arrays(cohort: TrainState, i: int):
  """``(params, model_state)`` of member ``i``: copies, by one program per (spec, K) that reads
  only those two fields (a best-state copy needs no optimizer state)."""
  return _rows((cohort.params, cohort.model_state), _check_index(cohort, i))


def size(cohort: TrainState) -> int:
  """K, the number of members of ``cohort``."""
  return _check_cohort(cohort)


@jax.jit
def _member(cohort: TrainState, i: jax.Array) -> TrainState:
  return jax.tree.map(lambda x: x[i], cohort)


def member(cohort: TrainState, i: int) -> TrainState:
  """Member ``i`` (a Python int) as a solo :class:`TrainState`: a copy, by one program per (spec, K)."""
  return _member(cohort, _check_index(cohort, i))


def _replace_rows(cohort: TrainState, i: jax.Array, state: TrainState) -> TrainState:
  return jax.tree.map(lambda c, s: c.at[i].set(s), cohort, state)


_replace = jax.jit(_replace_rows, donate_argnums=0)


def replace_member(cohort: TrainState, i: int, state: TrainState) -> TrainState:
  """``cohort`` with member ``i`` (a Python int) replaced by the solo ``state``; the cohort is donated.

  An index update of every leaf, in one program per (spec, K) whatever ``i``:
  the result has the cohort's shapes, dtypes and placement, so the steps do
  not recompile.

  Raises:
    ValueError: if ``i`` is not in ``[0, K)``, or ``state`` is a cohort or
      differs from the members in spec, loss-scale kind, tree or a leaf's
      shape or dtype.
  """
  index = _check_index(cohort, i)
  _check_solo(state, "state")
  what = _difference(cohort, state, lead=1)
  if what is not None:
    raise ValueError(f"cannot put state in member {index} of the cohort: its {what}")
  return _replace(cohort, index, state)


def _per_member(cohort: TrainState, old: jax.Array, values, dtype: type[np.generic],
                name: str) -> jax.Array:
  """``values`` as a ``[K]`` ``dtype`` array placed as ``old``: on its sharding, committed when it is.

  A step compiles again when an argument's placement changes (committed to a
  device or not), so the field keeps the placement of the one it replaces.
  Under a trace this is ``jnp.asarray``.
  """
  shape = tuple(values.shape) if isinstance(values, jax.Array) else np.shape(values)
  if shape != tuple(old.shape):
    raise ValueError(f"{name} must have shape ({size(cohort)},), one per member, got shape {shape}")
  return placed_like(values, dtype, old)


def with_learning_rates(cohort: TrainState, learning_rates) -> TrainState:
  """``cohort`` with member ``i``'s learning rate set to ``learning_rates[i]`` (no recompile).

  Args:
    learning_rates: ``[K]`` floats (host values or a ``jax.Array``), stored
      as float32 with the placement of the learning rates they replace.
  """
  old = optim.get_hyperparam(cohort.opt_state, "learning_rate")
  new = _per_member(cohort, old, learning_rates, np.float32, "learning_rates")
  hyperparams = {**cohort.opt_state.hyperparams, "learning_rate": new}
  return cohort.replace(opt_state=cohort.opt_state._replace(hyperparams=hyperparams))


def with_mixup(cohort: TrainState, enabled) -> TrainState:
  """``cohort`` with member ``i``'s MixUp switched by ``enabled[i]`` (``[K]`` bools; no recompile).

  As :meth:`TrainState.with_mixup`: a cohort built without MixUp
  (``spec.mixup`` False) has none to switch and is returned as it is.
  """
  if not cohort.spec.mixup:
    return cohort
  new = _per_member(cohort, cohort.hparams.mixup_on, enabled, np.bool_, "enabled")
  return cohort.replace(hparams=cohort.hparams._replace(mixup_on=new))


def _batch_axes(batch: Batch):
  """The batch's ``in_axes``: shared (None), or, for an :class:`IndexedBatch` whose ``index`` is
  ``[K, chunk, B]``, each member's own rows (its index, labels and counts on axis 0)."""
  if isinstance(batch, IndexedBatch) and jnp.ndim(batch.index) == 3:
    return IndexedBatch(None, 0, 0, 0, None)
  return None


def _cohort_train_step(cohort: TrainState, batch: Batch):
  _check_cohort(cohort)
  return jax.vmap(steps._train_step, in_axes=(0, _batch_axes(batch)))(cohort, batch)


def _cohort_eval_step(cohort: TrainState, batch: Batch):
  _check_cohort(cohort)
  return jax.vmap(steps._eval_step, in_axes=(0, None))(cohort, batch)


cohort_train_step = jax.jit(_cohort_train_step, donate_argnums=0)
cohort_train_step.__doc__ = """One optimizer step of every member on the same batch; the cohort is donated.

``batch`` is a dict or an :class:`~orchard_jax.core.batches.IndexedBatch`,
as for :func:`~orchard_jax.core.steps.train_step`, shared by all members; or
an ``IndexedBatch`` whose ``index``, ``label`` and ``count`` have a leading
member axis (``[K, chunk, B]``, ``[K, chunk, B]``, ``[K, chunk]``): member
``i`` then reads its own rows of the shared images.
Returns the new cohort and the solo step's metrics with a leading member
axis (``{"loss_sum", "correct", "count"}``, float32 ``[K]``). Compiled once
per (spec, K, batch shape).
"""

cohort_eval_step = jax.jit(_cohort_eval_step)
cohort_eval_step.__doc__ = """Evaluation pass of every member on the same batch.

Returns the solo :func:`~orchard_jax.core.steps.eval_step`'s outputs, each
with a leading member axis (``logits`` ``[K, B, C]``, ``loss`` ``[K, B]``,
``label`` and ``mask`` ``[K, B]``, the batch's own repeated, sums ``[K]``):
member ``i``'s outputs are ``outputs[name][i]``. Compiled once per (spec, K,
batch shape).
"""
