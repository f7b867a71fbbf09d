"""The convolution lowering chosen per layer: equal results, the faster of two timings, chosen
once, kept beside the executables, and forced by ORCHARD_JAX_CONV."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax.config import ConfigError
from orchard_jax.models import conv_choice
from orchard_jax.engine import conv_store, executable_key
from orchard_jax.models import layers

KEY = conv_choice.LayerKey("cpu", "cpu", (4, 6, 6, 3), (3, 3, 3, 8), "float32", False, False, True)


class MemoryStore:
  """A table of choices in this process (the engine's is a file beside the executables)."""
  identity = "memory"

  def __init__(self):
    self.table = {}

  def get(self, key):
    return self.table.get(key)

  def put(self, key, lowering):
    return self.table.setdefault(key, lowering)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
  monkeypatch.delenv(conv_choice.ENV, raising=False)
  conv_choice.clear()
  conv_store.attach(None, "")
  conv_choice.set_store(MemoryStore())  # somewhere to keep a choice: a layer is measured
  yield
  conv_choice.clear()
  conv_choice.set_store(None)
  conv_store.attach(None, "")


def _fake_timer(seconds: dict[str, float], calls: list):
  """Seconds per lowering, without running anything; each call is recorded."""
  def timer(programs):
    calls.append(sorted(programs))
    return {name: seconds[name] for name in programs}
  return timer


@pytest.mark.parametrize("shape,features", [((2, 7, 5, 3), 4), ((3, 8, 8, 16), 32), ((2, 2, 2, 64), 128)])
def test_both_lowerings_agree_in_values_and_gradients(shape, features):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], features)) * 0.3
  cotangent = jax.random.normal(jax.random.key(2), shape[:3] + (features,))
  results = {}
  for name, conv in layers.LOWERINGS.items():
    value, grads = jax.jit(jax.value_and_grad(lambda x, k, conv=conv: jnp.vdot(conv(x, k), cotangent),
                                              argnums=(0, 1)))(x, kernel)
    results[name] = (jax.jit(conv)(x, kernel), value, *grads)
  for a, b in zip(results["im2col"], results["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_both_lowerings_agree_vmapped_over_weights_and_inputs():
  xs = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
  kernels = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 8)) * 0.3
  got = {name: jax.jit(jax.vmap(conv))(xs, kernels) for name, conv in layers.LOWERINGS.items()}
  np.testing.assert_allclose(got["im2col"], got["xla"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seconds,expected", [({"im2col": 2.0, "xla": 1.0}, "xla"),
                                              ({"im2col": 1.0, "xla": 0.85}, "xla"),
                                              ({"im2col": 1.0, "xla": 0.9}, "im2col"),
                                              ({"im2col": 1.0, "xla": 2.0}, "im2col"),
                                              ({"im2col": 1.0, "xla": 1.0}, "im2col")])
def test_the_chooser_picks_xla_only_when_it_is_clearly_faster(seconds, expected):
  # XLA's convolution must measure at least 15 % faster than im2col, the rule before
  calls = []
  assert conv_choice.choose(KEY, layers.LOWERINGS, _fake_timer(seconds, calls)) == expected
  assert calls == [["im2col", "xla"]]


def test_a_choice_is_measured_once_per_layer():
  calls = []
  timer = _fake_timer({"im2col": 2.0, "xla": 1.0}, calls)
  other = KEY._replace(input_shape=(8, 6, 6, 3))
  vmapped = KEY._replace(vmapped=True)
  for _ in range(3):
    for key in (KEY, other, vmapped):
      assert conv_choice.choose(key, layers.LOWERINGS, timer) == "xla"
  assert len(calls) == 3
  assert conv_choice.measurements() == {KEY: 1, other: 1, vmapped: 1}


def test_the_default_timer_runs_each_program_and_returns_its_least_time():
  calls = {"a": 0, "b": 0}

  def program(name):
    calls[name] += 1
    return jnp.zeros(())
  times = conv_choice.min_times({"a": lambda: program("a"), "b": lambda: program("b")}, repeats=3)
  assert set(times) == {"a", "b"} and all(0 <= t < 1 for t in times.values())
  assert calls == {"a": 4, "b": 4}  # a warm call and three timed ones


