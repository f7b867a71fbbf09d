"""Precision policies (parsing, casting) and loss scales (pytree, adjust, jit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orchard_jax.core.precision import (LossScale, Policy, all_finite,
                                        loss_scale_for, parse_policy,
                                        select_tree)

F32, BF16, F16 = np.dtype("float32"), np.dtype(jnp.bfloat16), np.dtype("float16")


# ---------------------------------------------------------------- policy ---


@pytest.mark.parametrize("spec,expected", [
    ("float32", (F32, F32, F32)),
    ("f32", (F32, F32, F32)),
    ("bfloat16", (F32, BF16, F32)),
    (" BF16 ", (F32, BF16, F32)),
    ("float16", (F32, F16, F32)),
    ("half", (F32, F16, F32)),
    ("fp16", (F32, F16, F32)),
])
def test_parse_single_dtype(spec, expected):
  policy = parse_policy(spec)
  assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == expected


@pytest.mark.parametrize("spec,expected", [
    ("params=float32,compute=bfloat16,output=float32", (F32, BF16, F32)),
    ("p=f32, c=bf16, o=fp32", (F32, BF16, F32)),
    ("compute=f16,output=float32,param=float32", (F32, F16, F32)),
    (" params = bf16 , compute = bfloat16 , output = bf16 ", (BF16, BF16, BF16)),
    ("P=FP32,C=HALF,O=F16", (F32, F16, F16)),
])
def test_parse_full_form(spec, expected):
  policy = parse_policy(spec)
  assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == expected


@pytest.mark.parametrize("spec", ["float32", "bfloat16", "float16",
                                  "params=bfloat16,compute=bfloat16,output=float32"])
def test_str_round_trips_through_parse(spec):
  policy = parse_policy(spec)
  assert parse_policy(str(policy)) == policy


def test_str_uses_full_names():
  assert str(parse_policy("bf16")) == "params=float32,compute=bfloat16,output=float32"


def test_parse_returns_a_policy_unchanged():
  policy = Policy(F32, BF16, F32)
  assert parse_policy(policy) is policy


def test_policy_is_hashable_and_equal_by_value_across_dtype_spellings():
  a = Policy(jnp.float32, jnp.bfloat16, jnp.float32)
  b = Policy(np.float32, "bfloat16", np.dtype("float32"))
  assert a == b == parse_policy("bfloat16")
  assert hash(a) == hash(b)
  assert a != parse_policy("float16")
  assert len({a, b, parse_policy("float32")}) == 2


def test_policy_is_frozen():
  with pytest.raises(AttributeError):
    parse_policy("float32").compute_dtype = F16


@pytest.mark.parametrize("spec,token,suggestion", [
    ("bfloat61", "'bfloat61'", "'bfloat16'"),
    ("params=float32,compte=bf16,output=f32", "'compte'", "'compute'"),
    ("params=float32,compute=bflaot16,output=f32", "'bflaot16'", "'bfloat16'"),
])
def test_typo_error_names_token_lists_allowed_and_suggests(spec, token, suggestion):
  with pytest.raises(ValueError) as info:
    parse_policy(spec)
  message = str(info.value)
  assert token in message and "allowed:" in message
  assert f"did you mean {suggestion}" in message


@pytest.mark.parametrize("spec,message", [
    ("float64", "unknown dtype 'float64'"),
    ("params=float32,compute=bf16", "missing output"),
    ("p=f32,params=f32,c=f32,o=f32", "'params' given twice"),
    ("params=f32,bf16,output=f32", "expected key=dtype"),
    ("float32,", "expected key=dtype"),
    ("params=f16,compute=f16,output=f32", "param_dtype must be float32 or bfloat16"),
])
def test_malformed_spec_raises_value_error(spec, message):
  with pytest.raises(ValueError, match=message):
    parse_policy(spec)


def test_policy_rejects_unsupported_dtype():
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    Policy(F32, np.float64, F32)


def test_parse_rejects_non_string():
  with pytest.raises(TypeError, match="str or Policy"):
    parse_policy(16)


def test_casts_only_floating_leaves():
  tree = {"w": jnp.ones((2,), jnp.float32), "n": jnp.arange(3),
          "mask": jnp.array([True, False]), "key": jax.random.key(0),
          "old_key": jax.random.PRNGKey(0), "np": np.ones(2, np.float64),
          "py": 0.5}
  out = parse_policy("bfloat16").cast_to_compute(tree)
  assert out["w"].dtype == BF16 and out["np"].dtype == BF16
  for name in ("n", "mask", "key", "old_key", "py"):
    assert out[name] is tree[name]


def test_cast_to_param_and_output_use_their_dtypes():
  policy = parse_policy("params=bfloat16,compute=float16,output=float32")
  x = jnp.ones((2,), jnp.float16)
  assert policy.cast_to_param(x).dtype == BF16
  assert policy.cast_to_compute(x.astype(F32)).dtype == F16
  assert policy.cast_to_output(x).dtype == F32


def test_casting_works_under_jit():
  policy = parse_policy("float16")
  out = jax.jit(policy.cast_to_compute)({"w": jnp.ones(2), "n": jnp.arange(2)})
  assert out["w"].dtype == F16 and out["n"].dtype == jnp.int32


# ------------------------------------------------------------ loss scale ---


@pytest.mark.parametrize("loss_scale", [
    LossScale.static(4.0),
    LossScale.dynamic_scale(initial=8.0, period=3, factor=4.0, min_scale=0.5),
])
def test_loss_scale_flatten_unflatten_preserves_every_field(loss_scale):
  leaves, treedef = jax.tree_util.tree_flatten(loss_scale)
  assert len(leaves) == 2  # scale, counter; the rest is static
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  for field in ("dynamic", "period", "factor", "min_scale", "unit"):
    assert getattr(rebuilt, field) == getattr(loss_scale, field)
  assert rebuilt.scale.dtype == jnp.float32 and rebuilt.counter.dtype == jnp.int32
  assert float(rebuilt.scale) == float(loss_scale.scale)
  assert int(rebuilt.counter) == int(loss_scale.counter)


def _run_adjust(loss_scale, finite_flags, adjust):
  history = []
  for finite in finite_flags:
    loss_scale = adjust(loss_scale, jnp.asarray(finite))
    history.append((float(loss_scale.scale), int(loss_scale.counter)))
  return history


@pytest.mark.parametrize("use_jit", [False, True])
def test_dynamic_adjust_grows_every_period_and_shrinks_on_overflow(use_jit):
  adjust = lambda ls, finite: ls.adjust(finite)
  adjust = jax.jit(adjust) if use_jit else adjust
  loss_scale = LossScale.dynamic_scale(initial=4.0, period=3, factor=2.0)
  flags = [True, True, True, True, False, True, False, False, False, True]
  assert _run_adjust(loss_scale, flags, adjust) == [
      (4.0, 1), (4.0, 2), (8.0, 0), (8.0, 1), (4.0, 0), (4.0, 1), (2.0, 0),
      (1.0, 0), (1.0, 0), (1.0, 1)]  # min_scale 1.0 floors the last shrink


def test_dynamic_adjust_does_not_grow_to_inf():
  big = float(np.finfo(np.float32).max)
  loss_scale = LossScale.dynamic_scale(initial=big, period=1)
  grown = loss_scale.adjust(jnp.asarray(True))
  assert float(grown.scale) == big and int(grown.counter) == 0


def test_static_adjust_returns_self():
  loss_scale = LossScale.static(2.0)
  assert loss_scale.adjust(jnp.asarray(False)) is loss_scale


def test_adjust_rejects_non_scalar_flag():
  with pytest.raises(ValueError, match="grads_finite must be a scalar"):
    LossScale.dynamic_scale().adjust(jnp.array([True, False]))


def test_only_the_static_scale_of_one_is_unit():
  assert LossScale.static().unit and LossScale.static(1.0).unit
  assert not LossScale.static(2.0).unit and not LossScale.dynamic_scale(initial=1.0).unit
  assert loss_scale_for("float32").unit and loss_scale_for("bfloat16").unit
  assert not loss_scale_for("float16").unit


def test_unit_scale_returns_the_gradients_without_dividing():
  tree = {"g": jnp.full((2,), 3.0), "h": jnp.full((2,), 3.0, jnp.bfloat16)}
  assert LossScale.static().unscale(tree) is tree
  jaxpr = jax.make_jaxpr(LossScale.static().unscale)(tree)
  assert not [e for e in jaxpr.eqns if e.primitive.name == "div"]
  jaxpr = jax.make_jaxpr(LossScale.static(2.0).unscale)(tree)
  assert len([e for e in jaxpr.eqns if e.primitive.name == "div"]) == 2


def test_scale_and_unscale_touch_only_floating_leaves():
  loss_scale = LossScale.static(4.0)
  tree = {"g": jnp.full((2,), 3.0), "h": jnp.full((2,), 3.0, jnp.bfloat16),
          "n": jnp.arange(2)}
  scaled = loss_scale.scale_value(tree)
  np.testing.assert_array_equal(scaled["g"], [12.0, 12.0])
  assert scaled["n"] is tree["n"]
  unscaled = loss_scale.unscale(scaled)
  np.testing.assert_array_equal(unscaled["g"], [3.0, 3.0])
  assert unscaled["h"].dtype == jnp.float32  # scale_value promoted it


def test_unscale_keeps_leaf_dtype_and_scale_value_promotes_half():
  loss_scale = LossScale.dynamic_scale(initial=2.0**16)
  assert loss_scale.unscale(jnp.ones(2, jnp.bfloat16)).dtype == BF16
  scaled = loss_scale.scale_value(jnp.asarray(2.0, jnp.float16))
  assert scaled.dtype == jnp.float32 and float(scaled) == 2.0**17


def test_jit_does_not_retrace_when_only_scale_value_changes():
  traces = []

  @jax.jit
  def step(loss_scale, x):
    traces.append(1)
    return loss_scale.adjust(all_finite(x)), loss_scale.scale_value(x)

  x = jnp.ones(3)
  step(LossScale.dynamic_scale(initial=2.0**15), x)
  step(LossScale.dynamic_scale(initial=2.0**10), x)
  step(LossScale.dynamic_scale(initial=2.0**15).replace(
      counter=jnp.asarray(7, jnp.int32)), x)
  assert len(traces) == 1
  step(LossScale.dynamic_scale(initial=2.0**15, period=10), x)
  assert len(traces) == 2  # static fields are part of the cache key


@pytest.mark.parametrize("policy,dynamic,scale", [
    ("float16", True, 2.0**15), ("bfloat16", False, 1.0), ("float32", False, 1.0),
])
def test_loss_scale_for_policy(policy, dynamic, scale):
  loss_scale = loss_scale_for(parse_policy(policy))
  assert loss_scale.dynamic is dynamic and float(loss_scale.scale) == scale


@pytest.mark.parametrize("call,message", [
    (lambda: LossScale.static(0.0), "scale must be a finite number > 0"),
    (lambda: LossScale.dynamic_scale(initial=float("inf")), "initial must be"),
    (lambda: LossScale.dynamic_scale(period=0), "period must be an integer >= 1"),
    (lambda: LossScale.dynamic_scale(factor=1.0), "factor must be a finite number > 1"),
])
def test_loss_scale_constructors_reject_bad_arguments(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# --------------------------------------------------------------- helpers ---


@pytest.mark.parametrize("tree,expected", [
    ({"a": jnp.ones(3), "b": jnp.arange(2)}, True),
    ({"a": jnp.array([1.0, jnp.nan]), "b": jnp.ones(2)}, False),
    ([jnp.ones(2, jnp.bfloat16), jnp.array(-jnp.inf, jnp.float16)], False),
    ({}, True),
])
def test_all_finite(tree, expected):
  assert bool(all_finite(tree)) is expected
  assert bool(jax.jit(all_finite)(tree)) is expected


def test_select_tree_picks_whole_tree_under_jit():
  on_true, on_false = {"a": jnp.ones(2), "n": jnp.int32(1)}, {
      "a": jnp.zeros(2), "n": jnp.int32(2)}
  select = jax.jit(select_tree)
  picked = select(jnp.asarray(False), on_true, on_false)
  np.testing.assert_array_equal(picked["a"], [0.0, 0.0])
  assert int(picked["n"]) == 2
  assert int(select(jnp.asarray(True), on_true, on_false)["n"]) == 1


def test_select_tree_rejects_non_scalar_pred():
  with pytest.raises(ValueError, match="pred must be a scalar"):
    select_tree(jnp.array([True, False]), jnp.ones(2), jnp.zeros(2))
