"""Augmentation in the training step: structure in the spec, strengths in the state.

A state built with ``augmentation=None`` traces no augmentation and keeps its MixUp and
dropout keys; states differing only in strengths share one compiled step and stack into
one cohort whose members equal their solo steps; the evaluation step never augments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax import AugmentationConfig, MLP, create_train_state, eval_step, train_step
from orchard_jax.core import cohort as co
from orchard_jax.core import steps
from orchard_jax.core.augment import AugmentParams, AugmentSpec
from orchard_jax.core.state import augmentation_spec

C, SHAPE = 3, (8, 8, 1)
STRONG = AugmentationConfig(hflip=1.0, rotation_angle=30, jitter_val=0.5, min_scale=0.5)
IDENTITY = AugmentationConfig(hflip=0.0, rotation_angle=0, jitter_val=0.0, min_scale=1.0)


def _batch(seed=0, batch=8, shape=SHAPE):
  rng = np.random.default_rng(seed)  # images in [0, 1], as the transforms expect
  return {"image": jnp.asarray(rng.random((batch, *shape)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, C, batch), jnp.int32),
          "mask": jnp.asarray(np.arange(batch) < batch - 2)}


def _state(model, augmentation=None, shape=SHAPE, **kw):
  """A state with MixUp (alpha 0.4) unless told: the tests share its few compiled steps."""
  return create_train_state(model, input_shape=shape, num_classes=C, augmentation=augmentation,
                            **{"mixup_alpha": 0.4, **kw})


def _params_close(a, b, atol):
  return all(np.allclose(x, y, atol=atol) for x, y in
             zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))


@pytest.fixture(scope="module")
def model():
  return MLP(num_classes=C, hidden=(16,), dropout=0.3)


def test_a_state_without_augmentation_has_none_and_traces_none(model, monkeypatch):
  state = _state(model)
  assert state.spec.augment is None and state.hparams.augment is None
  def refuse(*args):
    raise AssertionError("augment traced for a state without augmentation")
  monkeypatch.setattr(steps, "augment", refuse)
  jax.eval_shape(steps._train_step, state, _batch())  # traces the step: no augment in it


def test_the_config_becomes_the_spec_and_float32_strengths(model):
  state = _state(model, STRONG)
  assert state.spec.augment == AugmentSpec(geometric=True, photometric=True, saturation=False)
  assert state.hparams.augment == AugmentParams(*(np.float32(v) for v in (1.0, 30, 0.5, 0.5)))
  assert all(x.dtype == jnp.float32 and x.shape == () for x in state.hparams.augment)


@pytest.mark.parametrize("config, shape, spec", [
    (AugmentationConfig(is_anatomical=True), (8, 8, 1),
     AugmentSpec(geometric=False, photometric=True, saturation=False)),
    (AugmentationConfig(is_texture_based=True), (8, 8, 3),
     AugmentSpec(geometric=True, photometric=False, saturation=True)),
    (AugmentationConfig(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.25]), (8, 8, 3),
     AugmentSpec(saturation=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25))),
    (None, (8, 8, 3), None),
])
def test_the_dataset_flags_channels_and_normalisation_make_the_spec(config, shape, spec):
  assert augmentation_spec(config, shape) == spec


@pytest.mark.parametrize("config, shape, message", [
    (AugmentationConfig(), (64,), r"augmentation needs image inputs of shape \(H, W, C\), got "
                                  r"input shape \(64,\)"),
    (AugmentationConfig(mean=[0.5], std=[0.2]), (8, 8, 3),
     r"augmentation mean and std must have one value per channel \(3\)"),
])
def test_inputs_it_cannot_augment_are_refused(config, shape, message):
  with pytest.raises(ValueError, match=message):
    augmentation_spec(config, shape)


def test_trials_differing_in_strengths_share_one_compiled_step(xla_compiles):
  model = MLP(num_classes=C, hidden=(13,))  # a structure no other test compiles
  weak = _state(model, AugmentationConfig(hflip=0.1, rotation_angle=5), mixup_alpha=0.0)
  strong = _state(model, STRONG, mixup_alpha=0.0)
  assert weak.spec == strong.spec
  with xla_compiles() as seen:
    for state in (weak, strong):
      state, _ = train_step(state, _batch())
      train_step(state, _batch(seed=1))
  assert seen.by_name["jit(_train_step)"] == 1


def test_augmentation_changes_the_training(model):
  off, on = train_step(_state(model), _batch())[0], train_step(_state(model, STRONG), _batch())[0]
  assert not _params_close(off, on, atol=1e-4)


def test_its_key_is_its_own_mixup_and_dropout_keep_theirs(model):
  # The identity augmentation changes no pixel: with the same MixUp and dropout draws, the
  # step equals that of a state without augmentation.
  batch = _batch()
  off = train_step(_state(model), batch)[0]
  same = train_step(_state(model, IDENTITY), batch)[0]
  assert _params_close(off, same, atol=1e-6)


def test_the_evaluation_step_never_augments(model):
  batch = _batch()
  off, on = _state(model), _state(model, STRONG)
  np.testing.assert_array_equal(eval_step(off, batch)["logits"], eval_step(on, batch)["logits"])


def test_a_mismatched_state_is_refused_at_trace_time(model):
  state = _state(model, STRONG)
  broken = state.replace(hparams=state.hparams._replace(augment=None))
  with pytest.raises(ValueError, match="spec.augment and hparams.augment must both be set"):
    jax.eval_shape(steps._train_step, broken, _batch())


def test_strengths_and_flags_are_part_of_the_programs_key(model):
  # the executable cache names its files by the args' tree (str), which holds the spec
  tree = lambda s: str(jax.tree.structure(s))
  base, other = _state(model, STRONG), _state(model, AugmentationConfig(hflip=0.2))
  assert tree(base) == tree(other)
  assert tree(base) != tree(_state(model, AugmentationConfig(is_anatomical=True)))
  assert tree(base) != tree(_state(model))


def test_cohort_members_with_different_strengths_equal_their_solo_steps(model):
  configs = [AugmentationConfig(hflip=h, rotation_angle=r, jitter_val=j, min_scale=m)
             for h, r, j, m in ((0.0, 0, 0.0, 1.0), (0.5, 10, 0.2, 0.9), (1.0, 45, 0.4, 0.6),
                                (0.3, 90, 0.1, 0.3))]
  solos = [_state(model, c, seed=i, mixup_alpha=0.1 * (i + 1)) for i, c in enumerate(configs)]
  cohort = co.stack(solos)
  for seed in range(2):
    batch = _batch(seed)
    cohort, _ = co.cohort_train_step(cohort, batch)
    solos = [train_step(s, batch)[0] for s in solos]
  for i, solo in enumerate(solos):
    assert _params_close(co.member(cohort, i), solo, atol=1e-5), i
  # and the members did train differently
  assert not _params_close(co.member(cohort, 0), co.member(cohort, 2), atol=1e-4)


def test_normalised_inputs_compile_the_crop_once_as_inputs_in_0_1_do():
  """With mean/std the step normalises before the crop (which is linear in the pixels): the
  compiled step holds as many gather fusions as for [0, 1] inputs. Normalising after the crop
  made XLA recompute the crop's gathers in each im2col slice of MiniCNN's first convolution
  (219 mentions of "gather" in the compiled program against 86; the step 1.19x the
  unaugmented one at batch 16)."""
  from orchard_jax import MiniCNN
  shape, batch = (28, 28, 1), _batch(batch=16, shape=(28, 28, 1))
  counts = {}
  for name, config in (("unit", AugmentationConfig()),
                       ("normalised", AugmentationConfig(mean=(0.5,), std=(0.25,)))):
    state = _state(MiniCNN(num_classes=C), config, shape=shape, mixup_alpha=0.0)
    counts[name] = steps.train_step.lower(state, batch).compile().as_text().count("gather")
  assert counts["unit"] > 0 and counts["normalised"] == counts["unit"], counts
