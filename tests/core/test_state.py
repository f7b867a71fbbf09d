"""create_train_state: one compiled program that equals eager initialisation.

``orchard_jax.create_train_state`` (``orchard_jax.engine.first_state``) takes the
program from the executable cache; the core's own takes it from ``jax.jit``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax import MLP, MiniCNN, create_train_state
from orchard_jax.engine import executables
from orchard_jax.models import as_model


@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5, -1, 2**33 + 3])
def test_the_compiled_build_equals_eager_initialisation_from_jax_random_key(seed):
  model = MLP(num_classes=3, hidden=(4,))
  state = create_train_state(model, input_shape=(2, 3, 1), num_classes=3, seed=seed,
                             learning_rate=0.1, momentum=0.5, weight_decay=0.01, grad_clip=None,
                             mixup_alpha=0.3, label_smoothing=0.1, focal_gamma=1.5,
                             class_weights=[1.0, 2.0, 3.0])
  init_key, train_key = jax.random.split(jax.random.key(seed))
  params, _ = as_model(model).init(init_key, jnp.zeros((1, 2, 3, 1)))
  jax.tree.map(np.testing.assert_array_equal, state.params, params)
  np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(train_key))
  hyper = jax.device_get(state.opt_state.hyperparams)
  assert hyper == {"learning_rate": np.float32(0.1), "momentum": np.float32(0.5),
                   "weight_decay": np.float32(0.01), "grad_clip": np.float32(0.0)}
  h = jax.device_get(state.hparams)
  assert (h.mixup_alpha, h.mixup_on, h.label_smoothing, h.focal_gamma) == (
      np.float32(0.3), True, np.float32(0.1), np.float32(1.5))
  np.testing.assert_array_equal(h.class_weights, [1.0, 2.0, 3.0])
  assert int(state.step) == 0


def test_a_second_trial_of_the_same_structure_builds_its_state_without_compiling():
  executables.clear()
  kwargs = dict(input_shape=(2, 3, 1), num_classes=3)
  create_train_state(MLP(num_classes=3, hidden=(5,)), seed=1, learning_rate=0.1, mixup_alpha=0.3,
                     **kwargs)
  create_train_state(MLP(num_classes=3, hidden=(5,)), seed=2, learning_rate=0.2, mixup_alpha=0.1,
                     **kwargs)
  assert executables.stats("init")["compiled"] == 1
  create_train_state(MLP(num_classes=3, hidden=(5,)), seed=3, mixup_alpha=0.0, **kwargs)
  assert executables.stats("init")["compiled"] == 2  # without MixUp: another structure


def test_the_cores_build_uses_jits_own_cache_and_equals_the_cached_one():
  from orchard_jax.core import state as core_state  # pylint: disable=import-outside-toplevel

  executables.clear()
  kwargs = dict(input_shape=(2, 3, 1), num_classes=3, seed=5, mixup_alpha=0.2)
  pure = core_state.create_train_state(MLP(num_classes=3, hidden=(6,)), **kwargs)
  assert executables.stats("init") == {"compiled": 0, "loaded": 0, "saved": 0, "ahead": 0}
  cached = create_train_state(MLP(num_classes=3, hidden=(6,)), **kwargs)
  assert executables.stats("init")["compiled"] == 1
  assert pure.spec == cached.spec
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(pure.params),
               jax.device_get(cached.params))
  assert all(leaf.committed for leaf in jax.tree.leaves(pure))  # placed as the cached one
  asked = []

  def compiled(jitted, args, **how):
    asked.append(how["name"])
    return functools.partial(jitted, *how["static"])

  core_state.create_train_state(MLP(num_classes=3, hidden=(6,)), compiled=compiled, **kwargs)
  assert asked == ["init"]


@pytest.mark.parametrize("alpha, epochs, mixup", [(0.2, 3, True), (0.0, 3, False), (0.2, 0, False)])
def test_a_state_is_built_without_mixup_when_mixup_can_never_run(alpha, epochs, mixup):
  from orchard_jax import TrainingConfig
  from orchard_jax.engine.first_state import state_from_config

  cfg = TrainingConfig(mixup_alpha=alpha, mixup_epochs=epochs)
  state = state_from_config(MLP(num_classes=3, hidden=(5,)), cfg, input_shape=(2, 3, 1),
                            num_classes=3)
  assert state.spec.mixup is mixup
  assert (state.hparams.mixup_alpha is None) is (not mixup)


@pytest.mark.parametrize("alpha", [-0.1, float("nan")])
def test_a_negative_or_nan_mixup_alpha_is_refused(alpha):
  with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
    create_train_state(MLP(num_classes=3, hidden=(5,)), input_shape=(2, 3, 1), num_classes=3,
                       mixup_alpha=alpha)


def test_class_weights_of_the_wrong_shape_raise_value_error():
  with pytest.raises(ValueError, match=r"class_weights must have shape \(3,\), got \(2,\)"):
    create_train_state(MLP(num_classes=3), input_shape=(4,), num_classes=3,
                       class_weights=[1.0, 2.0])


@pytest.mark.parametrize("model", [MLP(num_classes=3, hidden=(4,)), MiniCNN(num_classes=3)],
                         ids=["mlp", "mini_cnn"])
def test_the_build_compiled_for_speed_gives_the_bits_of_a_default_compile(model):
  # The build is compiled with BUILD_COMPILER_OPTIONS (LLVM level 1); LLVM level 0
  # would change the initialisers' bits, level 1 must not.
  from orchard_jax.core import state as state_module  # pylint: disable=import-outside-toplevel
  assert state_module.BUILD_COMPILER_OPTIONS
  spec_state = create_train_state(model, input_shape=(6, 6, 1), num_classes=3, seed=11)
  default = jax.jit(state_module._build, static_argnums=0)
  hyper = {key: jnp.float32(value) for key, value in
           {"learning_rate": 0.008, "momentum": 0.9, "weight_decay": 5e-4, "grad_clip": 1.0,
            "mixup_alpha": 0.0, "label_smoothing": 0.0, "focal_gamma": 2.0}.items()}
  hyper["class_weights"] = jnp.ones(3, jnp.float32)
  reference = default(spec_state.spec, np.uint32(11), hyper)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(spec_state.params),
               jax.device_get(reference.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(spec_state.model_state),
               jax.device_get(reference.model_state))
