"""A trained model with its parameters, for inference: :class:`LoadedModel`, and the files
that describe it (``model.json``) beside its checkpoint.

:func:`orchard_jax.load_model` returns a :class:`LoadedModel`; this module holds what it is
made of, below the study layer:

* :func:`write_model_record` / :func:`read_model_record`: ``model.json`` beside a best
  state's ``checkpoint/`` (``best_model/``, a training run's ``fit/``): what rebuilds the
  model without its configuration -- the architecture as a recipe writes it (None for a
  model of one's own Python code), the number of classes, the per-sample input shape
  (channels last), the loaders' layout and the dtype policy it was trained with.
* :func:`restore_variables`: the checkpoint's ``{"params", "model_state"}``, restored into
  the structure of the model's own initialisation (an NNX model's ``nnx.State``) when the
  input shape is known, else as orbax stored them (nested dicts, what a Linen model takes).
* :class:`LoadedModel`: ``predict(images)`` gives softmax probabilities, batch by batch
  through one jitted program (the last batch padded, so it compiles once per batch size);
  ``apply(x)`` the logits of one batch; ``train_state()`` the state
  :func:`orchard_jax.engine.evaluate` and the test report take.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax.core.precision import Policy, parse_policy
from orchard_jax.engine.checkpoint import _ORBAX_LOCK, CHECKPOINT_SUBDIR, quiet_orbax
from orchard_jax.fileio import atomic_write_text

__all__ = ["MODEL_FILE", "LoadedModel", "read_model_record", "restore_variables",
           "write_model_record"]

MODEL_FILE = "model.json"
PREDICT_BATCH = 256


def write_model_record(folder: str | pathlib.Path, *, architecture: dict[str, Any] | None,
                       num_classes: int, input_shape: Any, layout: str = "NCHW",
                       precision: str = "float32", model: str | None = None) -> pathlib.Path:
  """Writes ``folder/model.json`` (whole or not at all); returns its path.

  ``architecture``: the recipe's ``architecture`` section (``name`` or ``function``,
  ``dropout``, ``options``) that rebuilds the model, None for a model of one's own code;
  ``model``: the model's one-line ``repr``, for the messages of a model that cannot be
  rebuilt.
  """
  record = {"architecture": architecture, "num_classes": int(num_classes),
            "input_shape": None if input_shape is None else [int(d) for d in input_shape],
            "layout": layout, "precision": str(precision), "model": model}
  path = pathlib.Path(folder) / MODEL_FILE
  atomic_write_text(path, json.dumps(record, indent=2) + "\n")
  return path


def read_model_record(folder: str | pathlib.Path) -> dict[str, Any] | None:
  """``folder/model.json``'s record, or None when the folder has none."""
  path = pathlib.Path(folder) / MODEL_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def restore_variables(folder: str | pathlib.Path, model: Any,
                      input_shape: tuple[int, ...] | None) -> tuple[Any, Any]:
  """``(params, model_state)`` of the checkpoint in ``folder/checkpoint``.

  With ``input_shape`` the checkpoint is restored into the abstract structure of
  ``model.init`` (``jax.eval_shape``: nothing is computed); without it, an NNX model's
  own initial state gives the structure and any other model gets orbax's nested dicts.

  Raises:
    FileNotFoundError: ``folder`` has no ``checkpoint/``.
  """
  path = pathlib.Path(folder).absolute() / CHECKPOINT_SUBDIR
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint in {folder} (expected {path})")
  template = None
  if input_shape is not None:
    sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    template = jax.eval_shape(model.init, jax.random.key(0), sample)
  elif getattr(model, "initial_params", None) is not None:  # an NNX model's own state
    template = jax.eval_shape(lambda: (model.initial_params, model.initial_state))
  with _ORBAX_LOCK, quiet_orbax():
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  # it logs too
    with ocp.StandardCheckpointer() as checkpointer:
      if template is None:
        restored = checkpointer.restore(path)
      else:
        restored = checkpointer.restore(path, {"params": template[0],
                                               "model_state": template[1]})
  return restored["params"], restored["model_state"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(model: Any, policy: Policy, params: Any, model_state: Any, x: jax.Array) -> jax.Array:
  """Evaluation-mode float32 logits of ``x``, cast as ``eval_step`` casts them."""
  logits, _ = model.apply(policy.cast_to_compute(params), model_state,
                          policy.cast_to_compute(x), train=False, rng=jax.random.key(0))
  return policy.cast_to_output(logits).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _probabilities(model: Any, policy: Policy, params: Any, model_state: Any,
                   x: jax.Array) -> jax.Array:
  return jax.nn.softmax(_logits(model, policy, params, model_state, x), axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
  """A model and its trained variables, ready for inference.

  Attributes:
    model: The model (:class:`orchard_jax.models.Model`: ``init`` and ``apply``).
    params: Its trained parameters.
    model_state: Its other variables (BatchNorm statistics), possibly empty.
    num_classes: The number of classes its logits cover.
    input_shape: The per-sample input shape, channels last (None when not recorded).
    policy: The dtype policy it trained with (its compute and output dtypes are used).
    layout: The layout of the loaders it trained on (``"NCHW"`` for torch's); the model
      itself takes channels-last images.
    path: The checkpoint's folder.
    record: What ``model.json`` recorded (empty when there was none).
  """
  model: Any
  params: Any
  model_state: Any
  num_classes: int | None
  input_shape: tuple[int, ...] | None
  policy: Policy = dataclasses.field(default_factory=lambda: parse_policy("float32"))
  layout: str = "NCHW"
  path: pathlib.Path | None = None
  record: dict[str, Any] = dataclasses.field(default_factory=dict)

  def _inputs(self, images: Any) -> np.ndarray:
    x = np.asarray(images, np.float32)
    shape = self.input_shape
    if shape is not None and len(shape) == 3 and shape[-1] == 1 and x.shape[1:] == shape[:2]:
      x = x[..., None]  # [N, H, W] -> [N, H, W, 1], as the data adapter reads them
    if shape is not None and x.shape[1:] != tuple(shape):
      raise ValueError(f"images must have shape [N, {', '.join(map(str, shape))}] (channels "
                       f"last), got {list(x.shape)}")
    return x

  def apply(self, x: Any) -> jax.Array:
    """Evaluation-mode logits ``[B, num_classes]`` (float32) of one batch ``x``, jitted (one
    compile per batch shape)."""
    return _logits(self.model, self.policy, self.params, self.model_state, jnp.asarray(x))

  def predict(self, images: Any, *, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Softmax probabilities ``[N, num_classes]`` (float32, numpy) of ``images``
    (``[N, *input_shape]``, channels last, preprocessed as the training data was).

    Runs ``batch_size`` rows at a time through one jitted program; the last batch is padded
    to ``batch_size`` (zeros, dropped from the result), so any ``N`` compiles it once.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    x = self._inputs(images)
    n = x.shape[0]
    size = min(batch_size, max(n, 1))
    out = []
    for start in range(0, n, size):
      chunk = x[start:start + size]
      if chunk.shape[0] < size:
        chunk = np.concatenate([chunk, np.zeros((size - chunk.shape[0], *x.shape[1:]),
                                                np.float32)])
      out.append(_probabilities(self.model, self.policy, self.params, self.model_state,
                                jnp.asarray(chunk)))
    if not out:
      return np.zeros((0, self.num_classes or 0), np.float32)
    return np.concatenate(jax.device_get(out))[:n]

  def train_state(self) -> Any:
    """A :class:`~orchard_jax.core.state.TrainState` with these variables (an SGD state of
    the model's structure), for :func:`orchard_jax.engine.evaluate` and the test report.

    Raises:
      ValueError: the input shape or the number of classes is not known.
    """
    if self.input_shape is None or self.num_classes is None:
      raise ValueError(f"the model of {self.path} has no recorded input shape or number of "
                       f"classes; a state needs both")
    from orchard_jax.engine.first_state import create_train_state  # pylint: disable=import-outside-toplevel
    state = create_train_state(self.model, input_shape=self.input_shape,
                               num_classes=self.num_classes, precision=self.policy,
                               mixup_alpha=0.0)
    params, model_state = jax.device_put((self.params, self.model_state),
                                         jax.tree.leaves(state.params)[0].sharding)
    return state.replace(params=jax.tree.map(lambda t, a: jnp.asarray(a, t.dtype), state.params,
                                             params),
                         model_state=model_state)
