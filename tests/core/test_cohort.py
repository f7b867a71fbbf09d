"""Cohorts: K members stepped together match their solo runs, compile once, stay independent."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax import MLP, MiniCNN, create_train_state, eval_step, train_step
from orchard_jax.core import cohort as co
from orchard_jax.core.batches import IndexedBatch

B, C = 8, 3

# Three trials that differ in every per-trial array the step reads.
MEMBERS = (
    dict(seed=1, learning_rate=0.05, momentum=0.9, weight_decay=5e-4, grad_clip=1.0,
         label_smoothing=0.0, mixup_alpha=0.4, focal_gamma=2.0),
    dict(seed=2, learning_rate=0.2, momentum=0.5, weight_decay=0.01, grad_clip=0.0,
         label_smoothing=0.1, mixup_alpha=1.0, focal_gamma=1.0, class_weights=[1.0, 2.0, 0.5]),
    dict(seed=3, learning_rate=0.01, momentum=0.0, weight_decay=0.0, grad_clip=0.5,
         label_smoothing=0.2, mixup_alpha=0.2, focal_gamma=3.0),
)


def _batch(seed=0, n_valid=6, shape=(4, 4, 1), batch=B):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, C, batch), jnp.int32),
          "mask": jnp.asarray(np.arange(batch) < n_valid)}


def _state(model, shape=(4, 4, 1), **kw):
  return create_train_state(model, input_shape=shape, num_classes=C, **kw)


def _mlp(**kw):
  return MLP(num_classes=C, **{"hidden": (16,), "dropout": 0.3, **kw})


def _host(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


# MiniCNN's convolution biases feed a BatchNorm, which subtracts their mean: their gradient is
# 0 in exact arithmetic, and what is computed is rounding noise (~1e-9) that the batched
# program rounds differently. Their values and optimizer slots are noise in both runs, so they
# are checked against an absolute bound (AdamW's parameters: see _adamw_params_close).
NOISE = re.compile(r"\['conv\d'\]\['bias'\]")


def _close(got, want, what="", noise_atol=None):
  """Every float leaf of ``got`` within 1e-5 of ``want``, relative: ``|a - b| <= 1e-5 |b|`` (2-norms).

  A norm, not each element: where AdamW's first step divides a gradient element near 0 by
  its own size plus 1e-8, a rounding of that element moves its update by a visible fraction
  of the learning rate. Non-float leaves must be equal. Leaves matching NOISE are checked
  against ``noise_atol`` only, when it is given.
  """
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  pairs = zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got))
  for (path, b), a in pairs:
    a, b, name = _host(a), _host(b), f"{what}{jax.tree_util.keystr(path)}"
    if noise_atol is not None and NOISE.search(name):
      np.testing.assert_allclose(a, b, rtol=0, atol=noise_atol, err_msg=name)
    elif np.issubdtype(b.dtype, np.floating):
      a, b = a.astype(np.float64), b.astype(np.float64)
      error, norm = np.linalg.norm(a - b), np.linalg.norm(b)
      assert error <= 1e-5 * norm, f"{name}: |a - b| = {error:.3g}, |b| = {norm:.3g}"
    else:
      np.testing.assert_array_equal(a, b, err_msg=name)


def _adamw_params_close(got, want, learning_rate, what=""):
  """AdamW's first step moves a parameter by about lr g / (|g| + 1e-8): for the few elements
  with |g| < 1e-6 it turns g's last bits into a visible fraction of lr. Those are checked to
  differ by at most the 2 lr both sides can move; all others within 1e-5 relative."""
  grads = jax.tree.map(lambda mu: np.asarray(mu) / 0.1, want.opt_state.inner_state[1].mu)  # b1 0.9
  pairs = zip(jax.tree_util.tree_flatten_with_path(want.params)[0], jax.tree.leaves(got.params),
              jax.tree.leaves(grads))
  for (path, b), a, g in pairs:
    a, b, name = np.asarray(a, np.float64), np.asarray(b, np.float64), what + jax.tree_util.keystr(path)
    tiny = np.abs(g) < 1e-6
    assert np.all(np.abs(a - b)[tiny] <= 2 * learning_rate + 1e-6), name
    error, norm = np.linalg.norm((a - b)[~tiny]), np.linalg.norm(b[~tiny])
    assert error <= 1e-5 * norm, f"{name}: |a - b| = {error:.3g}, |b| = {norm:.3g}"


def _row(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _placement(tree):
  return [(x.committed, x.sharding) for x in jax.tree.leaves(tree)]


def _members(model, shape, optimizer, switch_off_last=True, **kw):
  """The three MEMBERS as solo states; the last with MixUp switched off."""
  states = [_state(model, shape, optimizer=optimizer, **m, **kw) for m in MEMBERS]
  if switch_off_last:
    states[-1] = states[-1].with_mixup(False)
  return states


@pytest.mark.parametrize("name, model, shape, optimizer, criterion", [
    ("mlp", _mlp(), (4, 4, 1), "sgd", "cross_entropy"),
    ("mlp", _mlp(), (4, 4, 1), "adamw", "focal"),
    ("mini_cnn", MiniCNN(num_classes=C, dropout=0.3), (8, 8, 1), "sgd", "cross_entropy"),
    ("mini_cnn", MiniCNN(num_classes=C, dropout=0.3), (8, 8, 1), "adamw", "cross_entropy"),
])
def test_a_member_after_one_step_is_its_solo_step(name, model, shape, optimizer, criterion):
  states = _members(model, shape, optimizer, criterion=criterion)
  batch = _batch(0, shape=shape)
  cohort, metrics = co.cohort_train_step(co.stack(states), batch)
  for i, state in enumerate(states):  # the solo steps donate the states, after stack copied them
    solo, solo_metrics = train_step(state, batch)
    got, what = co.member(cohort, i), f"{name} {optimizer} member {i} state"
    if optimizer == "adamw":
      _adamw_params_close(got, solo, MEMBERS[i]["learning_rate"], what)
      got, solo = got.replace(params=()), solo.replace(params=())
    _close(got, solo, what, noise_atol=1e-6)
    _close(_row(metrics, i), solo_metrics, f"{name} {optimizer} member {i} metrics")
    if optimizer == "sgd":  # the evaluation program does not depend on the optimizer
      _close(_row(co.cohort_eval_step(cohort, batch), i), eval_step(solo, batch),
             f"{name} member {i} eval")


def test_members_with_their_own_learning_rates_and_mixup_switches_match_their_solo_runs():
  states = _members(_mlp(), (4, 4, 1), "adamw", criterion="focal")  # the programs of a test above
  cohort = co.stack(states)
  lrs_by_step = np.array([[0.05, 0.2, 0.01], [0.03, 0.1, 0.02], [0.01, 0.3, 0.0], [0.1, 0.0, 0.05]])
  mixup_by_step = np.array([[True, True, False]] * 2 + [[True, False, False]] * 2)
  for step, (lrs, on) in enumerate(zip(lrs_by_step, mixup_by_step)):
    batch = _batch(step, n_valid=B - step)
    cohort = co.with_mixup(co.with_learning_rates(cohort, lrs), on)
    cohort, metrics = co.cohort_train_step(cohort, batch)
    for i in range(len(states)):
      states[i], solo_metrics = train_step(
          states[i].with_learning_rate(lrs[i]).with_mixup(bool(on[i])), batch)
      _close(_row(metrics, i), solo_metrics, f"step {step} member {i} metrics")
  for i, solo in enumerate(states):
    _close(co.member(cohort, i), solo, f"member {i}")
  np.testing.assert_array_equal(_host(co.member(cohort, 1).learning_rate), np.float32(0.0))


def test_dict_and_indexed_batches_give_the_same_cohort_step():
  images = np.random.default_rng(5).normal(size=(11, 4, 4, 1)).astype(np.float32)
  images[-1] = 0.0  # the padding row
  index = np.array([[3, 0, 7, 9, 1, 2, 10, 10], [4, 5, 6, 8, 0, 1, 2, 3]], np.int32)
  label = np.random.default_rng(6).integers(0, C, index.shape).astype(np.int32)
  indexed = IndexedBatch(images=jnp.asarray(images), index=jnp.asarray(index),
                         label=jnp.asarray(label), count=jnp.asarray([6, 8], jnp.int32),
                         row=jnp.asarray(0, jnp.int32))
  as_dict = {"image": jnp.asarray(images[index[0]]), "label": jnp.asarray(label[0]),
             "mask": jnp.asarray(np.arange(B) < 6)}
  states = _members(_mlp(), (4, 4, 1), "sgd")
  from_indexed, m_indexed = co.cohort_train_step(co.stack(states), indexed)
  from_dict, m_dict = co.cohort_train_step(co.stack(states), as_dict)
  _close((from_indexed, m_indexed), (from_dict, m_dict))
  _close(co.cohort_eval_step(from_indexed, indexed), co.cohort_eval_step(from_dict, as_dict))


def test_one_compile_per_spec_k_and_batch_shape_across_replace_member_and_setters(xla_compiles):
  model = _mlp(hidden=(11,))  # a structure no other test compiles
  states = _members(model, (4, 4, 1), "sgd")
  fresh = [_state(model, optimizer="sgd", seed=10 + e, learning_rate=0.1, mixup_alpha=0.3)
           for e in range(6)]
  batches = [_batch(b, n_valid=B - b) for b in range(3)]
  cohort = co.stack(states)
  placement = _placement(cohort)
  cohort = co.replace_member(cohort, 0, fresh[0])  # its own program, compiled once here
  with xla_compiles() as first:
    cohort, metrics = co.cohort_train_step(cohort, batches[0])
    jax.block_until_ready(metrics)
  outputs = co.cohort_eval_step(cohort, batches[0])
  with xla_compiles() as later:  # two more "epochs": a new trial in a slot, new rates and switches
    for epoch in (1, 2):
      cohort = co.replace_member(cohort, epoch, fresh[epoch])
      cohort = co.with_learning_rates(cohort, np.array([0.1, 0.05, 0.2]) / epoch)
      cohort = co.with_mixup(cohort, np.array([epoch == 1, True, False]))
      for batch in batches:
        cohort, metrics = co.cohort_train_step(cohort, batch)
      outputs = co.cohort_eval_step(cohort, batches[0])
    other = co.stack(fresh[3:])  # another cohort of the same spec, K and batch shape
    other, metrics = co.cohort_train_step(other, batches[1])
    jax.block_until_ready((cohort, outputs, other, metrics))
  assert (first.count, later.count) == (1, 0)
  assert _placement(cohort) == placement


def test_a_diverging_member_changes_nothing_in_the_others():
  states = _members(_mlp(), (4, 4, 1), "sgd", switch_off_last=False)
  states[1] = _state(_mlp(), **{**MEMBERS[1], "learning_rate": 1e30})
  states[2] = states[2].replace(params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan),
                                                    states[2].params))
  cohort = co.stack(states)
  solo = states[0]
  for step in range(3):
    cohort, metrics = co.cohort_train_step(cohort, _batch(step))
    solo, solo_metrics = train_step(solo, _batch(step))
  _close(co.member(cohort, 0), solo, "member 0")
  _close(_row(metrics, 0), solo_metrics, "member 0 metrics")
  losses = np.asarray(metrics["loss_sum"])
  assert np.isfinite(losses[0]) and not np.isfinite(losses[1:]).any(), losses
  assert not np.isfinite(_host(co.member(cohort, 1).params["Dense_0"]["kernel"])).all()


def test_each_member_keeps_its_own_float16_loss_scale():
  states = [_state(_mlp(dropout=0.0), precision="float16", mixup_alpha=0.0, seed=s) for s in (1, 2)]
  big = states[1].loss_scale.replace(scale=jnp.asarray(2.0**40, jnp.float32))
  states[1] = states[1].replace(loss_scale=big)  # its float16 gradients overflow
  cohort, _ = co.cohort_train_step(co.stack(states), _batch(0))
  kept, stepped = co.member(cohort, 1), co.member(cohort, 0)
  solo, _ = train_step(states[0], _batch(0))
  _close(stepped, solo, "member 0")
  _close(kept.params, states[1].params, "member 1 params")  # the update was skipped
  assert float(kept.loss_scale.scale) == 2.0**39 and int(kept.loss_scale.counter) == 0
  assert float(stepped.loss_scale.scale) == 2.0**15 and int(stepped.loss_scale.counter) == 1


def test_stack_then_member_gives_back_each_state_bit_for_bit():
  states = _members(_mlp(), (4, 4, 1), "adamw", criterion="focal")
  cohort = co.stack(states)
  assert co.size(cohort) == 3 and cohort.step.shape == (3,)
  for i, state in enumerate(states):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(_host(a), _host(b)),
                 co.member(cohort, i), state)
  refill = co.replace_member(co.stack(states), 1, states[0])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(_host(a), _host(b)),
               co.member(refill, 1), states[0])


def test_stacking_states_of_different_specs_or_structures_is_refused():
  sgd = _state(_mlp(), optimizer="sgd", mixup_alpha=0.4)
  cases = [
      (_state(_mlp(), optimizer="adamw", mixup_alpha=0.4), "spec.optimizer is 'adamw', not 'sgd'"),
      (_state(_mlp(), optimizer="sgd", mixup_alpha=0.0), "spec.mixup is False, not True"),
      (_state(_mlp(hidden=(8,)), optimizer="sgd", mixup_alpha=0.4), "spec.model is"),
      (_state(_mlp(), optimizer="sgd", mixup_alpha=0.4, precision="float16"), "spec.policy is"),
  ]
  for other, message in cases:
    with pytest.raises(ValueError, match=f"^cannot stack state 1 with state 0: its {message}"):
      co.stack([sgd, other])
  cohort = co.stack([sgd, sgd])
  with pytest.raises(ValueError, match="^cannot put state in member 1 of the cohort: its spec.optimizer"):
    co.replace_member(cohort, 1, cases[0][0])
  with pytest.raises(ValueError, match=r"^state 0 is already a cohort \(step has shape \(2,\)\)"):
    co.stack([cohort])
  with pytest.raises(ValueError, match=r"^member index must be in \[0, 2\), got i=2"):
    co.member(cohort, 2)
  with pytest.raises(ValueError, match=r"^learning_rates must have shape \(2,\), one per member"):
    co.with_learning_rates(cohort, [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match=r"^expected a cohort"):
    co.cohort_train_step(sgd, _batch(0))
  with pytest.raises(ValueError, match="^stack needs at least one TrainState"):
    co.stack([])
