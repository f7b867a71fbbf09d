"""One compile per step: each input path compiles ``train_step`` and ``eval_step`` once.

Compiles are counted with JAX's own event (``/jax/core/compile/backend_compile_duration``,
one per XLA compile, named by its ``fun_name``), never with orchard_jax's executable
counter, which keys on a program's signature and did not see that ``jax.jit`` compiled the
same step again for arguments that differed only in being committed to a device.

Every test uses a model structure (an MLP width) that no other test compiles, so no cache
filled by another test hides a compile, and clears orchard_jax's executable cache.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest
import torch

from orchard_jax import MLP, create_train_state, evaluate, train_epoch
from orchard_jax.config import OptunaConfig, TrainingConfig, TrialConfig
from orchard_jax.engine import executables
from orchard_jax.data import make_loader
from orchard_jax.engine import run_trial

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
STEPS = ("jit(_train_step)", "jit(_eval_step)")
CLASSES = 3


@pytest.fixture
def compiles(xla_compiles):
  """The XLA compiles of the test, by function name (a Counter), from JAX's own events."""
  executables.clear()
  with xla_compiles() as seen:
    yield seen.by_name


def steps(counts: collections.Counter) -> dict[str, int]:
  return {name: counts[name] for name in STEPS}


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``n`` NCHW images [n, 1, 6, 6]; class c brightens row c (easy to learn)."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % CLASSES
  x = rng.normal(0.0, 0.5, (n, 1, 6, 6)).astype(np.float32)
  x[np.arange(n), 0, y, :] += 1.5
  return x, y.astype(np.int64)


class Pairs(torch.utils.data.Dataset):
  """A map-style Dataset that is not a TensorDataset: read sample by sample."""

  def __init__(self, x: np.ndarray, y: np.ndarray):
    self.x, self.y = x, y

  def __len__(self) -> int:
    return len(self.y)

  def __getitem__(self, i: int):
    return torch.from_numpy(self.x[i]), int(self.y[i])


def tensor_loaders(n: int = 72):  # 72 = 4 * 16 + 8: a padded last batch
  x, y = data(n)
  dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
  return make_loader(dataset, 16, shuffle=True), make_loader(dataset, 16, shuffle=False)


def dataset_loaders(n: int = 72):
  dataset = Pairs(*data(n))
  return make_loader(dataset, 16, shuffle=True), make_loader(dataset, 16, shuffle=False)


