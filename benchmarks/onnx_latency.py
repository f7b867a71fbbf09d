"""ONNX latency in onnxruntime: orchard_jax's export against the reference's, same weights.

For each model, the torch twin gets seeded random weights and BatchNorm statistics
(``randomize_`` of tests/models/torch_reference.py) and its ``state_dict`` is loaded into the
orchard_jax model with ``load_torch_state_dict``, so both files hold the same weights:

* ``mini_cnn``: the reference's MiniCNN (``benchmarks/torch_reference.py``'s ``TorchMiniCNN``)
  on 28x28x1 images, 10 classes;
* ``resnet_18``: ResNet-18 with the reference's low-resolution stem (3x3/1 conv, no max-pool;
  ``tests/models/torch_reference.py``'s ``ResNet18(low_res=True)``) on 28x28x3, 10 classes.

orchard_jax's file is ``orchard_jax.export.export_onnx``'s (jax2onnx, opset 20, NHWC input,
BatchNorm folded). The reference's is ``torch.onnx.export`` as orchard-ml 0.2.6's
``export/onnx_exporter.py`` calls it: a ``[1, C, H, W]`` dummy input, opset 18, input
``input`` and output ``output`` with the dynamic batch axis ``batch_size``, constant folding,
``export_params=True``, the model in eval mode. torch 2.13's ``torch.onnx.export`` defaults to
the torch.export-based exporter (``dynamo=True``), which needs onnxscript; the reference
requires onnxscript (``onnxscript<1,>=0.2.0``), so its export runs that exporter. With
``--torch-exporter auto`` (the default) that exporter is used when onnxscript imports, and
otherwise the legacy TorchScript exporter (``dynamo=False``); the first line says which.

Before timing, both files run on the same batch (NHWC for orchard_jax's, its NCHW transpose
for torch's) and must agree within 1e-4 (the reference's ONNX tolerance), or the script stops.
Timing is ``orchard_jax.export.latency``'s method (the reference's benchmark): one seeded
``N(0, 1)`` batch, warm-up runs, then runs timed one by one, the median; one onnxruntime CPU
session per file with the same ``SessionOptions`` (``--threads``: 0 is onnxruntime's default,
as ``latency`` and the reference's benchmark use). In each round each side is measured once,
the order alternating; each round's ratio (orchard_jax / reference) is printed, then the
median ratio. Below 1.0 orchard_jax's file is faster; the target is at most 1.1.

  python benchmarks/onnx_latency.py [--rounds 5] [--threads 0]
  python benchmarks/onnx_latency.py --models mini_cnn --batches 1 --rounds 2 --runs 2 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import torch_reference as ref  # noqa: E402
from tests.models.torch_reference import ResNet18, randomize_  # noqa: E402

import jax  # noqa: E402
import onnxruntime as ort  # noqa: E402

from orchard_jax.export import ONNX_TOLERANCE, export_onnx  # noqa: E402
from orchard_jax.export.runtime import TIMED_RUNS, WARMUP_RUNS  # noqa: E402
from orchard_jax.models import build_model  # noqa: E402
from orchard_jax.models.torch_weights import load_torch_state_dict  # noqa: E402

NUM_CLASSES = 10
MODELS = {"mini_cnn": (28, 28, 1), "resnet_18": (28, 28, 3)}  # per-sample (H, W, C)
BATCHES = (1, 256)
REFERENCE_OPSET = 18
EXPORTERS = ("auto", "dynamo", "legacy")
TARGET = 1.1
# At the larger batches one run of ResNet-18 takes seconds on 2 CPU cores: fewer runs there.
BATCH_WARMUP, BATCH_RUNS = 3, 20


def torch_model(name: str) -> torch.nn.Module:
  h, w, c = MODELS[name]
  module = (ref.TorchMiniCNN(in_channels=c, num_classes=NUM_CLASSES) if name == "mini_cnn"
            else ResNet18(num_classes=NUM_CLASSES, in_channels=c, low_res=True))
  calibrate = torch.from_numpy(
      np.random.default_rng(0).standard_normal((16, c, h, w)).astype(np.float32))
  with torch.no_grad():
    return randomize_(module, seed=0, calibrate=calibrate)  # eval mode


def ours(name: str, module: torch.nn.Module, path: pathlib.Path) -> pathlib.Path:
  """orchard_jax's ONNX file of ``name`` with ``module``'s weights."""
  h, w, c = MODELS[name]
  model = build_model(name, num_classes=NUM_CLASSES, in_channels=c, resolution=h)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, h, w, c),
                                                                               np.float32))
  params, state = load_torch_state_dict(module.state_dict(), name, params=shapes[0],
                                        model_state=shapes[1])
  return export_onnx(model, params, state, (h, w, c), path)


def resolve_exporter(choice: str) -> str:
  have = importlib.util.find_spec("onnxscript") is not None
  if choice == "dynamo" and not have:
    raise SystemExit("--torch-exporter dynamo needs onnxscript (pip install onnxscript), which is"
                     " not importable; use --torch-exporter legacy or auto")
  return "dynamo" if choice == "dynamo" or (choice == "auto" and have) else "legacy"


def reference(name: str, module: torch.nn.Module, path: pathlib.Path, exporter: str) -> None:
  """The reference's export_to_onnx call (orchard-ml 0.2.6 export/onnx_exporter.py)."""
  h, w, c = MODELS[name]
  with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
      contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter("ignore")
    torch.onnx.export(module.eval(), (torch.randn(1, c, h, w),), str(path), export_params=True,
                      opset_version=REFERENCE_OPSET, do_constant_folding=True,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}},
                      verbose=False, dynamo=exporter == "dynamo")


