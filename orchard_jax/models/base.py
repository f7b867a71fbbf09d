"""The model contract, and adapters from flax Linen and NNX modules to it.

The training core calls a model only through :class:`Model`::

  params, model_state = model.init(rng, sample_input)
  logits_BxC, model_state = model.apply(params, model_state, x, train=..., rng=...,
                                        mask=None)

* ``params`` is the pytree of trainable parameters, and nothing else: it is
  what ``jax.grad`` differentiates and what the optimizer updates.
* ``model_state`` is every other array that changes during training (BatchNorm
  running statistics, ...), a pytree that may be empty. ``apply`` returns it
  updated when ``train=True`` and unchanged when ``train=False``; its tree
  structure, shapes and dtypes never change between calls.
* ``rng`` is the randomness for this one call (the core folds a fresh key per
  step). Dropout is active only when ``train=True``, and its masks are a pure
  function of ``rng``.
* ``train`` must be a Python ``bool`` (a static argument under ``jax.jit``).
* ``mask`` (optional, bool ``[B]``) is False on padding rows of a padded
  batch. A model may use it to keep padding out of batch statistics
  (BatchNorm), so that a padded batch trains like the unpadded one; it must
  not otherwise change the logits of real rows. The adapters pass it on to
  modules whose ``__call__`` has a ``mask`` parameter and drop it otherwise
  (such a module's BatchNorm then counts padding rows in its statistics).

Model objects are hashable and compare *by value*: the core keeps the model in
a static field of its state, so two equal models built in two Optuna trials
hit the same ``jax.jit`` cache entry and trial 2 reuses trial 1's compiled
step. Module attributes must therefore be hashable values (tuples rather than
lists; module-level functions rather than closures or lambdas made per
construction, which compare by identity and so force a recompile per trial).

Compute dtype: the core casts ``params`` and ``x`` to the compute dtype (e.g.
bfloat16) before ``apply``; modules built with ``dtype=None`` then compute in
that dtype. ``model_state`` is not cast: flax BatchNorm keeps its running
statistics in float32 and reduces in float32.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import zlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

if TYPE_CHECKING:
  from flax import nnx

Params = Any  # pytree of trainable arrays
ModelState = Any  # pytree of non-trainable arrays (e.g. BatchNorm statistics)

# Linen collections that are write-only diagnostics, never model state.
_DROPPED_LINEN_COLLECTIONS = ("intermediates",)


@runtime_checkable
class Model(Protocol):
  """What the training core needs from a model (see the module docstring)."""

  def init(self, rng: jax.Array, sample_input: jax.Array) -> tuple[Params, ModelState]:
    """Returns initial ``(params, model_state)`` for inputs shaped like ``sample_input``."""
    ...

  def apply(
      self,
      params: Params,
      model_state: ModelState,
      x: jax.Array,
      *,
      train: bool,
      rng: jax.Array,
      mask: jax.Array | None = None,
  ) -> tuple[jax.Array, ModelState]:
    """Returns logits ``[B, num_classes]`` and the new ``model_state``."""
    ...


def _static_bool(train: Any) -> bool:
  if not isinstance(train, (bool, np.bool_)):
    raise TypeError(
        "train must be a Python bool (a static argument under jax.jit), got"
        f" train={train!r} of type {type(train).__name__}"
    )
  return bool(train)


def _accepts_kwarg(fn: Any, name: str) -> bool:
  """Whether ``fn`` can be called with the keyword argument ``name``."""
  params = inspect.signature(fn).parameters
  return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _mask_kwarg(fn: Any, mask: jax.Array | None) -> dict[str, jax.Array]:
  if mask is None or not _accepts_kwarg(fn, "mask"):
    return {}
  return {"mask": jnp.asarray(mask, jnp.bool_)}


def _as_typed_key(rng: jax.Array) -> jax.Array:
  """Accepts ``jax.random.key`` keys and legacy ``uint32[2]`` ``PRNGKey`` keys."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


# --------------------------------------------------------------------- Linen --