def _conv_params(side=6, channels=3):
  x = jax.random.normal(jax.random.key(0), (2, side, side, channels))
  module = layers.Conv3x3(8)
  return module, jax.jit(module.init, static_argnums=2)(jax.random.key(1), x, False), x


def _traced_lowering(module, params, x, train, wrap=lambda f: f, grad=False):
  def run(p, x):
    if grad:  # a training step: the kernel is differentiated
      return jax.grad(lambda p: module.apply(p, x, train).sum())(p)
    return module.apply(p, x, train)
  jaxpr = str(jax.make_jaxpr(wrap(run))(params, x))
  return "xla" if "conv_general_dilated" in jaxpr else "im2col"


@pytest.mark.parametrize("lowering", ["im2col", "xla"])
def test_forcing_a_lowering_uses_it_in_training_and_evaluation(monkeypatch, lowering):
  monkeypatch.setenv(conv_choice.ENV, lowering)
  module, params, x = _conv_params(side=8)  # 64 pixels: evaluation would be xla in auto
  assert _traced_lowering(module, params, x, True) == lowering
  assert _traced_lowering(module, params, x, False) == lowering
  assert conv_choice.measurements() == {}
  assert conv_choice.key_part() == (lowering, None)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layer is measured on XLA:CPU")
@pytest.mark.parametrize("faster", ["im2col", "xla"])
def test_a_layer_in_training_uses_the_lowering_measured_faster(monkeypatch, faster):
  slower = "xla" if faster == "im2col" else "im2col"
  calls = []
  timer = _fake_timer({faster: 1.0, slower: 2.0}, calls)
  monkeypatch.setattr(conv_choice, "min_times", timer)
  module, params, x = _conv_params()
  assert _traced_lowering(module, params, x, True, grad=True) == faster
  assert _traced_lowering(module, params, x, True, grad=True) == faster
  cohort = jax.tree.map(lambda p: jnp.stack([p, p]), params)
  vmap = lambda f: jax.vmap(f, in_axes=(0, None))  # noqa: E731
  assert _traced_lowering(module, cohort, x, True, vmap, grad=True) == faster
  keys = list(conv_choice.measurements())
  assert [(k.vmapped, k.input_gradient) for k in keys] == [(False, False), (True, False)]
  assert len(calls) == 2  # once per layer: solo and vmapped
  # a training-mode pass without a gradient (a program's inspection) keeps im2col, unmeasured
  assert _traced_lowering(module, params, x, True) == "im2col" and len(calls) == 2


def test_a_layer_knows_when_its_weights_and_inputs_are_vmapped_and_differentiated():
  seen = []

  def layer(x, k):
    seen.append((conv_choice.vmapped(k), conv_choice.vmapped(x), conv_choice.differentiated(x)))
    return (x @ k).sum()
  x, k = jnp.ones((4, 3)), jnp.ones((3, 2))
  jax.jit(jax.grad(layer, argnums=1))(x, k)
  jax.jit(jax.vmap(jax.grad(layer, argnums=(0, 1)), in_axes=(None, 0)))(x, jnp.stack([k, k]))
  jax.jit(jax.vmap(jax.grad(layer, argnums=1)))(jnp.stack([x, x]), jnp.stack([k, k]))
  assert seen == [(False, False, False), (True, False, True), (True, True, False)]


def test_a_bad_setting_is_one_line_naming_it(monkeypatch):
  module, params, x = _conv_params()
  monkeypatch.setenv(conv_choice.ENV, "cudnn")
  expected = "ORCHARD_JAX_CONV must be 'auto', 'im2col' or 'xla', got 'cudnn'"
  with pytest.raises(ConfigError) as raised:  # traced: JAX adds a note of its own
    module.apply(params, x, True)
  assert str(raised.value) == expected
  with pytest.raises(ConfigError) as raised:
    executable_key.environment()
  assert str(raised.value) == expected


