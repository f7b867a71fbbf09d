"""Per-epoch samples/s of MiniCNN and ResNet-18 on 28x28x1 inputs, any backend.

For each model (``--models``, default mini_cnn resnet_18) and dtype policy
(``--precisions``, default float32 bfloat16) it builds a trial state (10
classes, SGD + momentum 0.9, weight decay 5e-4, clipping 1.0: the library's
defaults) and times three kinds of epoch over the same synthetic samples:

* ``train-device``: a Python loop of ``train_step`` over batches already on
  the device (no input pipeline);
* ``train-loader``: ``train_epoch`` fed by a shuffling torch DataLoader over a
  TensorDataset of NCHW float32 tensors (input-pipeline cost included);
* ``eval-loader``: ``evaluate`` over a non-shuffling DataLoader of the same
  data, metrics (AUC, F1) included.

Each mode is warmed up on two batches first (compilation; printed, not
timed), then ``--repeats`` epochs are timed, each ending with
``jax.block_until_ready``. One line per (model, precision, mode) gives the
median and min-max samples/s; a markdown table for docs/performance.md and,
with ``--json PATH``, a JSON file (rewritten after every mode, so a killed run
keeps what it finished) follow. SIGTERM (as sent by ``timeout``) stops the run
but still prints the table and writes the JSON.

The policy is passed to ``create_train_state`` as is, so ``bfloat16``
(params float32, compute bfloat16, output float32) runs in bfloat16 on every
backend, CPU included (only ``TrainingConfig.use_amp`` is resolved per
backend, by ``resolve_precision``). The dtype the model actually computed in
is read from its traced output and printed next to the policy; a mismatch is
flagged and the figure is labelled with the dtype that ran.

``--budget-s`` (default 270) bounds the whole run: once it is spent, no new
case, mode or repeat starts (a mode keeps the repeats it finished). A failing
case prints its traceback and the others still run; the exit status is 1 if
any case failed.

  python benchmarks/gpu_epoch.py [--json out.json]     # full run, < 5 min on a GPU
  python benchmarks/gpu_epoch.py --smoke               # a few tens of seconds on CPU
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts imports too

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.devices()  # start JAX's backend (and its CUDA libraries) before torch loads its own

if importlib.util.find_spec("orchard_jax") is None:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchard_jax import create_train_state, evaluate, parse_policy, train_epoch, train_step  # noqa: E402
from orchard_jax.models import MODEL_NAMES, build_model  # noqa: E402
from orchard_jax import tune_host_memory  # noqa: E402
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)

import torch  # noqa: E402  (CPU is enough: only the DataLoader is used)
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
MODES = ("train-device", "train-loader", "eval-loader")
WARMUP_BATCHES = 2


def elapsed() -> float:
  return time.perf_counter() - _T0


class Interrupted(BaseException):
  """SIGTERM (e.g. from ``timeout``): stop, but still print the table and write the JSON."""


def _on_sigterm(signum, frame):
  raise Interrupted(f"signal {signum}")


class Budget:
  """Seconds left of ``--budget-s``; ``spent()`` once it is used up."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def spent(self) -> bool:
    return elapsed() >= self.seconds


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=16384, help="samples per epoch (rounded down to full batches)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3, help="timed epochs per mode")
  parser.add_argument("--models", nargs="+", default=["mini_cnn", "resnet_18"], choices=MODEL_NAMES)
  parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                      help="dtype policies, as orchard_jax.parse_policy reads them")
  parser.add_argument("--budget-s", type=float, default=270.0, help="no new work starts after this many seconds")
  parser.add_argument("--json", default=None, metavar="PATH", help="write the results here as JSON")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny run for CPU tests: batch 8, samples 16, repeats 1")
  args = parser.parse_args(argv)
  if args.smoke:
    args.batch, args.samples, args.repeats = 8, 16, 1
  for name in ("samples", "batch", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  for spec in args.precisions:
    try:
      parse_policy(spec)
    except ValueError as e:
      parser.error(f"--precisions: {e}")
  args.samples = max(args.batch, args.samples // args.batch * args.batch)
  return args


def environment() -> dict:
  device = jax.devices()[0]
  return {"device_kind": device.device_kind, "device_count": jax.device_count(),
          "backend": jax.default_backend(), "jax": jax.__version__, "jaxlib": _jaxlib_version(),
          "torch": torch.__version__, "python": platform.python_version(),
          "default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", "unknown")),
          "date": datetime.date.today().isoformat()}