def numpy_loaders(n: int = 72):
  x, y = data(n)
  pairs = [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
  return pairs, pairs


def trial_config(hidden: int, loaders, **training) -> TrialConfig:
  train, val = loaders
  return TrialConfig(
      model=MLP(num_classes=CLASSES, hidden=(hidden,)), train_loader=train, val_loader=val,
      num_classes=CLASSES,
      training=TrainingConfig(**{"batch_size": 16, "use_amp": False, "use_tqdm": False,
                                 "learning_rate": 0.05, "mixup_alpha": 0.0, "mixup_epochs": 0,
                                 "scheduler_type": "cosine", "epochs": 2, **training}),
      optuna=OptunaConfig(epochs=2, enable_pruning=False, pruner_type="none", storage="memory"))


def run_one_trial(cfg: TrialConfig) -> float:
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(direction="maximize")
  study.optimize(lambda trial: run_trial(trial, cfg), n_trials=1)
  assert study.trials[0].state == optuna.trial.TrialState.COMPLETE, study.trials[0].user_attrs
  return study.trials[0].value


# Each case: (input path, a width no other test uses, its loaders).
PATHS = [("resident TensorDataset", 29, tensor_loaders),
         ("generic Dataset", 31, dataset_loaders),
         ("list of numpy arrays", 37, numpy_loaders)]


@pytest.mark.parametrize("name, hidden, loaders", PATHS, ids=[p[0] for p in PATHS])
def test_two_epochs_of_run_trial_compile_each_step_once(compiles, name, hidden, loaders):
  value = run_one_trial(trial_config(hidden, loaders()))
  assert steps(compiles) == {"jit(_train_step)": 1, "jit(_eval_step)": 1}, (name, compiles)
  assert 0.0 <= value <= 1.0


def test_mixup_switched_off_after_its_epochs_compiles_nothing_more(compiles):
  cfg = trial_config(41, tensor_loaders(), mixup_alpha=0.4, mixup_epochs=1)
  run_one_trial(cfg)  # epoch 2 switches MixUp off: a new switch written into the state
  assert steps(compiles) == {"jit(_train_step)": 1, "jit(_eval_step)": 1}, compiles


@pytest.mark.parametrize("name, hidden, loaders", [
    ("resident TensorDataset", 43, tensor_loaders), ("generic Dataset", 47, dataset_loaders),
    ("list of numpy arrays", 53, numpy_loaders)], ids=lambda v: v if isinstance(v, str) else "")
def test_train_epoch_and_evaluate_compile_once_and_a_second_epoch_compiles_nothing(
    compiles, name, hidden, loaders):
  train, val = loaders()
  state = create_train_state(MLP(num_classes=CLASSES, hidden=(hidden,)), input_shape=(6, 6, 1),
                             num_classes=CLASSES, learning_rate=0.1)
  state, _ = train_epoch(state, train, epoch=1)
  evaluate(state, val, epoch=1)
  first = dict(compiles)
  assert steps(compiles) == {"jit(_train_step)": 1, "jit(_eval_step)": 1}, (name, first)
  state = state.with_learning_rate(0.05)  # a new scalar each epoch, as the loop writes it
  state, _ = train_epoch(state, train, epoch=2)
  evaluate(state, val, epoch=2)
  assert dict(compiles) == first, (name, "epoch 2 compiled", compiles - collections.Counter(first))


def test_a_state_with_arrays_a_user_wrote_into_it_compiles_each_step_once(compiles):
  train, val = numpy_loaders()
  state = create_train_state(MLP(num_classes=CLASSES, hidden=(59,)), input_shape=(6, 6, 1),
                             num_classes=CLASSES)
  # E.g. pretrained weights: arrays that jnp made, not committed to a device.
  params = jax.tree.map(lambda p: jnp.asarray(np.asarray(p)), state.params)
  assert not any(p.committed for p in jax.tree.leaves(params))
  state = state.replace(params=params)
  evaluate(state, val)
  state, _ = train_epoch(state, train, epoch=1)
  state, _ = train_epoch(state.with_learning_rate(0.01), train, epoch=2)
  evaluate(state, val)
  assert steps(compiles) == {"jit(_train_step)": 1, "jit(_eval_step)": 1}, compiles


@pytest.mark.parametrize("name, hidden, loaders", [
    ("resident TensorDataset", 67, tensor_loaders), ("generic Dataset", 71, dataset_loaders),
    ("list of numpy arrays", 73, numpy_loaders)], ids=lambda v: v if isinstance(v, str) else "")
def test_an_own_loop_over_the_jitted_steps_compiles_each_once(compiles, name, hidden, loaders):
  # No train_epoch between the state and the step: the state, the batches and the epoch's
  # scalars must agree on their placement by themselves.
  from orchard_jax.core.steps import eval_step, train_step
  from orchard_jax.data import device_batches

  train, val = loaders()
  state = create_train_state(MLP(num_classes=CLASSES, hidden=(hidden,)), input_shape=(6, 6, 1),
                             num_classes=CLASSES, mixup_alpha=0.3)
  for epoch, lr in ((1, 0.1), (2, 0.05)):
    state = state.with_learning_rate(lr).with_mixup(epoch == 1)
    for batch in device_batches(train, num_classes=CLASSES, epoch=epoch):
      state, _ = train_step(state, batch)
    for batch in device_batches(val, num_classes=CLASSES, epoch=epoch):
      eval_step(state, batch)
  assert steps(compiles) == {"jit(_train_step)": 1, "jit(_eval_step)": 1}, (name, compiles)


def test_the_state_and_the_epoch_scalars_are_committed_to_the_state_device():
  state = create_train_state(MLP(num_classes=CLASSES, hidden=(4,)), input_shape=(6, 6, 1),
                             num_classes=CLASSES, mixup_alpha=0.2)
  assert all(leaf.committed for leaf in jax.tree.leaves(state))
  later = state.with_learning_rate(0.25).with_mixup(False)
  assert later.learning_rate.committed and later.hparams.mixup_on.committed
  assert later.learning_rate.sharding == state.learning_rate.sharding
  assert float(later.learning_rate) == 0.25 and not bool(later.hparams.mixup_on)
  assert later.learning_rate.dtype == jnp.float32 and later.hparams.mixup_on.dtype == jnp.bool_


MESH_SCRIPT = textwrap.dedent(r'''
  import collections, json
  import jax, numpy as np, torch
  from orchard_jax import MLP, create_train_state, evaluate, train_epoch
  from orchard_jax.config import TrainingConfig, TrialConfig
  from orchard_jax.core.sharding import data_mesh, replicate_state
  from orchard_jax.data import make_loader
  from orchard_jax.engine import fit

  counts = collections.Counter()
  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      counts[kwargs.get("fun_name")] += 1
  jax.monitoring.register_event_duration_secs_listener(listener)
  steps = lambda: {k: counts[k] for k in ("jit(_train_step)", "jit(_eval_step)")}
  assert len(jax.devices()) == 4, jax.devices()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(72, 1, 6, 6)).astype(np.float32)
  y = rng.integers(0, 3, 72)
  dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
  loader = make_loader(dataset, 16, shuffle=True)
  out = {}

  # A state replicated over a mesh of 4: batches split over it.
  state = replicate_state(create_train_state(MLP(num_classes=3, hidden=(61,)), input_shape=(6, 6, 1),
                                             num_classes=3, mixup_alpha=0.3), data_mesh())
  placed = state.with_learning_rate(0.5).with_mixup(False)
  out["scalars_replicated"] = [a.committed and a.sharding == state.step.sharding
                               for a in (placed.learning_rate, placed.hparams.mixup_on)]
  out["per_epoch"] = []
  for epoch, lr in ((1, 0.1), (2, 0.05)):
    state = state.with_learning_rate(lr).with_mixup(epoch == 1)
    state, loss = train_epoch(state, loader, epoch=epoch)
    evaluate(state, loader, epoch=epoch)
    out["per_epoch"].append(steps())

  # A run on one device that is not the default one: the state and its batches go there, and
  # no step moves an argument between devices (the transfer guard would raise). Through the
  # resident TensorDataset path and the prefetch thread's (a Dataset read sample by sample).
  class Pairs(torch.utils.data.Dataset):
    def __len__(self):
      return len(y)
    def __getitem__(self, i):
      return torch.from_numpy(x[i]), int(y[i])

  out["one_device"] = {}
  for name, hidden, data in (("resident", 63, dataset), ("thread", 65, Pairs())):
    counts.clear()
    cfg = TrialConfig(model=MLP(num_classes=3, hidden=(hidden,)),
                      train_loader=make_loader(data, 16, shuffle=True),
                      val_loader=make_loader(data, 16, shuffle=False), num_classes=3, devices=(2,),
                      training=TrainingConfig(batch_size=16, use_amp=False, use_tqdm=False,
                                              mixup_alpha=0.0, scheduler_type="cosine", epochs=2),
                      log_interval=1)
    with jax.transfer_guard_device_to_device("disallow"):
      result = fit(cfg)
    out["one_device"][name] = {"devices": sorted({d.id for leaf in jax.tree.leaves(result.state)
                                                  for d in leaf.devices()}),
                               "best": result.best, "steps": steps()}
  print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def on_four_devices() -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])


def test_a_data_parallel_state_compiles_each_step_once_over_two_epochs(on_four_devices):
  one = {"jit(_train_step)": 1, "jit(_eval_step)": 1}
  assert on_four_devices["per_epoch"] == [one, one], on_four_devices
  assert on_four_devices["scalars_replicated"] == [True, True]  # as the fields they replace


def test_a_run_on_a_device_that_is_not_the_default_trains_there(on_four_devices):
  # Devices=(2,): before, the state stayed on device 0 and batches crossed over at each step.
  for path, one in on_four_devices["one_device"].items():
    assert one["devices"] == [2], (path, one)  # before: device 0, whatever devices said
    assert one["steps"] == {"jit(_train_step)": 1, "jit(_eval_step)": 1}, (path, one)
    assert 0.0 <= one["best"] <= 1.0