def session(path: pathlib.Path, threads: int) -> ort.InferenceSession:
  options = ort.SessionOptions()  # the same options on both sides
  options.intra_op_num_threads = threads
  return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, x: np.ndarray, warmup: int, runs: int) -> float:
  """``orchard_jax.export.latency``'s loop on an open session: warm-up, then timed runs."""
  feed = {"input": x}
  for _ in range(warmup):
    sess.run(None, feed)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    sess.run(None, feed)
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def compare(name: str, batch: int, sessions: dict, x_nhwc: np.ndarray) -> None:
  out = sessions["orchard_jax"].run(None, {"input": x_nhwc})[0]
  want = sessions["reference"].run(None, {"input": x_nhwc.transpose(0, 3, 1, 2).copy()})[0]
  diff = float(np.max(np.abs(out.astype(np.float64) - want)))
  print(f"{name} b{batch}  outputs agree: max|diff| {diff:.2e} (outputs up to "
        f"{float(np.max(np.abs(want))):.3g}, tolerance {ONNX_TOLERANCE:g})", flush=True)
  if not diff <= ONNX_TOLERANCE:
    raise SystemExit(f"{name} b{batch}: the two ONNX files differ by {diff:.3g} > "
                     f"{ONNX_TOLERANCE:g}; not timing them")


def bench(name: str, batch: int, sessions: dict, args: argparse.Namespace) -> float:
  h, w, c = MODELS[name]
  x_nhwc = np.random.default_rng(0).standard_normal((batch, h, w, c)).astype(np.float32)
  feeds = {"orchard_jax": x_nhwc, "reference": x_nhwc.transpose(0, 3, 1, 2).copy()}
  compare(name, batch, sessions, x_nhwc)
  warmup, runs = (args.warmup, args.runs) if batch == 1 else (args.batch_warmup, args.batch_runs)
  ratios, times = [], {"orchard_jax": [], "reference": []}
  for r in range(args.rounds):
    order = ("orchard_jax", "reference") if r % 2 == 0 else ("reference", "orchard_jax")
    got = {side: median_ms(sessions[side], feeds[side], warmup, runs) for side in order}
    for side, ms in got.items():
      times[side].append(ms)
    ratios.append(got["orchard_jax"] / got["reference"])
    print(f"{name} b{batch}  round {r + 1}  orchard_jax {got['orchard_jax']:9.3f} ms  "
          f"reference {got['reference']:9.3f} ms  ratio {ratios[-1]:.3f}", flush=True)
  ratio = statistics.median(ratios)
  print(f"{name} b{batch}  median  orchard_jax {statistics.median(times['orchard_jax']):9.3f} ms"
        f"  reference {statistics.median(times['reference']):9.3f} ms  ratio {ratio:.3f}"
        f"  (rounds {args.rounds}, warm-up {warmup}, timed {runs} each)"
        f"  target <= {TARGET}: {'met' if ratio <= TARGET else 'not met'}", flush=True)
  return ratio


def parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
  p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--warmup", type=int, default=WARMUP_RUNS, help="warm-up runs at batch 1")
  p.add_argument("--runs", type=int, default=TIMED_RUNS, help="timed runs at batch 1")
  p.add_argument("--batch-warmup", type=int, default=BATCH_WARMUP,
                 help="warm-up runs at batches above 1")
  p.add_argument("--batch-runs", type=int, default=BATCH_RUNS,
                 help="timed runs at batches above 1")
  p.add_argument("--threads", type=int, default=0,
                 help="onnxruntime intra-op threads, both sides (0: onnxruntime's default)")
  p.add_argument("--torch-exporter", choices=EXPORTERS, default="auto",
                 help="dynamo: torch 2.13's default exporter (needs onnxscript); legacy:"
                      " TorchScript (dynamo=False); auto: dynamo when onnxscript imports")
  args = p.parse_args(argv)
  for flag in ("rounds", "runs", "batch_runs"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
  for flag in ("warmup", "batch_warmup", "threads"):
    if getattr(args, flag) < 0:
      p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
  if any(b < 1 for b in args.batches):
    p.error(f"--batches must be >= 1, got {args.batches}")
  return args


def main(argv: list[str] | None = None) -> dict[tuple[str, int], float]:
  args = parse(argv)
  exporter = resolve_exporter(args.torch_exporter)
  how = "legacy TorchScript, dynamo=False"
  if exporter == "dynamo":
    version = importlib.import_module("onnxscript").__version__
    how = f"torch.export-based, dynamo=True, onnxscript {version}"
  print(f"onnxruntime {ort.__version__} CPUExecutionProvider, threads "
        f"{args.threads or 'default'}; orchard_jax: export_onnx (jax2onnx, NHWC); reference: "
        f"torch {torch.__version__} torch.onnx.export opset {REFERENCE_OPSET} ({how}, NCHW)",
        flush=True)
  ratios = {}
  with tempfile.TemporaryDirectory(prefix="onnx_latency_") as tmp:
    for name in args.models:
      module = torch_model(name)
      paths = {"orchard_jax": pathlib.Path(tmp, f"{name}_orchard_jax.onnx"),
               "reference": pathlib.Path(tmp, name, "model.onnx")}
      paths["reference"].parent.mkdir()
      ours(name, module, paths["orchard_jax"])
      reference(name, module, paths["reference"], exporter)
      sessions = {side: session(path, args.threads) for side, path in paths.items()}
      for batch in args.batches:
        ratios[name, batch] = bench(name, batch, sessions, args)
  return ratios


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