def _jaxlib_version() -> str:
  try:
    import jaxlib
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return "unknown"


def make_data(samples: int, batch: int):
  """NCHW float32 torch tensors, int64 labels, and the same data as NHWC device batches."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(samples, 1, 28, 28)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, samples)
  x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
  batches = [{"image": jax.device_put(x_nhwc[i:i + batch]),
              "label": jax.device_put(y[i:i + batch].astype(np.int32)),
              "mask": jax.device_put(np.ones(batch, bool))} for i in range(0, samples, batch)]
  jax.block_until_ready(batches)
  return torch.from_numpy(x), torch.from_numpy(y), batches


def ran_dtypes(state) -> dict:
  """The dtypes that actually run: stored params, the model's own output, the step's output."""
  policy, spec = state.spec.policy, state.spec
  image = jnp.zeros((2, *spec.input_shape), jnp.float32)

  def forward(params, model_state):
    logits, _ = spec.model.apply(policy.cast_to_compute(params), model_state, policy.cast_to_compute(image),
                                 train=False, rng=state.rng)
    return logits, policy.cast_to_output(logits)

  raw, out = jax.eval_shape(forward, state.params, state.model_state)
  params = sorted({str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(state.params)})
  return {"params": "/".join(params), "compute": str(raw.dtype), "output": str(out.dtype)}


def device_epoch(state, batches):
  metrics = None
  for batch in batches:
    state, metrics = train_step(state, batch)
  jax.block_until_ready((state, metrics))
  return state


def loader_epoch(state, loader):
  state, _ = train_epoch(state, loader)
  jax.block_until_ready(state)
  return state


def eval_epoch(state, loader):
  evaluate(state, loader)
  return state


def run_case(model_name, precision, data, args, budget, emit):
  """Builds one state and times the three modes; ``emit`` receives each mode's result."""
  x, y, batches = data
  start = time.perf_counter()
  state = create_train_state(build_model(model_name, num_classes=NUM_CLASSES, in_channels=1, resolution=28),
                             input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, optimizer="sgd",
                             momentum=0.9, precision=precision)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  policy = state.spec.policy
  ran = ran_dtypes(state)
  label = precision if ran["compute"] == policy.compute_dtype.name else f"{precision} (ran {ran['compute']})"
  print(f"[{model_name} {precision}] policy {policy}; ran: params {ran['params']}, compute {ran['compute']}, "
        f"output {ran['output']}; init {init_s:.2f}s", flush=True)
  if label != precision:
    print(f"[{model_name} {precision}] WARNING: policy asks compute={policy.compute_dtype.name} but the model "
          f"computed in {ran['compute']}; figures are labelled {label!r}", flush=True)
  dataset = TensorDataset(x, y)
  warm = TensorDataset(x[:WARMUP_BATCHES * args.batch], y[:WARMUP_BATCHES * args.batch])
  train_loader = DataLoader(dataset, batch_size=args.batch, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
  modes = {
      "train-device": (device_epoch, batches[:WARMUP_BATCHES], batches),
      "train-loader": (loader_epoch, DataLoader(warm, batch_size=args.batch), train_loader),
      "eval-loader": (eval_epoch, DataLoader(warm, batch_size=args.batch), DataLoader(dataset, batch_size=args.batch)),
  }
  for mode, (epoch_fn, warm_data, data_in) in modes.items():
    if budget.spent():
      print(f"[{model_name} {precision}] budget of {budget.seconds:.0f}s spent: skipping mode {mode}", flush=True)
      emit({"model": model_name, "precision": precision, "mode": mode, "skipped": "budget"})
      continue
    start = time.perf_counter()
    state = epoch_fn(state, warm_data)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      if times and budget.spent():
        print(f"[{model_name} {precision}] budget spent: {mode} keeps {len(times)} of {args.repeats} repeats")
        break
      start = time.perf_counter()
      state = epoch_fn(state, data_in)
      times.append(time.perf_counter() - start)
    rates = [args.samples / t for t in times]
    emit({"model": model_name, "precision": precision, "label": label, "mode": mode,
          "policy": str(policy), "ran": ran, "samples": args.samples, "batch": args.batch,
          "repeats": len(times), "epoch_s": times, "samples_per_s_median": statistics.median(rates),
          "samples_per_s_min": min(rates), "samples_per_s_max": max(rates),
          "warmup_s": warmup_s, "init_s": init_s})


def result_line(r: dict, env: dict) -> str:
  return (f"{r['model']:10s} {r['label']:9s} {r['mode']:13s} samples/s median {r['samples_per_s_median']:10.1f} "
          f"(min {r['samples_per_s_min']:.1f} max {r['samples_per_s_max']:.1f}, {r['repeats']} epochs of "
          f"{r['samples']}) warm-up {r['warmup_s']:.2f}s | ran compute={r['ran']['compute']} "
          f"params={r['ran']['params']} | {env['device_kind']} backend={env['backend']} jax {env['jax']}")


def markdown(results: list[dict], env: dict, args) -> str:
  rows = [f"{env['device_kind']}, backend {env['backend']}, jax {env['jax']}, {env['date']}: "
          f"{args.samples} samples of 28x28x1, batch {args.batch}, median (min-max) of {args.repeats} epochs.",
          "", "| model | precision (compute ran) | mode | samples/s | min-max | warm-up s |",
          "|---|---|---|---|---|---|"]
  for r in results:
    if "samples_per_s_median" not in r:
      continue
    rows.append(f"| {r['model']} | {r['label']} ({r['ran']['compute']}) | {r['mode']} | "
                f"{r['samples_per_s_median']:,.0f} | {r['samples_per_s_min']:,.0f}-{r['samples_per_s_max']:,.0f} | "
                f"{r['warmup_s']:.1f} |")
  return "\n".join(rows)


def write_json(path, env, args, results, failures, skipped) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  payload = {"environment": env, "argv": sys.argv[1:], "samples": args.samples, "batch": args.batch,
             "repeats": args.repeats, "budget_s": args.budget_s, "elapsed_s": elapsed(),
             "results": [r for r in results if "samples_per_s_median" in r],
             "failures": failures, "skipped": skipped}
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)


