"""ONNX export through jax2onnx: opset 18, a dynamic batch axis, onnx.checker, onnxruntime's
outputs within 1e-4 of the JAX model; one line naming an operation jax2onnx cannot convert,
with the StableHLO file written all the same."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

onnx = pytest.importorskip("onnx", reason='the export extra: pip install -e ".[export]"')

from orchard_jax.export import (ONNX_TOLERANCE, OPSET, ExportError,  # noqa: E402
                                UnsupportedOperationError, check_onnx, export_all, export_onnx)
from orchard_jax.export import common, onnx_export  # noqa: E402
from orchard_jax.export.onnx_export import run_onnx, session  # noqa: E402
from orchard_jax.models import as_model  # noqa: E402


@pytest.fixture(scope="module")
def files():
  return {}


@pytest.fixture
def converted(model, files, tmp_path_factory):
  key = id(model)
  if key not in files:
    files[key] = export_onnx(*model.weights, tmp_path_factory.mktemp("onnx") / "model.onnx")
  return files[key]


def test_onnxruntime_reproduces_the_jax_model_within_1e_4(model, converted):
  check = check_onnx(converted, *model.weights)
  assert check.samples == 10 and check.tolerance == ONNX_TOLERANCE == 1e-4
  assert check.passed, check


def test_the_graph_passes_the_checker_at_opset_20_with_a_dynamic_batch(model, converted):
  proto = onnx.load(str(converted))
  onnx.checker.check_model(proto, full_check=True)
  assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET == 20
  (inp,), (out,) = proto.graph.input, proto.graph.output
  assert (inp.name, out.name) == ("input", "logits")
  dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
  assert dims(inp) == ["batch", *model.input_shape] and dims(out) == ["batch", 3]


def test_resnet_batchnorm_is_folded_into_its_convolutions(models, files, tmp_path):
  """As torch's exporter folds BatchNorm: 20 convolutions and nothing of BatchNorm's
  ``(x - mean) * k + b`` left after them (jax2onnx writes it; onnxruntime's fusions fold it
  once its subtraction is an addition), the last one's included (the spatial mean after it is
  a GlobalAveragePool, so its layout transposes cancel): the input's transpose is the only one;
  and only standard ONNX operators."""
  from tests.export.conftest import trained
  m = models.setdefault("resnet_18", trained("resnet_18"))
  path = files.get(id(m)) or export_onnx(*m.weights, tmp_path / "model.onnx")
  proto = onnx.load(str(path))
  ops = [n.op_type for n in proto.graph.node]
  assert ops.count("Conv") == 20 and "Sub" not in ops and "Mul" not in ops
  assert ops.count("Transpose") == 1 and ops.count("GlobalAveragePool") == 1
  assert [o.domain for o in proto.opset_import] == [""]


def test_one_file_runs_batch_1_and_batch_5(model, converted):
  sess = session(converted)
  for batch in (1, 5):
    x = np.random.default_rng(batch).standard_normal((batch, *model.input_shape), np.float32)
    want = common.jax_outputs(*model.weights[:3], [x])[0]
    np.testing.assert_allclose(run_onnx(sess, x), want, atol=1e-4, rtol=0)


def test_probabilities_file_outputs_the_softmax(models, tmp_path):
  from tests.export.conftest import trained
  m = models.setdefault("mlp", trained("mlp"))
  path = export_onnx(*m.weights, tmp_path / "p.onnx", probabilities=True)
  assert onnx.load(str(path)).graph.output[0].name == "probabilities"
  assert check_onnx(path, *m.weights, probabilities=True).passed


@pytest.mark.parametrize("opset", [16, 10_000])
def test_opset_outside_17_to_the_newest_is_refused(models, tmp_path, opset):
  from tests.export.conftest import trained
  m = models.setdefault("mlp", trained("mlp"))
  with pytest.raises(ValueError, match=rf"opset must be in \[17, \d+\], got opset={opset}"):
    export_onnx(*m.weights, tmp_path / "m.onnx", opset=opset)


class GeluNet(nnx.Module):
  """GELU, as ConvNeXt and ViT use it: jax2onnx writes it as the opset-20 ``Gelu`` operator."""

  def __init__(self, rngs: nnx.Rngs):
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.gelu(x, approximate=False).mean(axis=(1, 2)))


def test_gelu_converts_at_the_default_opset_and_is_one_line_at_the_references_18(tmp_path):
  model = as_model(GeluNet(nnx.Rngs(0)))
  params, state = model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 3)))
  path = export_onnx(model, params, state, (4, 4, 3), tmp_path / "model.onnx")
  assert "Gelu" in {n.op_type for n in onnx.load(str(path)).graph.node}
  assert check_onnx(path, model, params, state, (4, 4, 3)).passed
  with pytest.raises(ExportError, match=r"^ONNX export: the converted graph fails onnx.checker: "
                                        r"No Op registered for Gelu with domain_version of 18$"):
    export_onnx(model, params, state, (4, 4, 3), tmp_path / "m18.onnx", opset=18)


class MinPoolNet(nnx.Module):
  """A user's model with min pooling (``lax.reduce_window`` with ``min``), which jax2onnx
  has no conversion for."""

  def __init__(self, rngs: nnx.Rngs):
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    x = jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return self.head(x.mean(axis=(1, 2)))


class BatchedEighNet(nnx.Module):
  """Eigenvalues of a batch of matrices: jax2onnx converts ``eigh`` of one matrix only."""

  def __init__(self, rngs: nnx.Rngs):
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    g = x[..., 0]
    return self.head(jnp.linalg.eigvalsh(g @ jnp.swapaxes(g, 1, 2)))


@pytest.mark.parametrize("module, operation", [(MinPoolNet, "reduce_window_min"),
                                               (BatchedEighNet, "eigh")])
def test_an_operation_the_converter_lacks_is_one_line_naming_it(tmp_path, module, operation):
  model = as_model(module(nnx.Rngs(0)))
  params, state = model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 3)))
  with pytest.raises(UnsupportedOperationError) as info:
    export_onnx(model, params, state, (4, 4, 3), tmp_path / "model.onnx")
  assert info.value.operation == operation
  assert "\n" not in str(info.value) and f"operation {operation!r}" in str(info.value)
  assert not (tmp_path / "model.onnx").exists()


def test_export_all_keeps_the_stablehlo_file_when_onnx_cannot_convert(tmp_path):
  model = as_model(MinPoolNet(nnx.Rngs(0)))
  params, state = model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 3)))
  result = export_all(model, params, state, (4, 4, 3), tmp_path, benchmark=False)
  assert set(result.files) == {"stablehlo"} and result.files["stablehlo"].is_file()
  assert result.checks["stablehlo"].passed and set(result.checks) == {"stablehlo"}
  line = result.errors["onnx"]
  assert "\n" not in line and "'reduce_window_min'" in line
  assert not (tmp_path / "model.onnx").exists() and not result.ok


def test_without_jax2onnx_export_all_writes_stablehlo_and_says_how_to_install(
    models, tmp_path, monkeypatch):
  from tests.export.conftest import trained
  m = models.setdefault("mlp", trained("mlp"))
  real = common.importlib.util.find_spec
  monkeypatch.setattr(common.importlib.util, "find_spec",
                      lambda name, *a: None if name == "jax2onnx" else real(name, *a))
  result = export_all(*m.weights, tmp_path, benchmark=False)
  assert result.errors == {"onnx": "ONNX export needs the Python package 'jax2onnx':"
                                   ' pip install -e ".[export]"'}
  assert set(result.files) == {"stablehlo"} and result.checks["stablehlo"].passed


def test_conversion_failure_without_an_operation_is_an_export_error():
  error = onnx_export._conversion_error(RuntimeError("graph\nbroken"))
  assert type(error) is onnx_export.ExportError
  assert str(error) == "ONNX export: jax2onnx failed: RuntimeError: graph broken"
