"""Training throughput of cohorts of K MiniCNN trials (one vmapped program) on 28x28x1, any backend.

For each K (``--ks``, default 1 4 16 64) it builds K trial states of MiniCNN
(10 classes, SGD + momentum 0.9, weight decay 5e-4, clipping 1.0: the
library's defaults) with ``orchard_jax.create_train_state``, one seed per
member, stacks them with ``orchard_jax.core.cohort.stack`` and gives every
member its own learning rate (``with_learning_rates``, geometric from 1e-3 to
0.3). It then times ``cohort_train_step`` on batches of ``--batch`` (default
256) samples already on the device, shared by the members: ``--warmup``
steps first (compilation included; printed, not timed), then ``--rounds``
rounds of ``--steps`` steps, each round ending with ``jax.block_until_ready``.
A solo ``train_step`` of one state is timed the same way, as the reference.

One line per K gives the median (min-max over rounds) of per-member
samples/s (samples one trial trains per second), the cohort's member-samples/s
(K x that) and its ratio to K=1's, i.e. how many trials' worth of training
the cohort does in the time one trial takes; the target on a GPU is >= 8x
at K = 16. A table and, with ``--json PATH``, a JSON file (rewritten after
every K, so a killed run keeps what it finished) follow. ``--budget-s``
(default 180) bounds the run: once it is spent no new K or round starts.
SIGTERM (as sent by ``timeout``) stops the run but still prints the table.
A K that fails (e.g. out of memory) prints its error and the others still
run; the exit status is then 1.

  python benchmarks/gpu_cohort.py [--json out.json]   # full run, < 5 min on a GPU
  python benchmarks/gpu_cohort.py --quick             # K = 1, 2, batch 32, a few steps: CPU check
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
import numpy as np  # noqa: E402

jax.devices()  # start JAX's backend (and its CUDA libraries) before torch loads its own

if importlib.util.find_spec("orchard_jax") is None:  # a checkout without `pip install -e .`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchard_jax import create_train_state, parse_policy, train_step  # noqa: E402
from orchard_jax import tune_host_memory  # noqa: E402
from orchard_jax.core import cohort as co  # noqa: E402
from orchard_jax.models import build_model  # noqa: E402
tune_host_memory()  # the orchard-jax command's allocator (ORCHARD_JAX_MALLOC=system: glibc's)

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
N_BATCHES = 4  # distinct device batches, cycled
FULL = {"ks": [1, 4, 16, 64], "batch": 256, "steps": 100, "rounds": 5, "warmup": 3}
QUICK = {"ks": [1, 2], "batch": 32, "steps": 3, "rounds": 2, "warmup": 1}
TARGET = (16, 8.0)  # at K = 16, >= 8x K=1's member-samples/s


def elapsed() -> float:
  return time.perf_counter() - _T0


class Interrupted(BaseException):
  """SIGTERM (e.g. from ``timeout``): stop, but still print the table and write the JSON."""


def _on_sigterm(signum, frame):
  raise Interrupted(f"signal {signum}")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ks", nargs="+", type=int, default=None,
                      help="cohort sizes (default 1 4 16 64; --quick: 1 2)")
  parser.add_argument("--batch", type=int, default=None, help="default 256 (--quick: 32)")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per round (default 100; --quick: 3)")
  parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 2)")
  parser.add_argument("--warmup", type=int, default=None,
                      help="untimed steps first, compilation included (default 3; --quick: 1)")
  parser.add_argument("--precision", default="float32",
                      help="dtype policy, as orchard_jax.parse_policy reads it (e.g. bfloat16)")
  parser.add_argument("--no-solo", dest="solo", action="store_false",
                      help="skip the solo train_step reference")
  parser.add_argument("--budget-s", type=float, default=180.0,
                      help="no new K or round starts after this many seconds")
  parser.add_argument("--json", default=None, metavar="PATH", help="write the results here as JSON")
  parser.add_argument("--quick", action="store_true",
                      help="tiny run for CPU checks: K = 1 2, batch 32, 3 steps, 2 rounds, "
                           "1 warm-up step (flags given still apply)")
  args = parser.parse_args(argv)
  for name, value in (QUICK if args.quick else FULL).items():  # what the command line left unset
    if getattr(args, name) is None:
      setattr(args, name, value)
  for name in ("batch", "steps", "rounds", "warmup"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if min(args.ks) < 1:
    parser.error(f"--ks must all be >= 1, got {args.ks}")
  args.ks = sorted(set(args.ks))
  try:
    parse_policy(args.precision)
  except ValueError as e:
    parser.error(f"--precision: {e}")
  return args


def environment() -> dict:
  device = jax.devices()[0]
  try:
    import jaxlib
    jaxlib_version = jaxlib.__version__
  except (ImportError, AttributeError):
    jaxlib_version = "unknown"
  return {"device_kind": device.device_kind, "device_count": jax.device_count(),
          "backend": jax.default_backend(), "jax": jax.__version__, "jaxlib": jaxlib_version,
          "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def make_batches(batch: int) -> list[dict]:
  rng = np.random.default_rng(0)
  out = []
  for _ in range(N_BATCHES):
    out.append({"image": jax.device_put(rng.normal(size=(batch, *INPUT_SHAPE)).astype(np.float32)),
                "label": jax.device_put(rng.integers(0, NUM_CLASSES, batch).astype(np.int32)),
                "mask": jax.device_put(np.ones(batch, bool))})
  jax.block_until_ready(out)
  return out


def new_state(seed: int, precision: str):
  model = build_model("mini_cnn", num_classes=NUM_CLASSES, in_channels=1, resolution=28)
  return create_train_state(model, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, seed=seed,
                            optimizer="sgd", momentum=0.9, precision=precision)


def time_steps(step, state, batches, args, budget_s: float):
  """``(warm-up s, [seconds per round])`` of ``state, metrics = step(state, batch)``."""
  start = time.perf_counter()
  metrics = None
  for i in range(args.warmup):
    state, metrics = step(state, batches[i % N_BATCHES])
  jax.block_until_ready((state, metrics))
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(args.rounds):
    if times and elapsed() >= budget_s:
      print(f"  budget spent: keeping {len(times)} of {args.rounds} rounds", flush=True)
      break
    start = time.perf_counter()
    for i in range(args.steps):
      state, metrics = step(state, batches[i % N_BATCHES])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  loss = np.asarray(metrics["loss_sum"]) / np.maximum(np.asarray(metrics["count"]), 1.0)
  return warmup_s, times, loss


def run_k(k: int, batches, args) -> dict:
  start = time.perf_counter()
  cohort = co.stack([new_state(seed, args.precision) for seed in range(k)])
  lrs = np.geomspace(1e-3, 0.3, k) if k > 1 else np.array([0.05])
  cohort = co.with_learning_rates(cohort, lrs.astype(np.float32))
  jax.block_until_ready(cohort)
  build_s = time.perf_counter() - start
  warmup_s, times, loss = time_steps(co.cohort_train_step, cohort, batches, args, args.budget_s)
  del cohort
  return summary(f"cohort K={k}", k, args, times, warmup_s, build_s, loss)


def run_solo(batches, args) -> dict:
  start = time.perf_counter()
  state = new_state(0, args.precision)
  jax.block_until_ready(state)
  build_s = time.perf_counter() - start
  warmup_s, times, loss = time_steps(train_step, state, batches, args, args.budget_s)
  return summary("solo train_step", 1, args, times, warmup_s, build_s, np.atleast_1d(loss))


def summary(name, k, args, times, warmup_s, build_s, loss) -> dict:
  rates = [args.steps * args.batch / t for t in times]  # per member
  return {"name": name, "k": k, "batch": args.batch, "steps": args.steps, "rounds": len(times),
          "round_s": times, "step_ms_median": statistics.median(times) / args.steps * 1e3,
          "member_samples_per_s_median": statistics.median(rates),
          "member_samples_per_s_min": min(rates), "member_samples_per_s_max": max(rates),
          "cohort_samples_per_s_median": k * statistics.median(rates),
          "warmup_s": warmup_s, "build_s": build_s,
          "final_loss_min": float(np.nanmin(loss)), "final_loss_max": float(np.nanmax(loss)),
          "finite": bool(np.isfinite(loss).all())}


def ratio_to_k1(r: dict, results: list[dict]) -> float | None:
  base = [x for x in results if x["name"] == "cohort K=1"]
  if not base:
    return None
  return r["cohort_samples_per_s_median"] / base[0]["cohort_samples_per_s_median"]


def result_line(r: dict, results: list[dict]) -> str:
  ratio = ratio_to_k1(r, results)
  ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
  return (f"{r['name']:16s} step {r['step_ms_median']:8.2f} ms | per member samples/s "
          f"{r['member_samples_per_s_median']:10.1f} (min {r['member_samples_per_s_min']:.1f} max "
          f"{r['member_samples_per_s_max']:.1f}) | cohort {r['cohort_samples_per_s_median']:11.1f} "
          f"member-samples/s, {ratio_text} K=1 | build {r['build_s']:.2f}s warm-up "
          f"{r['warmup_s']:.2f}s | loss {r['final_loss_min']:.3f}-{r['final_loss_max']:.3f}"
          f"{'' if r['finite'] else ' NON-FINITE'}")


def table(results: list[dict], env: dict, args) -> str:
  rows = [f"{env['device_kind']}, backend {env['backend']}, jax {env['jax']}, {env['date']}: "
          f"MiniCNN 28x28x1, batch {args.batch}, {args.precision}, median (min-max) of "
          f"{args.rounds} rounds of {args.steps} steps.", "",
          "| run | step ms | per-member samples/s | min-max | member-samples/s | x K=1 |",
          "|---|---|---|---|---|---|"]
  for r in results:
    ratio = ratio_to_k1(r, results)
    rows.append(f"| {r['name']} | {r['step_ms_median']:.2f} | "
                f"{r['member_samples_per_s_median']:,.0f} | "
                f"{r['member_samples_per_s_min']:,.0f}-{r['member_samples_per_s_max']:,.0f} | "
                f"{r['cohort_samples_per_s_median']:,.0f} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} |")
  return "\n".join(rows)


def target_line(results: list[dict]) -> str:
  k, want = TARGET
  got = [ratio_to_k1(r, results) for r in results if r["name"] == f"cohort K={k}"]
  if not got or got[0] is None:
    return f"target: K={k} >= {want}x K=1's throughput: not measured (needs K=1 and K={k})"
  verdict = "met" if got[0] >= want else "MISSED"
  text = f"target: K={k} >= {want}x K=1's throughput: {got[0]:.2f}x {verdict}"
  solo = [r for r in results if r["name"] == "solo train_step"]
  cohort = [r for r in results if r["name"] == f"cohort K={k}"][0]
  if solo:
    ratio = cohort["cohort_samples_per_s_median"] / solo[0]["cohort_samples_per_s_median"]
    text += f" ({ratio:.2f}x the solo train_step's)"
  return text


def write_json(path, env, args, results, failures) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  payload = {"environment": env, "argv": sys.argv[1:], "batch": args.batch, "steps": args.steps,
             "rounds": args.rounds, "precision": args.precision, "budget_s": args.budget_s,
             "elapsed_s": elapsed(), "results": [{**r, "ratio_to_k1": ratio_to_k1(r, results)}
                                                 for r in results],
             "failures": failures}
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)


def main(argv=None) -> int:
  args = parse_args(argv)
  env = environment()
  print(f"device {env['device_kind']} x{env['device_count']}, backend {env['backend']}, "
        f"jax {env['jax']} (jaxlib {env['jaxlib']}), python {env['python']}", flush=True)
  print(f"MiniCNN 28x28x1 batch={args.batch} ks={args.ks} steps={args.steps} rounds={args.rounds} "
        f"warmup={args.warmup} precision={args.precision} budget={args.budget_s:.0f}s", flush=True)
  batches = make_batches(args.batch)
  results, failures = [], []
  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    cases = [(f"K={k}", k) for k in args.ks]
    if args.solo:  # after K=1, so that its line shows the ratio
      cases.insert(1 if args.ks[0] == 1 else 0, ("solo", None))
    for name, k in cases:
      if elapsed() >= args.budget_s:
        print(f"[{name}] budget of {args.budget_s:.0f}s spent after {elapsed():.0f}s: skipped",
              flush=True)
        failures.append({"name": name, "error": "skipped: budget"})
        continue
      try:
        r = run_solo(batches, args) if k is None else run_k(k, batches, args)
      except Exception as e:  # one failing K (e.g. out of memory) must not stop the others
        print(f"[{name}] FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
        failures.append({"name": name, "error": f"{type(e).__name__}: {e}"})
        continue
      results.append(r)
      print(result_line(r, results), flush=True)
      write_json(args.json, env, args, results, failures)
  except Interrupted as e:
    print(f"stopped by {e} after {elapsed():.1f}s; remaining K not run", flush=True)
    failures.append({"name": "-", "error": f"stopped by {e}"})
  print("\n" + table(results, env, args) + "\n")
  print(target_line(results))
  print(f"done in {elapsed():.1f}s: {len(results)} results, {len(failures)} failed or skipped",
        flush=True)
  write_json(args.json, env, args, results, failures)
  return 1 if any(not f["error"].startswith("skipped") for f in failures) else 0


if __name__ == "__main__":
  sys.exit(main())