def main(argv=None) -> int:
  args = parse_args(argv)
  env = environment()
  budget = Budget(args.budget_s)
  print(f"device {env['device_kind']} x{env['device_count']}, backend {env['backend']}, jax {env['jax']} "
        f"(jaxlib {env['jaxlib']}), torch {env['torch']}, python {env['python']}", flush=True)
  print(f"samples={args.samples} batch={args.batch} repeats={args.repeats} models={args.models} "
        f"precisions={args.precisions} budget={args.budget_s:.0f}s", flush=True)
  data = make_data(args.samples, args.batch)
  results, failures, skipped = [], [], []

  def emit(r):
    if "skipped" in r:
      skipped.append(r)
    else:
      results.append(r)
      print(result_line(r, env), flush=True)
    write_json(args.json, env, args, results, failures, skipped)

  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    run_all(args, data, budget, emit, failures, skipped)
  except Interrupted as e:
    print(f"stopped by {e} after {elapsed():.1f}s; remaining cases not run", flush=True)
    failures.append({"model": "-", "precision": "-", "error": f"stopped by {e}"})
  print("\n" + markdown(results, env, args) + "\n")
  print(f"done in {elapsed():.1f}s: {len(results)} results, {len(failures)} failed cases, "
        f"{len(skipped)} skipped", flush=True)
  write_json(args.json, env, args, results, failures, skipped)
  return 1 if failures else 0


def run_all(args, data, budget, emit, failures, skipped) -> None:
  """Every (model, precision) case in turn, each in its own try/except."""
  for model_name in args.models:
    for precision in args.precisions:
      if budget.spent():
        print(f"[{model_name} {precision}] budget of {args.budget_s:.0f}s spent after {elapsed():.0f}s: "
              "case skipped", flush=True)
        skipped.append({"model": model_name, "precision": precision, "mode": "all", "skipped": "budget"})
        continue
      start = time.perf_counter()
      try:
        run_case(model_name, precision, data, args, budget, emit)
      except Exception as e:  # one failing case must not stop the others
        print(f"[{model_name} {precision}] FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}",
              flush=True)
        failures.append({"model": model_name, "precision": precision, "error": f"{type(e).__name__}: {e}"})
      print(f"[{model_name} {precision}] case took {time.perf_counter() - start:.1f}s "
            f"(total {elapsed():.1f}s)", flush=True)


if __name__ == "__main__":
  sys.exit(main())
