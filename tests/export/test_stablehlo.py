"""StableHLO export: one batch-polymorphic file per model, parameters inside, checked against
``model.apply`` at 1e-6, readable by JAX alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from orchard_jax.export import (STABLEHLO_TOLERANCE, check_stablehlo, export_stablehlo,
                                load_stablehlo)
from orchard_jax.export import common, stablehlo


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return {}


@pytest.fixture
def exported(model, files, tmp_path_factory):
  key = id(model)
  if key not in files:
    files[key] = export_stablehlo(*model.weights, tmp_path_factory.mktemp("shlo") / "model.stablehlo")
  return files[key]


def test_the_exported_file_reproduces_model_apply_within_1e_6(model, exported):
  check = check_stablehlo(exported, *model.weights)
  assert check.samples == 10 and check.tolerance == STABLEHLO_TOLERANCE == 1e-6
  assert check.passed, check


def test_one_file_runs_batch_1_and_batch_5(model, exported):
  fn = load_stablehlo(exported)
  for batch in (1, 5):
    x = np.random.default_rng(batch).standard_normal((batch, *model.input_shape), np.float32)
    out = np.asarray(fn.call(x))
    assert out.shape == (batch, 3)
    np.testing.assert_allclose(out, common.jax_outputs(*model.weights[:3], [x])[0], atol=1e-6,
                               rtol=0)


def test_against_apply_with_the_weights_as_arguments_only_float32_rounding_differs(models, files,
                                                                                 tmp_path):
  """XLA folds the file's constant weights, so it rounds like ``model.apply`` jitted over
  constants, not over arguments: the difference from the latter is a few float32 ulps of the
  logits' size (as between eager and jitted ``model.apply``), not a different model. ResNet-18,
  the deepest model here, with logits of about 30."""
  from tests.export.conftest import trained
  model = models.setdefault("resnet_18", trained("resnet_18"))
  exported = files.get(id(model)) or export_stablehlo(*model.weights, tmp_path / "r.stablehlo")
  x = np.random.default_rng(7).standard_normal((5, *model.input_shape), np.float32)
  want = model.logits(x)
  diff = np.max(np.abs(np.asarray(load_stablehlo(exported).call(x)) - want))
  assert diff <= 1e-5 * max(1.0, float(np.max(np.abs(want)))), diff


def test_the_signature_is_float32_nhwc_with_a_symbolic_batch(model, exported):
  fn = load_stablehlo(exported)
  (aval,), (out,) = fn.in_avals, fn.out_avals
  assert str(aval.shape[0]) == stablehlo.BATCH_DIM and tuple(aval.shape[1:]) == model.input_shape
  assert aval.dtype == np.float32 and out.dtype == np.float32
  assert set(fn.platforms) == set(stablehlo.PLATFORMS)


READ_BACK = """
import json, pathlib, sys
import jax, numpy as np
fn = jax.export.deserialize(bytearray(pathlib.Path(sys.argv[1]).read_bytes()))
x = np.asarray(json.loads(sys.argv[2]), np.float32)
print(json.dumps(np.asarray(fn.call(x)).tolist()))
print("orchard_jax" in sys.modules, "flax" in sys.modules)
"""


def test_jax_alone_runs_the_file_without_the_model_code(models, tmp_path):
  from tests.export.conftest import trained
  m = models.setdefault("mini_cnn", trained("mini_cnn"))
  path = export_stablehlo(*m.weights, tmp_path / "model.stablehlo")
  x = np.random.default_rng(0).standard_normal((2, *m.input_shape)).astype(np.float32)
  proc = subprocess.run([sys.executable, "-c", READ_BACK, str(path), json.dumps(x.tolist())],
                        capture_output=True, text=True, timeout=180, cwd=tmp_path,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out, modules = proc.stdout.strip().splitlines()
  np.testing.assert_allclose(np.asarray(json.loads(out)), m.logits(x), atol=1e-6, rtol=0)
  assert modules == "False False"


def test_probabilities_export_gives_the_softmax_of_the_logits(models, tmp_path):
  from tests.export.conftest import trained
  m = models.setdefault("mlp", trained("mlp"))
  path = export_stablehlo(*m.weights, tmp_path / "p.stablehlo", probabilities=True)
  x = np.random.default_rng(3).standard_normal((4, *m.input_shape)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(load_stablehlo(path).call(x)),
                             np.asarray(jax.nn.softmax(m.logits(x))), atol=1e-6)
  assert check_stablehlo(path, *m.weights, probabilities=True).passed


def test_a_check_fails_when_the_file_is_not_the_model(models, tmp_path):
  from tests.export.conftest import trained
  m = models.setdefault("mlp", trained("mlp"))
  other = jax.tree.map(lambda a: a * 1.01, m.params)
  path = export_stablehlo(m.model, other, m.model_state, m.input_shape, tmp_path / "m.stablehlo")
  check = check_stablehlo(path, *m.weights)
  assert not check.passed and check.max_abs_diff > 1e-6
  assert check.as_dict()["passed"] is False


@pytest.mark.parametrize("shape", [(28, 28), (0, 4, 3), [4, 4, 3.0], "28x28x3", (True, 2, 3)])
def test_input_shape_must_be_three_positive_ints(models, tmp_path, shape):
  from tests.export.conftest import trained
  m = models.setdefault("mlp", trained("mlp"))
  with pytest.raises(ValueError, match=r"input_shape must be .*\(H, W, C\).*got input_shape="):
    export_stablehlo(m.model, m.params, m.model_state, shape, tmp_path / "m.stablehlo")


def test_unknown_platform_is_refused(models, tmp_path):
  from tests.export.conftest import trained
  m = models.setdefault("mlp", trained("mlp"))
  with pytest.raises(ValueError, match=r"platforms must be .*got \('metal',\)"):
    export_stablehlo(*m.weights, tmp_path / "m.stablehlo", platforms=("metal",))


def test_without_flatbuffers_one_line_says_how_to_install_the_extra(models, tmp_path, monkeypatch):
  from tests.export.conftest import trained
  m = models.setdefault("mlp", trained("mlp"))
  real = common.importlib.util.find_spec
  monkeypatch.setattr(common.importlib.util, "find_spec",
                      lambda name, *a: None if name == "flatbuffers" else real(name, *a))
  with pytest.raises(ImportError) as info:
    export_stablehlo(*m.weights, tmp_path / "m.stablehlo")
  assert str(info.value) == ("jax.export serialization needs the Python package 'flatbuffers':"
                             ' pip install -e ".[export]"')
  assert not (tmp_path / "m.stablehlo").exists()
