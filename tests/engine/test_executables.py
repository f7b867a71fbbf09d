"""Compiled steps are reused in-process, and across processes through the executable cache."""

import json
import logging
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax import MLP, create_train_state, evaluate, fileio, train_epoch
from orchard_jax.engine import executable_key, executables
from orchard_jax.models import as_model

ROOT = pathlib.Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from orchard_jax import MLP, create_train_state, evaluate, fileio, train_epoch
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


def _run_child(cache_dir, jax_cache_dir=None, prelude=""):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  extra = [] if jax_cache_dir is None else [str(jax_cache_dir)]
  return subprocess.run([sys.executable, "-c", prelude + CHILD, str(cache_dir), *extra],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _child(cache_dir, jax_cache_dir=None):
  """The child's RESULT, with its stderr under "stderr"."""
  out = _run_child(cache_dir, jax_cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
  return {**json.loads(line[len("RESULT"):]), "stderr": out.stderr}


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
  assert executable_key.portable(as_model(MLP(num_classes=3)))
  assert not executable_key.portable(as_model(_UserModule()))
  assert executable_key.plain((1, 2.0, "a", None, np.dtype("float32"), jnp.float32, nn.relu))
  assert not executable_key.plain(_user_activation)
  assert not executable_key.plain(object())


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
  loaders = [t for t in threading.enumerate() if t.name == "orchard_jax-load"]
  # the loader never holds up the process's exit (the interpreter joins non-daemon threads)
  assert len(loaders) == 1 and loaders[0].daemon, loaders


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


# ------------------------------------------------------------ damaged and torn files --


def _flip_machine_code(path, count=16):
  """Flips ``count`` bytes at the start of the largest code section (``.text``/``.ltext``) of
  the ELF objects inside a cached executable, in place: the file's container (header, pickle)
  stays intact, as after a flipped disk block. Returns the offset."""
  data = bytearray(path.read_bytes())
  best, start = None, 0
  while (elf := data.find(b"\x7fELF", start)) >= 0:
    start = elf + 4
    header = bytes(data[elf:])
    table = struct.unpack_from("<Q", header, 0x28)[0]
    entry, count_sections, names = struct.unpack_from("<HHH", header, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", header, table + k * entry)
                for k in range(count_sections)]
    strings = sections[names][4]
    for name, _, _, _, offset, size in sections:
      label = header[strings + name:header.index(b"\0", strings + name)]
      if label in (b".text", b".ltext") and (best is None or size > best[1]):
        best = (elf + offset, size)
  assert best is not None and best[1] > 2 * count, "no code section found"
  start = best[0]  # the entry of the largest function: run whenever the program runs
  data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
  path.write_bytes(bytes(data))
  return start


# The loader of FORMAT 1, without the check: strips the header and hands the bytes to XLA.
UNCHECKED = (
    "from orchard_jax.engine import executables\n"
    "executables._unseal = lambda data: data[len(executables._MAGIC) + executables._DIGEST:]\n")


def test_a_damaged_executable_is_one_warning_a_compile_and_a_rewrite_never_a_crash(tmp_path):
  first = _child(tmp_path)
  (path,) = tmp_path.glob("train_step-*.exe")
  _flip_machine_code(path)

  unchecked = _run_child(tmp_path, prelude=UNCHECKED)  # the damage is real: it kills a process
  assert unchecked.returncode < 0, (unchecked.stdout[:300], unchecked.stderr[-2000:])

  second = _child(tmp_path)
  warnings = [l for l in second["stderr"].splitlines() if "cannot load" in l]
  assert len(warnings) == 1 and str(path) in warnings[0], second["stderr"][-3000:]
  assert "it is damaged" in warnings[0] and "SHA-256" in warnings[0]
  assert second["stats"]["train_step"] == {"compiled": 1, "loaded": 0, "saved": 1, "ahead": 0}
  assert second["params"] == first["params"] and second["loss"] == first["loss"]
  executables._unseal(path.read_bytes())  # rewritten whole

  third = _child(tmp_path)
  assert "cannot load" not in third["stderr"] and "damaged" not in third["stderr"]
  assert third["stats"]["train_step"] == {"compiled": 0, "loaded": 1, "saved": 0, "ahead": 1}
  assert third["params"] == first["params"]


@pytest.mark.parametrize("keep, why", [(20, "no checksum"), (None, "do not match their SHA-256")])
def test_a_torn_executable_is_reported_compiled_and_rewritten(cache, caplog, keep, why):
  make = lambda: create_train_state(MLP(num_classes=3, hidden=(3,)), input_shape=(5, 5, 1),
                                    num_classes=3)
  want, _ = train_epoch(make(), _data(), layout="NHWC")
  want = jax.device_get(want.params)
  (path,) = cache.glob("train_step-*.exe")
  whole = path.read_bytes()
  path.write_bytes(whole[:len(whole) // 2 if keep is None else keep])
  executables.clear()
  with caplog.at_level(logging.WARNING, logger="orchard_jax.engine.executables"):
    got, _ = train_epoch(make(), _data(), layout="NHWC")
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert str(path) in warning and why in warning
  assert executables.stats("train_step") == {"compiled": 1, "loaded": 0, "saved": 1, "ahead": 0}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params), want)
  assert len(executables._unseal(path.read_bytes())) == len(whole) - len(executables._MAGIC) - 32


# ------------------------------------------------------------------ temporary files --


def test_a_failed_write_leaves_no_temporary_file(tmpfs, disk_filler, caplog):
  folder = tmpfs("1m")
  disk_filler(folder, leave=16384)  # room for the successor lists, not for an executable
  executables.clear()
  executables.set_cache_dir(folder)
  try:
    with caplog.at_level(logging.WARNING, logger="orchard_jax.engine.executables"):
      state = create_train_state(MLP(num_classes=3, hidden=(5,)), input_shape=(5, 5, 1),
                                 num_classes=3)
      train_epoch(state, _data(), layout="NHWC")
    assert executables.stats()["saved"] == 0
  finally:
    executables.set_cache_dir(None)
    executables.clear()
  assert "cannot write cached executable" in caplog.text and "No space left" in caplog.text
  assert [p.name for p in folder.iterdir() if "tmp" in p.name] == []
  assert not list(folder.glob("*.exe"))


def test_temporaries_of_killed_writers_are_swept_when_the_cache_opens(cache):
  old = time.time() - 2 * fileio.STALE_AFTER_S
  legacy = cache / ".tmp-k2j4x9a1"  # what a writer before the checksum left
  killed = cache / ".train_step-0.exe.tmp-999999-0badf00d"
  young = cache / ".train_step-1.exe.tmp-999998-0badf00d"  # a writer may not have locked it yet
  for path in (legacy, killed, young):
    path.write_bytes(b"partial")
  for path in (legacy, killed):
    os.utime(path, (old, old))
  state = create_train_state(MLP(num_classes=3, hidden=(2,)), input_shape=(5, 5, 1),
                             num_classes=3)
  train_epoch(state, _data(), layout="NHWC")
  assert sorted(p.name for p in cache.iterdir() if "tmp" in p.name) == [young.name]