def test_choices_are_kept_beside_the_executables_and_read_by_a_later_process(tmp_path):
  calls = []
  conv_store.attach(tmp_path, "cpu-a")
  identity = conv_choice.key_part()
  assert identity[0] == "auto" and identity[1]
  assert conv_choice.choose(KEY, layers.LOWERINGS, _fake_timer({"im2col": 2.0, "xla": 1.0}, calls)) == "xla"
  conv_choice.clear()  # a later process: the table is read, nothing measured
  conv_store.attach(None, "")
  conv_store.attach(tmp_path, "cpu-a")
  assert conv_choice.key_part() == identity
  assert conv_choice.choose(KEY, layers.LOWERINGS, _fake_timer({"im2col": 1.0, "xla": 2.0}, calls)) == "xla"
  assert len(calls) == 1
  conv_choice.clear()  # another CPU sharing the folder measures its own
  conv_store.attach(tmp_path, "cpu-b")
  assert conv_choice.choose(KEY, layers.LOWERINGS, _fake_timer({"im2col": 1.0, "xla": 2.0}, calls)) == "im2col"
  table = json.loads((tmp_path / conv_store.FILE).read_text())
  assert table["id"] == identity[1] and sorted(table["choices"].values()) == ["im2col", "xla"]


def test_the_first_choice_written_wins_over_a_later_measurement(tmp_path):
  first, second = conv_store.FileStore(tmp_path, "cpu"), conv_store.FileStore(tmp_path, "cpu")
  assert first.identity == second.identity
  assert first.put(KEY, "xla") == "xla"
  assert second.put(KEY, "im2col") == "xla"  # measured at the same time: the written one is used
  conv_choice.set_store(second)
  assert conv_choice.choose(KEY, layers.LOWERINGS, _fake_timer({"im2col": 1.0, "xla": 2.0}, [])) == "xla"


def test_a_damaged_table_is_one_warning_and_a_new_table(tmp_path, caplog):
  (tmp_path / conv_store.FILE).write_text("{not json")
  with caplog.at_level(logging.WARNING):
    store = conv_store.FileStore(tmp_path, "cpu")
  assert "measuring convolutions again" in caplog.text
  assert json.loads((tmp_path / conv_store.FILE).read_text()) == {"id": store.identity, "choices": {}}


def test_the_executable_key_changes_with_the_setting_and_the_table(monkeypatch, tmp_path):
  from orchard_jax.engine import executables  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(executables, "_dir", tmp_path / "a")
  auto_a = executable_key.environment()
  monkeypatch.setattr(executables, "_dir", tmp_path / "b")
  auto_b = executable_key.environment()
  monkeypatch.setenv(conv_choice.ENV, "im2col")
  forced = executable_key.environment()
  monkeypatch.setenv(conv_choice.ENV, "xla")
  assert len({auto_a, auto_b, forced, executable_key.environment()}) == 4
  assert (tmp_path / "a" / conv_store.FILE).exists()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layer is measured on XLA:CPU")
def test_without_a_table_to_keep_it_a_layer_is_not_measured_and_uses_im2col(monkeypatch):
  # No executables cache: a measurement would be paid again by every process (a cold first
  # trial 1.4x slower), so the rule before is used.
  conv_choice.set_store(None)
  calls = []
  monkeypatch.setattr(conv_choice, "min_times", _fake_timer({"im2col": 2.0, "xla": 1.0}, calls))
  module, params, x = _conv_params()
  assert _traced_lowering(module, params, x, True, grad=True) == "im2col"
  assert calls == [] and conv_choice.measurements() == {}


def test_the_rule_used_without_a_table_is_no_choice_for_a_table_attached_later():
  conv_choice.set_store(None)
  calls = []
  timer = _fake_timer({"im2col": 2.0, "xla": 1.0}, calls)
  assert conv_choice.choose(KEY, layers.LOWERINGS, timer) == "im2col" and calls == []
  store = MemoryStore()
  conv_choice.set_store(store)
  assert store.table == {}  # the unmeasured rule was not offered to it
  assert conv_choice.choose(KEY, layers.LOWERINGS, timer) == "xla" and len(calls) == 1