@dataclasses.dataclass(frozen=True)
class LinenModel:
  """A flax Linen module behind the :class:`Model` contract.

  The module's ``__call__`` must take the input first and a boolean keyword
  flag named ``train_kwarg``. With ``invert=False`` the flag receives ``train``
  (the convention ``__call__(x, train: bool)``); with ``invert=True`` it
  receives ``not train`` (e.g. ``__call__(x, deterministic: bool)``).

  ``init`` runs the module in eval mode; ``params`` is the ``"params"``
  collection and ``model_state`` the dict of every other collection except
  ``"intermediates"`` (e.g. ``{"batch_stats": ...}``, or ``{}``). ``apply``
  feeds ``rng`` to the ``"dropout"`` RNG stream, passes ``mask`` on if
  ``__call__`` has a ``mask`` parameter and, when ``train=True``, lets the
  module write the collections of ``model_state``. Equality and hash are
  those of the module (Linen modules are value-compared dataclasses).
  """

  module: nn.Module
  train_kwarg: str = "train"
  invert: bool = False

  def __post_init__(self):
    if not isinstance(self.module, nn.Module):
      raise TypeError(f"module must be a flax.linen.Module, got {type(self.module).__name__}")
    try:
      hash(self.module)
    except TypeError as e:
      raise TypeError(
          f"Linen module {type(self.module).__name__} is not hashable: its"
          " attributes must be hashable (tuples, not lists or dicts) so that"
          f" jax.jit can cache the compiled step on it ({e})"
      ) from e
    if not _accepts_kwarg(self.module.__call__, self.train_kwarg):
      params = tuple(inspect.signature(self.module.__call__).parameters)
      raise TypeError(
          f"{type(self.module).__name__}.__call__ has no keyword argument"
          f" {self.train_kwarg!r} (its parameters: {params}); pass"
          " as_model(module, train_kwarg=<name>, invert=<True if the flag"
          " means eval mode>)"
      )

  def _flag(self, train: bool) -> dict[str, bool]:
    return {self.train_kwarg: (not train) if self.invert else train}

  def init(self, rng: jax.Array, sample_input: jax.Array) -> tuple[Params, ModelState]:
    params_rng, dropout_rng = jax.random.split(_as_typed_key(rng))
    variables = self.module.init(
        {"params": params_rng, "dropout": dropout_rng}, sample_input, **self._flag(False)
    )
    variables = dict(variables)
    params = variables.pop("params", {})
    model_state = {
        k: v for k, v in variables.items() if k not in _DROPPED_LINEN_COLLECTIONS
    }
    return params, model_state

  def apply(self, params, model_state, x, *, train, rng, mask=None):
    train = _static_bool(train)
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng}
    kwargs = {**self._flag(train), **_mask_kwarg(self.module.__call__, mask)}
    if not (train and model_state):
      return self.module.apply(variables, x, rngs=rngs, **kwargs), model_state
    logits, updates = self.module.apply(
        variables, x, rngs=rngs, mutable=tuple(model_state), **kwargs
    )
    return logits, {**model_state, **updates}


# ----------------------------------------------------------------------- NNX --


def _stream_salt(tag: str) -> int:
  """A stable (process-independent) 32-bit integer for an RNG stream name."""
  return zlib.crc32(tag.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class NNXModel:
  """A flax NNX module behind the :class:`Model` contract.

  Build it with :meth:`from_module`. NNX modules are initialised eagerly at
  construction, so the module's *own* ``nnx.Rngs`` determine the initial
  weights: ``init`` ignores its ``rng`` and returns the wrapped module's
  current state (``sample_input`` is only shape-checked).

  * ``params`` is the module's ``nnx.Param`` state (an ``nnx.State``).
  * ``model_state`` is the rest (``nnx.BatchStat`` and any other variable),
    minus the RNG bookkeeping (``nnx.RngKey`` / ``nnx.RngCount``) and sown
    ``nnx.Intermediate`` values, which are not carried between steps.
  * ``apply`` rebuilds the module (``nnx.merge``), sets ``module.train()`` or
    ``module.eval()`` (which toggles ``deterministic`` and
    ``use_running_average``), reseeds *every* RNG stream of the module from
    ``rng`` (stream ``tag`` gets ``fold_in(rng, crc32(tag))``, so dropout is a
    pure function of ``rng`` whichever stream its ``Dropout`` draws from), calls
    ``module(x)`` (``module(x, mask=mask)`` if ``__call__`` has a ``mask``
    parameter) and splits the new ``model_state`` back out.

  Equality and hash use only the static structure (``graphdef`` and the RNG
  stream layout), never the arrays: two modules of the same architecture and
  configuration give equal wrappers whatever their weights.
  """

  graphdef: Any
  rng_treedef: Any  # jax PyTreeDef of the module's RngKey/RngCount variables
  rng_leaves: tuple[jax.ShapeDtypeStruct, ...]
  rng_tags: tuple[str, ...]
  initial_params: Any = dataclasses.field(default=None, compare=False, repr=False)
  initial_state: Any = dataclasses.field(default=None, compare=False, repr=False)
  _hash: int = dataclasses.field(init=False, compare=False, repr=False)

  def __post_init__(self):
    # jax.jit hashes static arguments on every call; a GraphDef hash is slow.
    key = (self.graphdef, self.rng_treedef, self.rng_leaves, self.rng_tags)
    object.__setattr__(self, "_hash", hash(key))

  def __hash__(self) -> int:
    return self._hash

  @classmethod
  def from_module(cls, module: nnx.Module) -> NNXModel:
    """Captures ``module``'s structure and current state; ``module`` is not modified."""
    from flax import nnx  # pylint: disable=import-outside-toplevel  # only NNX models need it

    if not isinstance(module, nnx.Module):
      raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}")
    copy = nnx.merge(*nnx.split(module))
    nnx.pop(copy, nnx.Intermediate)
    copy.eval()  # canonical mode, so wrappers compare equal whatever mode it was in
    graphdef, params, rng_state, state = nnx.split(copy, nnx.Param, nnx.RngState, ...)
    rng_leaves, rng_treedef = jax.tree_util.tree_flatten(rng_state)
    rng_vars = jax.tree_util.tree_leaves(
        rng_state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
    tags = sorted({v.tag for v in rng_vars if isinstance(v, nnx.RngKey)})
    return cls(
        graphdef=graphdef,
        rng_treedef=rng_treedef,
        rng_leaves=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in rng_leaves),
        rng_tags=tuple(tags),
        initial_params=params,
        initial_state=state,
    )

  def init(self, rng: jax.Array, sample_input: jax.Array) -> tuple[Params, ModelState]:
    del rng  # the module's own nnx.Rngs initialised it; see the class docstring
    params, state = self.initial_params, self.initial_state
    jax.eval_shape(
        lambda p, s, x: self.apply(p, s, x, train=False, rng=jax.random.key(0)),
        params,
        state,
        sample_input,
    )
    return params, state

  def _placeholder_rng_state(self, key: jax.Array):
    """RNG variables of the right structure; their values are overwritten by reseeding."""
    leaves = [
        jnp.broadcast_to(key, s.shape)
        if jnp.issubdtype(s.dtype, jax.dtypes.prng_key)
        else jnp.zeros(s.shape, s.dtype)
        for s in self.rng_leaves
    ]
    return jax.tree_util.tree_unflatten(self.rng_treedef, leaves)

  def apply(self, params, model_state, x, *, train, rng, mask=None):
    from flax import nnx  # pylint: disable=import-outside-toplevel  # only NNX models need it

    train = _static_bool(train)
    key = _as_typed_key(rng)
    # Fresh Variables (tree.map rebuilds them in the current trace): merging
    # the caller's own State objects would let BatchNorm mutate them in place.
    params, model_state_in = jax.tree.map(lambda a: a, (params, model_state))
    module = nnx.merge(self.graphdef, params, self._placeholder_rng_state(key), model_state_in)
    if train:
      module.train()
    else:
      module.eval()
    if self.rng_tags:
      nnx.reseed(
          module,
          policy="match_shape",
          **{tag: jax.random.fold_in(key, _stream_salt(tag)) for tag in self.rng_tags},
      )
    logits = module(x, **_mask_kwarg(module.__call__, mask))
    if not train:
      return logits, model_state
    nnx.pop(module, nnx.Intermediate)
    _, _, _, new_state = nnx.split(module, nnx.Param, nnx.RngState, ...)
    return logits, new_state


