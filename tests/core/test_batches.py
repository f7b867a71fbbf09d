"""IndexedBatch: a row of a chunk of device-resident images, gathered inside the steps."""

import jax
import jax.numpy as jnp
import numpy as np

from orchard_jax import MLP, create_train_state, eval_step, train_step
from orchard_jax.core.batches import IndexedBatch, materialize

N, K, B, C = 11, 3, 4, 3


def _chunk(seed=0):
  """A chunk of K batches of B rows over N images; the last batch has 2 real rows."""
  rng = np.random.default_rng(seed)
  images = np.concatenate([rng.normal(size=(N, 4, 4, 1)).astype(np.float32),
                           np.zeros((1, 4, 4, 1), np.float32)])  # row N: the zero row
  index = rng.integers(0, N, (K, B)).astype(np.int32)
  index[-1, 2:] = N
  label = rng.integers(0, C, (K, B)).astype(np.int32)
  label[-1, 2:] = 0
  count = np.array([B, B, 2], np.int32)
  return images, index, label, count


def _indexed(images, index, label, count, row):
  return IndexedBatch(*(jnp.asarray(a) for a in (images, index, label, count)), jnp.int32(row))


def test_materialize_gathers_the_rows_and_masks_padding():
  images, index, label, count = _chunk()
  for row in range(K):
    got = jax.device_get(jax.jit(materialize)(_indexed(images, index, label, count, row)))
    np.testing.assert_array_equal(got["image"], images[index[row]])
    np.testing.assert_array_equal(got["label"], label[row])
    np.testing.assert_array_equal(got["mask"], np.arange(B) < count[row])
  assert not got["image"][2:].any()  # padding rows are the zero row


def test_materialize_returns_a_dict_batch_unchanged():
  batch = {"image": jnp.zeros((B, 4, 4, 1)), "label": jnp.zeros(B, jnp.int32),
           "mask": jnp.ones(B, bool)}
  assert materialize(batch) is batch


def _dict(images, index, label, count, row):
  return {"image": jnp.asarray(images[index[row]]), "label": jnp.asarray(label[row]),
          "mask": jnp.arange(B) < count[row]}


def test_steps_on_an_indexed_batch_equal_the_steps_on_its_dict():
  # The step gathers before anything else, so the model does not matter: a small MLP.
  chunk = _chunk(1)
  make = lambda: create_train_state(MLP(num_classes=C, hidden=(8,)), input_shape=(4, 4, 1),
                                    num_classes=C, mixup_alpha=0.3)
  a, b = make(), make()
  for row in range(K):  # the padded last batch included
    a, ma = train_step(a, _indexed(*chunk, row))
    b, mb = train_step(b, _dict(*chunk, row))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ma), jax.device_get(mb))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))
  out_a = jax.device_get(eval_step(a, _indexed(*chunk, 2)))
  out_b = jax.device_get(eval_step(b, _dict(*chunk, 2)))
  assert out_a.keys() == out_b.keys()
  for key in out_a:
    np.testing.assert_array_equal(out_a[key], out_b[key], err_msg=key)


def test_eval_step_returns_the_batch_labels_and_mask():
  chunk = _chunk(2)
  state = create_train_state(MLP(num_classes=C, hidden=(8,)), input_shape=(4, 4, 1), num_classes=C)
  out = jax.device_get(eval_step(state, _indexed(*chunk, 2)))
  np.testing.assert_array_equal(out["label"], chunk[2][2])
  np.testing.assert_array_equal(out["mask"], [True, True, False, False])
  assert out["label"].dtype == np.int32


def test_one_train_step_program_serves_every_row_of_every_chunk():
  state = create_train_state(MLP(num_classes=C, hidden=(5,)), input_shape=(4, 4, 1), num_classes=C)
  before = train_step._cache_size()
  for seed in range(2):
    chunk = _chunk(seed)
    for row in range(K):
      state, _ = train_step(state, _indexed(*chunk, row))
  assert train_step._cache_size() == before + 1

