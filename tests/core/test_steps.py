"""train_step / eval_step: purity, compile reuse, masking, precision, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from orchard_jax import MLP, MiniCNN, create_train_state, eval_step, train_step
from orchard_jax.core.steps import _train_step

B, C = 8, 3


def _batch(seed=0, n_valid=B, shape=(4, 4, 1)):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(B, *shape)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, C, B), jnp.int32),
          "mask": jnp.arange(B) < n_valid}


def _mlp_state(**kw):
  kw = {"optimizer": "sgd", "learning_rate": 0.1, "mixup_alpha": 0.0, **kw}
  return create_train_state(MLP(num_classes=C, hidden=(16,)), input_shape=(4, 4, 1), num_classes=C, **kw)


def test_train_step_compiles_once_across_lr_mixup_switch_new_batch_and_new_trial():
  train_step.clear_cache() if hasattr(train_step, "clear_cache") else None
  state = _mlp_state(mixup_alpha=0.4, seed=1)
  state, _ = train_step(state, _batch(0))
  state = state.with_learning_rate(0.01).with_mixup(False)
  state, _ = train_step(state, _batch(1, n_valid=5))
  # A second trial: other seed, lr, momentum, decay, smoothing, focal gamma, class weights,
  # MixUp alpha.
  other = _mlp_state(seed=2, learning_rate=0.5, momentum=0.1, weight_decay=0.01, grad_clip=0.0,
                     label_smoothing=0.2, class_weights=np.array([1.0, 2.0, 0.5]),
                     mixup_alpha=0.1)
  other, _ = train_step(other, _batch(2))
  assert train_step._cache_size() == 1
  # mixup_alpha=0: a state without MixUp, whose step is a program of its own.
  train_step(_mlp_state(seed=3, mixup_alpha=0.0), _batch(3))
  assert train_step._cache_size() == 2


def _dropout_states(seed=4):
  """Two states with equal parameters: built without MixUp, and with MixUp switched off."""
  kw = dict(input_shape=(4, 4, 1), num_classes=C, seed=seed, learning_rate=0.1,
            label_smoothing=0.1, weight_decay=0.01)
  model = MLP(num_classes=C, hidden=(16,), dropout=0.3)
  return (create_train_state(model, mixup_alpha=0.0, **kw),
          create_train_state(model, mixup_alpha=0.4, **kw).with_mixup(False))


def test_a_state_built_without_mixup_trains_the_bits_of_mixup_switched_off():
  without, switched_off = _dropout_states()
  assert not without.spec.mixup and switched_off.spec.mixup
  assert without.hparams.mixup_alpha is None and without.hparams.mixup_on is None
  assert without.with_mixup(True) is without  # nothing to switch on: it never mixes
  step = jax.jit(_train_step)
  for i in range(3):  # dropout draws from the same keys; row 5.. are padding
    without, m_without = step(without, _batch(i, n_valid=5))
    switched_off, m_switched_off = step(switched_off, _batch(i, n_valid=5))
  # The same arithmetic in two programs: XLA may contract a multiply-add differently in each
  # (1 ULP seen in the first layer's kernel with jax 0.10.2 on XLA:CPU), so floats agree to
  # within 2 ULP and everything else exactly.
  def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if np.issubdtype(a.dtype, np.floating):
      np.testing.assert_array_max_ulp(a, b, maxulp=2)
    else:
      np.testing.assert_array_equal(a, b)
  jax.tree.map(same, (without.params, without.opt_state, m_without),
               (switched_off.params, switched_off.opt_state, m_switched_off))


def _primitives(jaxpr, found=None) -> set[str]:
  """The names of every primitive in ``jaxpr`` and the jaxprs nested in its equations."""
  found = set() if found is None else found
  for eqn in jaxpr.eqns:
    found.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          _primitives(getattr(sub, "jaxpr", sub), found)
  return found


def test_the_step_without_mixup_has_no_gamma_sampler_or_permutation():
  without, with_mixup = _dropout_states()
  primitives = lambda state: _primitives(jax.make_jaxpr(_train_step)(state, _batch(0)).jaxpr)
  assert {"random_gamma", "sort"} <= primitives(with_mixup)
  assert not {"random_gamma", "sort"} & primitives(without)


def test_mixup_hyperparameters_that_disagree_with_the_spec_are_a_clear_error():
  without, with_mixup = _dropout_states()
  given = without.replace(hparams=without.hparams._replace(
      mixup_alpha=jnp.float32(0.3), mixup_on=jnp.bool_(True)))
  with pytest.raises(ValueError, match="built with mixup_alpha=0.*has no MixUp"):
    train_step(given, _batch(0))
  missing = with_mixup.replace(hparams=with_mixup.hparams._replace(mixup_alpha=None))
  with pytest.raises(ValueError, match="spec.mixup is True but hparams.mixup_alpha"):
    train_step(missing, _batch(0))


def test_train_step_is_pure_given_the_same_state_and_batch():
  run = lambda: jax.device_get(_train_step(_mlp_state(mixup_alpha=0.3), _batch(0)))
  (s1, m1), (s2, m2) = run(), run()
  jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)
  jax.tree.map(np.testing.assert_array_equal, m1, m2)


def test_skipping_the_division_by_a_unit_loss_scale_changes_no_bit():
  unit = _mlp_state(grad_clip=1.0, weight_decay=0.01)
  assert unit.loss_scale.unit
  divided = unit.replace(loss_scale=unit.loss_scale.replace(unit=False))
  step = jax.jit(_train_step)
  for i in range(3):
    unit, m_unit = step(unit, _batch(i))
    divided, m_divided = step(divided, _batch(i))
  jax.tree.map(np.testing.assert_array_equal, (unit.params, unit.opt_state, m_unit),
               (divided.params, divided.opt_state, m_divided))


def test_padded_rows_do_not_change_the_update_or_metrics():
  full = _batch(0, n_valid=5)
  garbage = {**full, "image": full["image"].at[5:].set(1e3), "label": full["label"].at[5:].set(2)}
  s1, m1 = _train_step(_mlp_state(), full)
  s2, m2 = _train_step(_mlp_state(), garbage)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s1.params, s2.params)
  assert float(m1["count"]) == 5.0
  np.testing.assert_allclose(m1["loss_sum"], m2["loss_sum"], rtol=1e-6)


def test_mini_cnn_batchnorm_statistics_ignore_padding_rows():
  make = lambda: create_train_state(MiniCNN(num_classes=C), input_shape=(4, 4, 1), num_classes=C,
                                    mixup_alpha=0.0)
  full = _batch(0, n_valid=5)
  garbage = {**full, "image": full["image"].at[5:].set(50.0)}
  s1, _ = _train_step(make(), full)
  s2, _ = _train_step(make(), garbage)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               s1.model_state, s2.model_state)


def test_one_sgd_train_step_matches_torch_end_to_end():
  state = _mlp_state(learning_rate=0.1, momentum=0.9, weight_decay=1e-2, grad_clip=0.5,
                     label_smoothing=0.1, class_weights=np.array([0.5, 1.0, 2.0], np.float32))
  batch = _batch(3, n_valid=6)
  p = jax.device_get(state.params)
  torch_mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                  torch.nn.Linear(16, C))
  with torch.no_grad():
    for layer, name in ((torch_mlp[1], "Dense_0"), (torch_mlp[3], "Dense_1")):
      layer.weight.copy_(torch.tensor(np.asarray(p[name]["kernel"]).T))
      layer.bias.copy_(torch.tensor(np.asarray(p[name]["bias"])))
  opt = torch.optim.SGD(torch_mlp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
  x = torch.tensor(np.asarray(batch["image"][:6]))
  y = torch.tensor(np.asarray(batch["label"][:6]), dtype=torch.long)
  loss = torch.nn.functional.cross_entropy(torch_mlp(x), y, weight=torch.tensor([0.5, 1.0, 2.0]),
                                           label_smoothing=0.1)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(torch_mlp.parameters(), 0.5)
  opt.step()
  new_state, metrics = train_step(state, batch)
  np.testing.assert_allclose(float(metrics["loss_sum"]) / 6, loss.item(), rtol=1e-5)
  new_p = jax.device_get(new_state.params)
  np.testing.assert_allclose(new_p["Dense_0"]["kernel"], torch_mlp[1].weight.detach().numpy().T,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new_p["Dense_1"]["bias"], torch_mlp[3].bias.detach().numpy(),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bfloat16", "params=float32,compute=bfloat16,output=float32"])
def test_bfloat16_policy_keeps_float32_params_and_outputs(precision):
  state = create_train_state(MiniCNN(num_classes=C), input_shape=(4, 4, 1), num_classes=C,
                             precision=precision)
  state, metrics = train_step(state, _batch(0))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.model_state))
  assert not state.loss_scale.dynamic
  out = eval_step(state, _batch(1))
  assert out["logits"].dtype == jnp.float32
  assert np.isfinite(float(metrics["loss_sum"])) and np.isfinite(np.asarray(out["logits"])).all()


def test_float16_skips_non_finite_steps_and_lowers_the_scale():
  state = create_train_state(MLP(num_classes=C, hidden=(16,)), input_shape=(4, 4, 1),
                             num_classes=C, precision="float16", mixup_alpha=0.0)
  assert state.loss_scale.dynamic
  huge = {**_batch(0), "image": _batch(0)["image"] * 6e4}  # overflows float16 activations
  before = jax.device_get(state.params)
  scale_before = float(state.loss_scale.scale)
  state, _ = train_step(state, huge)
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))
  assert float(state.loss_scale.scale) < scale_before
  state, _ = train_step(state, _batch(1))  # a normal batch updates again
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(jax.device_get(state.params))))


def test_batch_shape_that_disagrees_with_the_model_is_a_clear_error():
  with pytest.raises(ValueError, match=r"batch image shape \(8, 5, 5, 1\) does not match the model's "
                                       r"input shape \(B, 4, 4, 1\)"):
    train_step(_mlp_state(), _batch(0, shape=(5, 5, 1)))
  with pytest.raises(ValueError, match="labels must be integer class ids"):
    eval_step(_mlp_state(), {**_batch(0), "label": _batch(0)["label"].astype(jnp.float32)})


def test_unknown_precision_string_is_refused_with_the_bad_token():
  with pytest.raises(ValueError, match="bfloat61"):
    _mlp_state(precision="bfloat61")