# ------------------------------------------------------------------ as_model --


def _is_nnx_module(obj: Any) -> bool:
  """Whether ``obj`` is a flax NNX module, without importing ``flax.nnx``: an NNX module exists
  only once something has imported it, so a process that never did (a Linen model's study)
  does not pay for its import."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(obj, nnx.Module)


def as_model(obj: Any, *, train_kwarg: str = "train", invert: bool = False) -> Model:
  """Returns ``obj`` as a :class:`Model`.

  Accepts:
    1. a flax Linen module whose ``__call__(x, train: bool)`` takes a ``train``
       keyword -> :class:`LinenModel`. A module whose flag has another name or
       the opposite meaning is adapted with ``train_kwarg`` / ``invert``, e.g.
       ``as_model(m, train_kwarg="deterministic", invert=True)``;
    2. a flax NNX module (``flax.nnx.Module``) -> :class:`NNXModel`; it is
       called as ``module(x)`` with its mode set by ``train()`` / ``eval()``
       (note: ``nnx.BatchNorm`` promotes to the dtype of its float32
       statistics unless built with ``dtype=``, so such a module computes in
       float32 under a bfloat16 policy);
    3. an object that already has ``init`` and ``apply`` methods (returned
       as is).

  Raises:
    TypeError: for anything else, or ``train_kwarg`` / ``invert`` given with
      something other than a Linen module.
  """
  if isinstance(obj, nn.Module):
    return LinenModel(obj, train_kwarg=train_kwarg, invert=invert)
  if train_kwarg != "train" or invert:
    raise TypeError(
        "train_kwarg and invert apply only to flax Linen modules, got"
        f" {type(obj).__name__} with train_kwarg={train_kwarg!r}, invert={invert!r}"
    )
  if _is_nnx_module(obj):
    return NNXModel.from_module(obj)
  if callable(getattr(obj, "init", None)) and callable(getattr(obj, "apply", None)):
    return obj
  raise TypeError(
      f"as_model cannot use an object of type {type(obj).__module__}."
      f"{type(obj).__qualname__}; it accepts a flax.linen.Module (with a"
      " `train` keyword in __call__), a flax.nnx.Module, or an object with"
      " init(rng, sample_input) and apply(params, model_state, x, *, train, rng)"
      " methods"
  )
