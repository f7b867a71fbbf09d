"""Per-epoch learning rates against torch.optim.lr_scheduler, epoch by epoch.

Each torch sequence is read as the reference reads it: the optimizer's lr
while epoch e trains, then one ``scheduler.step()`` after validation.
rtol 1e-6 is far below one epoch's change (see the off-by-one test).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from orchard_jax.core import schedules

RTOL = 1e-6
LR, MIN_LR = 0.008, 1e-6


def _torch_lrs(make_scheduler, n_epochs, metrics=None, lr=LR):
  """lr used by each of ``n_epochs`` epochs under a torch scheduler."""
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=lr)
  scheduler = make_scheduler(opt)
  lrs = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "step() before optimizer.step()" etc.
    for epoch in range(n_epochs):
      lrs.append(opt.param_groups[0]["lr"])
      opt.step()
      if metrics is None:
        scheduler.step()
      else:
        scheduler.step(metrics[epoch])
  return np.asarray(lrs)


def _plateau_lrs(metrics, mode, factor, patience, min_lr, lr=LR):
  transform = schedules.plateau(mode, factor, patience, min_lr)
  state, lrs = transform.init(lr), []
  for metric in metrics:
    lrs.append(float(state.lr))
    state = transform.update(state, metric)
  return np.asarray(lrs)


def _torch_plateau_lrs(metrics, mode, factor, patience, min_lr, lr=LR):
  make = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
      opt, mode=mode, factor=factor, patience=patience, min_lr=min_lr)
  return _torch_lrs(make, len(metrics), metrics, lr=lr)


def _schedule(kind, **overrides):
  kwargs = dict(learning_rate=LR, min_lr=MIN_LR, epochs=30, step_size=7,
                factor=0.1)
  kwargs.update(overrides)
  return schedules.epoch_schedule(kind, **kwargs)


# ------------------------------------------------------------- schedules ---


# Host counts (ints, numpy) are computed with numpy, JAX arrays and tracers with jnp.
NAMESPACES = pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jnp"])


@NAMESPACES
@pytest.mark.parametrize("t_max", [1, 7, 30])
def test_cosine_matches_torch_cosine_annealing_including_past_t_max(t_max, xp):
  expected = _torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
      opt, T_max=t_max, eta_min=MIN_LR), 45)
  got = _schedule("cosine", epochs=t_max)(xp.arange(45))
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


def test_cosine_starts_at_learning_rate_and_reaches_min_lr_at_t_max():
  schedule = _schedule("cosine", epochs=30)
  np.testing.assert_allclose(float(schedule(0)), LR, rtol=RTOL)
  np.testing.assert_allclose(float(schedule(30)), MIN_LR, rtol=RTOL)


@NAMESPACES
@pytest.mark.parametrize("step_size,factor", [(7, 0.1), (1, 0.5), (20, 0.0)])
def test_step_matches_torch_step_lr(step_size, factor, xp):
  expected = _torch_lrs(lambda opt: torch.optim.lr_scheduler.StepLR(
      opt, step_size=step_size, gamma=factor), 40)
  got = _schedule("step", step_size=step_size, factor=factor)(xp.arange(40))
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


@NAMESPACES
@pytest.mark.parametrize("kind", ["none", "plateau"])
def test_none_and_plateau_base_are_constant_like_torch_without_decay(kind, xp):
  expected = _torch_lrs(
      lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0), 30)
  got = _schedule(kind)(xp.arange(30))
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


def test_tolerance_detects_a_one_epoch_shift():
  expected = _torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
      opt, T_max=30, eta_min=MIN_LR), 31)
  shifted = _schedule("cosine", epochs=30)(jnp.arange(1, 31))
  assert not np.allclose(shifted, expected[:30], rtol=RTOL, atol=0)


@pytest.mark.parametrize("kind", ["cosine", "step", "none"])
def test_schedule_is_jittable_and_returns_float32(kind):
  schedule = _schedule(kind)
  got = jax.jit(schedule)(jnp.int32(9))
  assert got.dtype == jnp.float32 and got.shape == ()
  assert float(got) == float(schedule(jnp.int32(9)))


@pytest.mark.parametrize("kind", ["cosine", "step", "none"])
def test_host_counts_are_computed_with_numpy_and_no_jax_program(kind, monkeypatch):
  schedule = _schedule(kind)
  monkeypatch.setattr(jnp, "sin", None)  # any jnp call on the host path would fail
  monkeypatch.setattr(jnp, "power", None)
  monkeypatch.setattr(jnp, "full", None)
  got = schedule(9)
  assert not isinstance(got, jax.Array)
  assert np.asarray(got).dtype == np.float32 and np.shape(got) == ()


# --------------------------------------------------------------- plateau ---


def _metric_sequence(seed, n=40):
  """Rounded (ties, plateaus), shifted negative for odd seeds, one NaN."""
  rng = np.random.default_rng(seed)
  metrics = np.round(np.cumsum(rng.normal(0.0, 0.05, n)), 2)
  metrics[rng.integers(5, 15, size=4)] = metrics[4]  # repeated plateaus
  if seed % 2:
    metrics -= 3.0
  metrics[rng.integers(1, n)] = np.nan
  return metrics


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("seed", range(6))
def test_plateau_matches_torch_on_random_metric_sequences(mode, seed):
  metrics = _metric_sequence(seed)
  patience, factor, min_lr = seed % 4, (0.1, 0.5)[seed % 2], 1e-5
  expected = _torch_plateau_lrs(metrics, mode, factor, patience, min_lr)
  got = _plateau_lrs(metrics, mode, factor, patience, min_lr)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_plateau_reduces_on_the_same_epoch_as_torch(mode):
  metrics = [1.0] * 8  # no improvement after the first epoch
  expected = _torch_plateau_lrs(metrics, mode, 0.1, 2, 0.0)
  got = _plateau_lrs(metrics, mode, 0.1, 2, 0.0)
  np.testing.assert_allclose(expected[:5], [LR] * 4 + [LR * 0.1], rtol=RTOL)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_plateau_follows_torch_on_negative_metric_ties(mode):
  # In "max" mode best * (1 + 1e-4) is below a negative best: a tie improves.
  metrics = [-2.0, -2.0, -2.0, -2.0, -1.0, -1.0, -3.0, -3.0, -3.0, -3.0]
  expected = _torch_plateau_lrs(metrics, mode, 0.5, 1, 0.0)
  got = _plateau_lrs(metrics, mode, 0.5, 1, 0.0)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_plateau_nan_metric_counts_as_a_bad_epoch(mode):
  transform = schedules.plateau(mode, 0.5, 0, 0.0)
  state = transform.update(transform.init(0.1), 1.0)
  state = transform.update(state, float("nan"))
  assert float(state.best) == 1.0
  np.testing.assert_allclose(float(state.lr), 0.05, rtol=RTOL)
  np.testing.assert_allclose(
      _plateau_lrs([1.0, np.nan, 2.0, np.nan], mode, 0.5, 0, 0.0),
      _torch_plateau_lrs([1.0, np.nan, 2.0, np.nan], mode, 0.5, 0, 0.0),
      rtol=RTOL, atol=0)


@pytest.mark.parametrize("mode", ["max", "min"])
def test_plateau_stops_at_min_lr_like_torch(mode):
  metrics = [0.5] * 30
  expected = _torch_plateau_lrs(metrics, mode, 0.5, 0, 1e-4)
  got = _plateau_lrs(metrics, mode, 0.5, 0, 1e-4)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)
  np.testing.assert_allclose(got[-10:], 1e-4, rtol=RTOL)


def test_plateau_update_under_jit_equals_eager_and_keeps_dtypes():
  transform = schedules.plateau("max", 0.5, 1, 1e-5)
  eager = jitted = transform.init(0.1)
  update = jax.jit(transform.update)
  for metric in _metric_sequence(3):
    eager = transform.update(eager, float(metric))
    jitted = update(jitted, jnp.float32(metric))
    for a, b in zip(eager, jitted):
      np.testing.assert_array_equal(a, b)
  assert [x.dtype for x in jitted] == [jnp.float32, jnp.int32, jnp.float32]
  assert [x.shape for x in jitted] == [(), (), ()]


# ------------------------------------------------------------ controller ---


def _controller(kind, **overrides):
  kwargs = dict(learning_rate=LR, min_lr=MIN_LR, epochs=12, step_size=4,
                factor=0.5, patience=1, monitor_direction="maximize")
  kwargs.update(overrides)
  return schedules.LRController(kind, **kwargs)


@pytest.mark.parametrize("kind,make_torch", [
    ("cosine", lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=12, eta_min=MIN_LR)),
    ("step", lambda opt: torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.5)),
    ("none", lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.)),
])
def test_controller_matches_torch_for_epoch_schedules(kind, make_torch):
  controller, got = _controller(kind), []
  for epoch in range(1, 13):
    got.append(controller.lr_for_epoch(epoch))
    controller.step(0.5)  # ignored by these types
  np.testing.assert_allclose(got, _torch_lrs(make_torch, 12), rtol=RTOL)


@pytest.mark.parametrize("direction,mode", [("maximize", "max"),
                                            ("minimize", "min")])
def test_controller_plateau_matches_torch(direction, mode):
  metrics = _metric_sequence(4, n=20)
  controller, got = _controller("plateau", monitor_direction=direction), []
  for epoch, metric in enumerate(metrics, start=1):
    got.append(controller.lr_for_epoch(epoch))
    controller.step(float(metric))
  expected = _torch_plateau_lrs(metrics, mode, 0.5, 1, MIN_LR)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("direction,mode", [("maximize", "max"), ("minimize", "min")])
@pytest.mark.parametrize("factor, lr", [(0.7, 0.008), (0.9, 0.008), (0.6, 0.1)])
def test_controller_plateau_rate_follows_torch_over_20_reductions(direction, mode, factor, lr):
  # A float32 rate times a float32 factor rounds at every reduction: 1.6e-7 (0.7) to 6.9e-7
  # (0.6 from 0.1) relative within 20. The controller computes in float64, as torch does, and
  # the state rounds the rate to float32 once (with_learning_rate).
  metrics = [0.5] * 22  # no improvement after the first epoch: patience 0 reduces every epoch
  controller = _controller("plateau", monitor_direction=direction, learning_rate=lr,
                           factor=factor, patience=0, min_lr=0.0)
  got = []
  for epoch, metric in enumerate(metrics, start=1):
    got.append(controller.lr_for_epoch(epoch))
    controller.step(metric)
  expected = _torch_plateau_lrs(metrics, mode, factor, 0, 0.0, lr=lr)
  assert len(set(expected.tolist())) == 21  # 20 reductions, at epochs 2..21
  assert got == expected.tolist()  # torch's float64 arithmetic, bit for bit
  in_state = np.asarray(got, np.float32).astype(np.float64)  # as with_learning_rate stores it
  np.testing.assert_allclose(in_state, expected, rtol=1e-7, atol=0)


def test_a_float64_plateau_state_computes_in_float64_and_the_default_stays_float32():
  transform = schedules.plateau("max", 0.7, 0, 0.0)
  state64, state32, lr = transform.init(0.008, np.float64), transform.init(0.008), 0.008
  for epoch in range(21):
    state64, state32 = transform.update(state64, 0.5), transform.update(state32, 0.5)
    lr = lr * 0.7 if epoch else lr  # epoch 0 sets the best; each later one reduces
  assert [x.dtype for x in state64] == [np.float64, np.int32, np.float64]
  assert [x.dtype for x in state32] == [np.float32, np.int32, np.float32]
  assert float(state64.lr) == lr  # Python's float arithmetic
  assert abs(float(state32.lr) / lr - 1) > 1e-7  # the compounded float32 rounding
  with pytest.raises(ValueError, match="a plateau state of device arrays is float32"):
    transform.init(jnp.float32(0.008), np.float64)


def test_controller_plateau_needs_a_metric():
  with pytest.raises(ValueError, match="metric=None"):
    _controller("plateau").step(None)


def test_controller_plateau_lr_is_only_known_for_the_current_epoch():
  controller = _controller("plateau")
  controller.step(0.3)
  with pytest.raises(ValueError, match="current epoch 2.*epoch=3"):
    controller.lr_for_epoch(3)


# ---------------------------------------------------------------- errors ---


def test_unknown_scheduler_type_names_value_and_allowed_set():
  with pytest.raises(ValueError, match=r"scheduler_type.*'cosine'.*'cosin'"):
    _schedule("cosin")


@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", 0.0, r"learning_rate must be in \(0.0, inf\)"),
    ("min_lr", -1e-6, r"min_lr must be in \[0.0, inf\)"),
    ("epochs", 0, "epochs must be an integer >= 1"),
    ("step_size", 2.5, "step_size must be an integer >= 1"),
    ("factor", 1.5, r"factor must be in \[0.0, 1.0\], got factor=1.5"),
])
def test_epoch_schedule_rejects_bad_arguments(field, value, message):
  with pytest.raises(ValueError, match=message):
    _schedule("cosine", **{field: value})


@pytest.mark.parametrize("args,message", [
    (("up", 0.1, 1, 0.0), "mode must be one of"),
    (("max", 1.0, 1, 0.0), r"factor must be in \[0.0, 1.0\), got factor=1.0"),
    (("max", 0.1, -1, 0.0), "patience must be an integer >= 0"),
    (("min", 0.1, 1, float("nan")), "min_lr must be in"),
])
def test_plateau_rejects_bad_arguments(args, message):
  with pytest.raises(ValueError, match=message):
    schedules.plateau(*args)


@pytest.mark.parametrize("overrides,message", [
    (dict(monitor_direction="up"), "monitor_direction must be one of"),
    (dict(patience=1.5), "patience must be an integer >= 0"),
    (dict(factor=-0.1), "factor must be in"),
])
def test_controller_rejects_bad_arguments(overrides, message):
  with pytest.raises(ValueError, match=message):
    _controller("cosine", **overrides)


def test_controller_rejects_epoch_zero():
  with pytest.raises(ValueError, match="epoch must be an integer >= 1"):
    _controller("cosine").lr_for_epoch(0)
