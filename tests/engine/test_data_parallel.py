"""Data-parallel trials on 4 forced host devices (run in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
  import json
  import jax, numpy as np, torch
  from torch.utils.data import DataLoader, TensorDataset
  from orchard_jax import MiniCNN, TrainingConfig, TrialConfig, OptunaConfig, create_train_state, evaluate, fit, train_epoch
  from orchard_jax.core.sharding import batch_sharding, data_mesh, replicate_state

  assert len(jax.devices()) == 4, jax.devices()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(70, 1, 6, 6)).astype(np.float32)   # 70 = 4 * 16 + 6: padded last batch
  y = rng.integers(0, 3, 70); y[:3] = [0, 1, 2]
  loader = lambda bs: DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=bs)
  make = lambda: create_train_state(MiniCNN(num_classes=3), input_shape=(6, 6, 1), num_classes=3,
                                    mixup_alpha=0.4, learning_rate=0.05)
  out = {}
  single, dp = make(), replicate_state(make(), data_mesh())
  out["sharded"] = batch_sharding(dp) is not None and batch_sharding(single) is None
  for epoch in (1, 2):
    single, l1 = train_epoch(single, loader(16), epoch=epoch)
    dp, l4 = train_epoch(dp, loader(16), epoch=epoch)
  out["loss"] = [l1, l4]
  out["metrics"] = [evaluate(single, loader(16)), evaluate(dp, loader(16))]
  p1, p4 = jax.device_get((single.params, dp.params))
  out["param_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)))
  s1, s4 = jax.device_get((single.model_state, dp.model_state))
  out["stats_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)))
  out["devices_used"] = len(dp.params["conv1"]["kernel"].sharding.device_set)
  try:
    train_epoch(dp, loader(18), epoch=1)
  except ValueError as e:
    out["bad_batch"] = str(e)
  result = fit(TrialConfig(model=MiniCNN(num_classes=3), train_loader=loader(16), val_loader=loader(16),
                           num_classes=3, devices=2, log_interval=1,
                           training=TrainingConfig(epochs=2, batch_size=16, use_amp=False, use_tqdm=False,
                                                   monitor_metric="accuracy")))
  out["fit_devices"] = len(result.state.step.sharding.device_set)
  out["fit_best"] = result.best
  print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def result():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_data_parallel_epoch_matches_one_device(result):
  assert result["sharded"]
  assert result["devices_used"] == 4
  l1, l4 = result["loss"]
  assert l4 == pytest.approx(l1, rel=1e-5)
  m1, m4 = result["metrics"]
  for key in ("loss", "accuracy", "auc", "f1"):
    assert m4[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
  assert result["param_diff"] < 1e-5
  assert result["stats_diff"] < 1e-5  # BatchNorm statistics exact across devices (masked padding)


def test_batch_not_divisible_by_devices_is_a_clear_error(result):
  assert result["bad_batch"] == ("batch size 18 is not divisible by the 4 devices of the mesh; "
                                 "use a multiple of 4 (e.g. 16, 20)")


def test_trial_config_devices_selects_a_subset(result):
  assert result["fit_devices"] == 2
  assert 0.0 <= result["fit_best"] <= 1.0


def test_devices_field_is_checked():
  from orchard_jax import ConfigError, MLP, TrialConfig
  with pytest.raises(ConfigError, match=r"TrialConfig.devices must be >= 1, got 0"):
    TrialConfig(model=MLP(num_classes=2), train_loader=[], val_loader=[], num_classes=2, devices=0)
  with pytest.raises(ConfigError, match="TrialConfig.devices must be None, a device count"):
    TrialConfig(model=MLP(num_classes=2), train_loader=[], val_loader=[], num_classes=2, devices="all")


def test_more_devices_than_present_is_a_clear_error():
  from orchard_jax.core.sharding import data_mesh
  with pytest.raises(ValueError, match=r"devices must be in \[1, 1\] \(the local device count\), got devices=3"):
    data_mesh(3)
