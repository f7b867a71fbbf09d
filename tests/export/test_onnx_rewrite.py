"""The ONNX export's pooling rewrite (orchard_jax/export/onnx_rewrite.py): jax2onnx's 2x2/2
reshape-max pool and spatial mean of NHWC tensors become MaxPool and GlobalAveragePool, so
onnxruntime cancels the convolutions' layout transposes and folds their BatchNorms; any other
window, stride, axes or divisor is left as jax2onnx wrote it; the outputs stay within 1e-4."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason='the export extra: pip install -e ".[export]"')

from orchard_jax.export import check_onnx, export_onnx  # noqa: E402
from orchard_jax.models import as_model, build_model  # noqa: E402
from orchard_jax.models.layers import max_pool_2x2  # noqa: E402
from tests.export.conftest import _random, trained  # noqa: E402


def _exported(model, params, state, shape, path) -> Counter:
  """Exports, checks the outputs against the JAX model (1e-4), returns the operator counts."""
  path = export_onnx(model, params, state, shape, path)
  check = check_onnx(path, model, params, state, shape)
  assert check.passed, check
  return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_mini_cnn_at_28px_exports_as_torch_does(tmp_path):
  """The benchmark's MiniCNN (28x28x1): the pools become MaxPool, the mean GlobalAveragePool,
  and then every BatchNorm (and conv bias) folds into its Conv and only the input's layout
  transpose is left: Conv, Relu, MaxPool, ..., GlobalAveragePool, Flatten, Gemm."""
  model = build_model("mini_cnn", num_classes=3, resolution=28)
  rng = np.random.default_rng(0)
  params, state = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _random(path, leaf, rng),
      jax.eval_shape(model.init, jax.random.key(0), np.zeros((2, 28, 28, 1), np.float32)))
  ops = _exported(model, params, state, (28, 28, 1), tmp_path / "m.onnx")
  assert ops == Counter({"Conv": 3, "Relu": 3, "MaxPool": 2, "Transpose": 1,
                         "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1})


def test_mini_cnn_pools_become_maxpool_and_its_conv_batchnorms_fold(models, tmp_path):
  """conftest's MiniCNN (16x16): two MaxPool, one GlobalAveragePool, no ReduceMax or
  ReduceSum; the two convolutions' BatchNorms fold (no Sub, and the only Mul is the third
  BatchNorm's: at 4x4 the third 3x3 convolution is evaluated as im2col, a Gemm after slices,
  which keeps its layout transposes and its BatchNorm)."""
  m = models.setdefault("mini_cnn", trained("mini_cnn"))
  ops = _exported(*m.weights, tmp_path / "m.onnx")
  assert ops["MaxPool"] == 2 and ops["GlobalAveragePool"] == 1 and ops["Conv"] == 2, ops
  assert not {"ReduceMax", "ReduceSum", "Div", "Sub"} & set(ops) and ops["Mul"] == 1, ops


class _Head(nn.Module):
  """``pool`` of the input, then a Dense layer to 2 logits."""
  pool: Callable[[jax.Array], jax.Array]

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.pool(x)
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


def _head(pool, shape, tmp_path) -> Counter:
  model = as_model(_Head(pool))
  params, state = model.init(jax.random.key(0), jnp.zeros((2, *shape)))
  return _exported(model, params, state, shape, tmp_path / "m.onnx")


def _pool(x, kh, kw):
  b, h, w, c = x.shape
  return x.reshape(b, h // kh, kh, w // kw, kw, c).max(axis=(2, 4))


@pytest.mark.parametrize("pool, shape, kept", [
    (lambda x: _pool(x, 3, 3), (6, 6, 2), "ReduceMax"),
    (lambda x: _pool(x, 2, 1), (4, 4, 2), "ReduceMax"),
    (lambda x: x.reshape(x.shape[0], 2, 2, 4, 2).max(axis=(2, 4)), (4, 4, 2), "ReduceMax"),
    (lambda x: x.reshape(x.shape[0], 2, 2, 2, 2, 2).max(axis=(1, 3)), (4, 4, 2), "ReduceMax"),
    (lambda x: x.mean(axis=-1), (4, 4, 3), "ReduceSum"),
    (lambda x: x.mean(axis=(1, 2, 3)), (4, 4, 3), "ReduceSum"),
    (lambda x: x.mean(axis=(2, 3)), (4, 4, 3), "ReduceSum"),
    (lambda x: x.sum(axis=(1, 2)) / 15.0, (4, 4, 3), "ReduceSum"),
    (lambda x: x.sum(axis=(1, 2)), (4, 4, 3), "ReduceSum"),
    (lambda x: x.mean(axis=(1, 2), keepdims=True), (4, 6, 3), "ReduceSum"),  # Reshape, Expand
], ids=["max3x3", "max2x1", "max_channels", "max_hw_axes_1_3", "mean_channels", "mean_hwc",
        "mean_wc", "sum_hw_over_15", "sum_hw", "mean_keepdims"])
def test_other_reductions_are_left_as_jax2onnx_wrote_them(tmp_path, pool, shape, kept):
  ops = _head(pool, shape, tmp_path)
  assert kept in ops and not {"MaxPool", "GlobalAveragePool"} & set(ops)


@pytest.mark.parametrize("pool, shape, added", [
    (max_pool_2x2, (7, 5, 2), "MaxPool"),  # odd sizes: jax2onnx slices, then the 2x2/2 pool
    (lambda x: x.mean(axis=(-3, -2)), (5, 3, 2), "GlobalAveragePool"),
], ids=["max_pool_2x2_odd", "mean_negative_axes"])
def test_odd_sizes_pool_and_negative_axes_mean_are_rewritten(tmp_path, pool, shape, added):
  ops = _head(pool, shape, tmp_path)
  assert ops[added] == 1 and not {"ReduceMax", "ReduceSum"} & set(ops)
