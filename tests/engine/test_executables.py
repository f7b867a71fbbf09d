"""Compiled steps are reused in-process, and across processes through the executable cache."""

import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax import MLP, create_train_state, evaluate, train_epoch
from orchard_jax.engine import executables
from orchard_jax.models import as_model

ROOT = pathlib.Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from orchard_jax import MLP, create_train_state, evaluate, train_epoch
    from orchard_jax.engine import executables
    executables.set_cache_dir(None if sys.argv[1] == "-" else sys.argv[1])
    if len(sys.argv) > 2:  # JAX's own persistent cache too
      jax.config.update("jax_compilation_cache_dir", sys.argv[2])
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 40, 16)]
    state = create_train_state(MLP(num_classes=3, hidden=(9,)), input_shape=(6, 6, 1), num_classes=3,
                               mixup_alpha=0.2)
    state, loss = train_epoch(state, loader, layout="NHWC")
    metrics = evaluate(state, loader, layout="NHWC")
    params = [np.asarray(p).tolist() for p in jax.tree.leaves(state.params)]
    print("RESULT" + json.dumps({"stats": {n: executables.stats(n) for n in
                                           ("init", "train_step", "eval_step")},
                                 "loss": loss, "metrics": metrics, "params": params}))
""")


def _child(cache_dir, jax_cache_dir=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  extra = [] if jax_cache_dir is None else [str(jax_cache_dir)]
  out = subprocess.run([sys.executable, "-c", CHILD, str(cache_dir), *extra], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_a_second_process_loads_every_step_without_compiling_and_trains_identically(tmp_path):
  first, second = _child(tmp_path), _child(tmp_path)
  for name in ("init", "train_step", "eval_step"):
    assert first["stats"][name] == {"compiled": 1, "loaded": 0, "saved": 1, "ahead": 0}, name
    # The steps followed the state build in the first process: the second loads them
    # in the background as soon as it asks for the build.
    ahead = int(name != "init")
    assert second["stats"][name] == {"compiled": 0, "loaded": 1, "saved": 0, "ahead": ahead}, name
  assert len(list(tmp_path.glob("*.exe"))) == 3
  assert second["loss"] == first["loss"]
  assert second["metrics"] == first["metrics"]
  assert second["params"] == first["params"]


def test_steps_found_in_jax_persistent_cache_are_used_but_not_written(tmp_path):
  # An executable that XLA:CPU read from JAX's cache serializes without its kernels.
  exe, jax_cache = tmp_path / "exe", tmp_path / "jax"
  first = _child("-", jax_cache)  # JAX's cache only: it stores every step
  second = _child(exe, jax_cache)
  third = _child(exe, jax_cache)
  for run in (second, third):
    assert run["stats"]["train_step"] == {"compiled": 1, "loaded": 0, "saved": 0, "ahead": 0}
    assert run["params"] == first["params"]
  assert not list(exe.glob("*.exe"))


def test_steps_written_to_disk_are_kept_out_of_jax_persistent_cache(tmp_path):
  exe, jax_cache = tmp_path / "exe", tmp_path / "jax"
  _child(exe, jax_cache)
  for path in exe.glob("*.exe"):
    path.unlink()
  second = _child(exe, jax_cache)  # JAX's cache must not serve (unwritable) copies
  assert second["stats"]["train_step"] == {"compiled": 1, "loaded": 0, "saved": 1, "ahead": 0}
  third = _child(exe, jax_cache)
  assert third["stats"]["train_step"] == {"compiled": 0, "loaded": 1, "saved": 0, "ahead": 1}


def _data(n=24, side=5, classes=3):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(n, side, side, 1)).astype(np.float32)
  y = rng.integers(0, classes, n)
  return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


@pytest.fixture
def cache(tmp_path):
  executables.clear()
  executables.set_cache_dir(tmp_path)
  yield tmp_path
  executables.set_cache_dir(None)
  executables.clear()


def test_structures_that_differ_get_their_own_files(cache):
  for classes in (3, 4):
    state = create_train_state(MLP(num_classes=classes, hidden=(5,)), input_shape=(5, 5, 1),
                               num_classes=classes)
    train_epoch(state, _data(classes=classes), layout="NHWC")
  assert len(list(cache.glob("train_step-*.exe"))) == 2
  assert executables.stats("train_step") == {"compiled": 2, "loaded": 0, "saved": 2, "ahead": 0}


class _UserModule(nn.Module):  # code outside orchard_jax: not fingerprinted
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_a_model_whose_code_is_not_fingerprinted_is_not_written(cache):
  state = create_train_state(_UserModule(), input_shape=(5, 5, 1), num_classes=3)
  train_epoch(state, _data(), layout="NHWC")
  assert executables.stats("train_step") == {"compiled": 1, "loaded": 0, "saved": 0, "ahead": 0}
  assert list(cache.iterdir()) == []


def _user_activation(x):
  return jnp.maximum(x, 0.0)


def test_portability_needs_orchard_code_and_plain_attributes():
  assert executables._portable(as_model(MLP(num_classes=3)))
  assert not executables._portable(as_model(_UserModule()))
  assert executables._plain((1, 2.0, "a", None, np.dtype("float32"), jnp.float32, nn.relu))
  assert not executables._plain(_user_activation)
  assert not executables._plain(object())


def test_an_unreadable_file_is_reported_and_the_step_compiled_again(cache, caplog):
  state = create_train_state(MLP(num_classes=3, hidden=(6,)), input_shape=(5, 5, 1),
                             num_classes=3)
  want, _ = train_epoch(state, _data(), layout="NHWC")
  want = jax.device_get(want.params)
  (path,) = cache.glob("train_step-*.exe")
  path.write_bytes(b"not an executable")
  executables.clear()  # a new process, as far as the cache can tell
  state = create_train_state(MLP(num_classes=3, hidden=(6,)), input_shape=(5, 5, 1),
                             num_classes=3)
  with caplog.at_level(logging.WARNING, logger="orchard_jax.engine.executables"):
    got, _ = train_epoch(state, _data(), layout="NHWC")
  assert "cannot load cached executable" in caplog.text and str(path) in caplog.text
  assert executables.stats("train_step")["compiled"] == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params), want)


def test_loaded_steps_donate_the_state_like_jitted_ones(cache):
  state = create_train_state(MLP(num_classes=3, hidden=(7,)), input_shape=(5, 5, 1),
                             num_classes=3)
  train_epoch(state, _data(), layout="NHWC")  # writes the file
  executables.clear()
  state = create_train_state(MLP(num_classes=3, hidden=(7,)), input_shape=(5, 5, 1),
                             num_classes=3)
  old = jax.tree.leaves(state.params)[0]
  state, _ = train_epoch(state, _data(), layout="NHWC")
  assert executables.stats("train_step")["loaded"] == 1
  assert old.is_deleted()
  assert np.isfinite(evaluate(state, _data(), layout="NHWC")["loss"])


def test_programs_that_followed_each_other_are_loaded_ahead_in_order(cache):
  make = lambda: create_train_state(MLP(num_classes=3, hidden=(8,)), input_shape=(5, 5, 1),
                                    num_classes=3)
  state, _ = train_epoch(make(), _data(), layout="NHWC")
  want = evaluate(state, _data(), layout="NHWC")
  (init,) = cache.glob("init-*.exe")
  (train,) = cache.glob("train_step-*.exe")
  (evaluation,) = cache.glob("eval_step-*.exe")
  assert (cache / (init.name + ".next")).read_text().split() == [train.name]
  assert (cache / (train.name + ".next")).read_text().split() == [evaluation.name]
  executables.clear()  # a new process, as far as the cache can tell
  state = make()  # asks for the build: the training step starts loading, then evaluation's
  assert {p.name for p in executables._ahead} <= {train.name, evaluation.name}
  state, _ = train_epoch(state, _data(), layout="NHWC")
  assert evaluate(state, _data(), layout="NHWC") == want
  assert {n: executables.stats(n)["ahead"] for n in ("init", "train_step", "eval_step")} == {
      "init": 0, "train_step": 1, "eval_step": 1}
  assert not executables._ahead  # nothing left waiting
  assert (cache / (init.name + ".next")).read_text().split() == [train.name]  # not rewritten


def test_a_successor_list_naming_missing_or_foreign_files_is_ignored(cache):
  make = lambda: create_train_state(MLP(num_classes=3, hidden=(4,)), input_shape=(5, 5, 1),
                                    num_classes=3)
  train_epoch(make(), _data(), layout="NHWC")
  (init,) = cache.glob("init-*.exe")
  (train,) = cache.glob("train_step-*.exe")
  (cache / (init.name + ".next")).write_text(f"gone-0.exe\n../escape.exe\nnotes.txt\n{train.name}\n")
  executables.clear()
  state, _ = train_epoch(make(), _data(), layout="NHWC")
  assert executables.stats("train_step") == {"compiled": 0, "loaded": 1, "saved": 0, "ahead": 1}
  assert executables.stats("init")["loaded"] == 1
