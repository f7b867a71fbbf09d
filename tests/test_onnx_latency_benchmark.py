"""benchmarks/onnx_latency.py: a tiny run prints its lines (figures not looked at), and its
two files hold the same weights (checked before timing)."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
import torch

from tests.conftest import load_benchmark

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

NUMBER = r"[0-9]+\.[0-9]{3}"


@pytest.fixture(scope="module")
def bench():
  return load_benchmark("onnx_latency")


@pytest.fixture(scope="module")
def tiny(bench):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ratios = bench.main(["--models", "mini_cnn", "--batches", "1", "--rounds", "2", "--runs",
                         "2", "--warmup", "1", "--torch-exporter", "legacy"])
  return ratios, out.getvalue()


def test_tiny_run_names_both_exports(tiny):
  _, out = tiny
  header = out.splitlines()[0]
  assert re.match(r"onnxruntime \S+ CPUExecutionProvider, threads default; orchard_jax: "
                  r"export_onnx \(jax2onnx, NHWC\); reference: torch \S+ torch.onnx.export "
                  r"opset 18 \(legacy TorchScript, dynamo=False, NCHW\)$", header), header


def test_tiny_run_checks_the_outputs_then_prints_each_round_and_the_median(tiny):
  ratios, out = tiny
  lines = out.splitlines()[1:]
  assert re.match(r"mini_cnn b1  outputs agree: max\|diff\| \S+ \(outputs up to \S+, "
                  r"tolerance 0.0001\)$", lines[0]), lines[0]
  for r in (1, 2):
    assert re.match(rf"mini_cnn b1  round {r}  orchard_jax\s+{NUMBER} ms  reference\s+{NUMBER} "
                    rf"ms  ratio {NUMBER}$", lines[r]), lines[r]
  assert re.match(rf"mini_cnn b1  median  orchard_jax\s+{NUMBER} ms  reference\s+{NUMBER} ms  "
                  rf"ratio {NUMBER}  \(rounds 2, warm-up 1, timed 2 each\)  target <= 1.1: "
                  r"(met|not met)$", lines[3]), lines[3]
  assert len(lines) == 4, out
  assert set(ratios) == {("mini_cnn", 1)} and ratios["mini_cnn", 1] > 0


def test_the_two_files_hold_the_same_weights(bench, tmp_path):
  """Unequal weights stop the script before timing (the check is not vacuous)."""
  module = bench.torch_model("mini_cnn")
  bench.ours("mini_cnn", module, tmp_path / "ours.onnx")
  with torch.no_grad():
    module.fc.bias.add_(1e-3)
  bench.reference("mini_cnn", module, tmp_path / "ref.onnx", "legacy")
  sessions = {"orchard_jax": bench.session(tmp_path / "ours.onnx", 1),
              "reference": bench.session(tmp_path / "ref.onnx", 1)}
  x = np.zeros((1, 28, 28, 1), "float32")
  with pytest.raises(SystemExit, match=r"mini_cnn b1: the two ONNX files differ by 0.001 > "
                                       r"0.0001; not timing them"):
    bench.compare("mini_cnn", 1, sessions, x)


def test_bad_counts_are_refused_in_one_line(bench, capsys):
  with pytest.raises(SystemExit):
    bench.parse(["--runs", "0"])
  assert "--runs must be >= 1, got 0" in capsys.readouterr().err


def test_the_reference_exporter_needs_onnxscript_for_dynamo(bench, monkeypatch):
  """torch 2.13's default exporter (the reference's) needs onnxscript; auto falls back."""
  monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
  assert bench.resolve_exporter("auto") == "legacy"
  assert bench.resolve_exporter("legacy") == "legacy"
  with pytest.raises(SystemExit, match=r"--torch-exporter dynamo needs onnxscript"):
    bench.resolve_exporter("dynamo")
