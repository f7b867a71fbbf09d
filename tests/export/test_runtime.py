"""The ONNX file in onnxruntime: int8/uint8 dynamic quantisation, accuracy on given arrays,
the reference's latency benchmark, and export_all's JSON-ready result."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason='the export extra: pip install -e ".[export]"')

from orchard_jax.export import (Latency, accuracy, export_all, export_onnx, latency,  # noqa: E402
                                quantize)
from orchard_jax.export import runtime  # noqa: E402
from orchard_jax.export.onnx_export import run_onnx, session  # noqa: E402
from tests.export.conftest import trained  # noqa: E402


@pytest.fixture(scope="module")
def mlp():
  return trained("mlp")


@pytest.fixture(scope="module")
def mlp_onnx(mlp, tmp_path_factory):
  return export_onnx(*mlp.weights, tmp_path_factory.mktemp("rt") / "model.onnx")


@pytest.fixture(scope="module")
def toy(mlp):
  """64 images labelled with the float model's own predictions (its accuracy is 1)."""
  x = np.random.default_rng(11).standard_normal((64, *mlp.input_shape)).astype(np.float32)
  return x, np.argmax(mlp.logits(x), axis=-1)


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_quantize_writes_an_integer_model_a_quarter_the_size(mlp_onnx, tmp_path, weight_type):
  path = quantize(mlp_onnx, tmp_path / "q.onnx", weight_type=weight_type)
  ops = {n.op_type for n in onnx.load(str(path)).graph.node}
  assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
  assert path.stat().st_size < mlp_onnx.stat().st_size / 3
  assert not [p for p in tmp_path.iterdir() if p.name != "q.onnx"]  # no leftover temporaries


def test_quantize_defaults_to_model_quantized_onnx_beside_the_file(mlp, tmp_path):
  path = export_onnx(*mlp.weights, tmp_path / "model.onnx")
  assert quantize(path) == tmp_path / "model_quantized.onnx" and path.with_name(
      "model_quantized.onnx").is_file()


def test_quantize_refuses_other_weight_types(mlp_onnx, tmp_path):
  with pytest.raises(ValueError, match=r"weight_type must be one of \('int8', 'uint8'\), got"
                                       r" weight_type='int4'"):
    quantize(mlp_onnx, tmp_path / "q.onnx", weight_type="int4")


def test_accuracy_counts_arg_max_hits(mlp_onnx, toy):
  x, y = toy
  assert accuracy(mlp_onnx, x, y) == 1.0
  wrong = y.copy()
  wrong[:5] = (wrong[:5] + 1) % 3
  assert accuracy(mlp_onnx, x, wrong, batch_size=7) == 59 / 64


def test_quantised_accuracy_stands_next_to_the_float_one(mlp_onnx, toy, tmp_path):
  x, y = toy
  qpath = quantize(mlp_onnx, tmp_path / "q.onnx")
  q_pred = np.argmax(run_onnx(session(qpath), x), axis=-1)
  assert accuracy(qpath, x, y) == np.mean(q_pred == y)
  assert 0.8 <= accuracy(qpath, x, y) <= accuracy(mlp_onnx, x, y) == 1.0


@pytest.mark.parametrize("images, labels", [(np.zeros((4, 8, 8)), np.zeros(4)),
                                            (np.zeros((4, 8, 8, 3)), np.zeros(3)),
                                            (np.zeros((0, 8, 8, 3)), np.zeros(0))])
def test_accuracy_refuses_mismatched_arrays(mlp_onnx, images, labels):
  with pytest.raises(ValueError, match=r"images must be \[N, H, W, C\] and labels \[N\]"):
    accuracy(mlp_onnx, images, labels)


def test_latency_is_the_references_10_warm_up_and_100_timed_runs(mlp, mlp_onnx, monkeypatch):
  shapes = []
  real = runtime.run_onnx
  monkeypatch.setattr(runtime, "run_onnx", lambda s, x: shapes.append(x.shape) or real(s, x))
  result = latency(mlp_onnx, mlp.input_shape, batch_size=4)
  assert (result.warmup, result.runs, result.batch_size) == (10, 100, 4)
  assert shapes == [(4, *mlp.input_shape)] * 110
  assert 0 < result.median_ms and 0 < result.mean_ms
  assert set(result.as_dict()) == {"batch_size", "warmup", "runs", "mean_ms", "median_ms"}


def test_latency_refuses_no_runs(mlp, mlp_onnx):
  with pytest.raises(ValueError, match="runs >= 1, got batch_size=1, warmup=10, runs=0"):
    latency(mlp_onnx, mlp.input_shape, runs=0)


def test_export_all_writes_checks_times_and_scores_every_file(mlp, toy, tmp_path):
  result = export_all(*mlp.weights, tmp_path / "export", quantize=True, test_data=toy)
  assert {k: p.name for k, p in result.files.items()} == {
      "stablehlo": "model.stablehlo", "onnx": "model.onnx",
      "onnx_quantized": "model_quantized.onnx"}
  assert all(p.parent == tmp_path / "export" and p.is_file() for p in result.written)
  assert result.checks["stablehlo"].passed and result.checks["onnx"].passed
  assert result.checks["onnx_quantized"].tolerance == pytest.approx(1e-3)
  assert set(result.latency) == {"onnx", "onnx_quantized"}
  assert all(isinstance(v, Latency) and v.runs == 100 for v in result.latency.values())
  assert result.accuracy["onnx"] == 1.0 and 0.8 <= result.accuracy["onnx_quantized"] <= 1.0
  assert result.ok and not result.errors
  report = json.loads(json.dumps(result.as_dict()))
  assert report["files"]["onnx"] == "model.onnx" and report["checks"]["onnx"]["passed"] is True


@pytest.mark.parametrize("kwargs, message", [
    (dict(formats=()), r"formats must be a non-empty subset of \('stablehlo', 'onnx'\)"),
    (dict(formats=("tflite",)), r"got formats=\('tflite',\)"),
    (dict(formats=("stablehlo",), quantize=True), r"quantize=True quantises the ONNX file")])
def test_export_all_refuses_unknown_formats_and_quantize_without_onnx(mlp, tmp_path, kwargs,
                                                                      message):
  with pytest.raises(ValueError, match=message):
    export_all(*mlp.weights, tmp_path, **kwargs)
  assert not list(tmp_path.iterdir())
