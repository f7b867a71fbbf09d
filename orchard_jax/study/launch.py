"""One trial per device: ``orchard-jax run --workers N`` starts N workers on this machine.

Each worker is an ``orchard-jax worker`` process (see
:mod:`orchard_jax.study.workers`) that sees only its own device:

========  =================================================================================
platform  what worker ``i`` is given
========  =================================================================================
gpu       ``CUDA_VISIBLE_DEVICES`` and ``HIP_VISIBLE_DEVICES``: the i-th visible GPU
tpu       ``TPU_VISIBLE_CHIPS=i`` (and ``TPU_VISIBLE_DEVICES``), one-chip process bounds
          and a port of its own
cpu       ``XLA_FLAGS`` without ``--xla_force_host_platform_device_count``: one CPU device
========  =================================================================================

The launcher itself never opens an accelerator: a short probe subprocess
counts the local devices (``--workers all`` starts one worker per device or
TPU chip). All workers share one study: the recipe's database URL, or, for
``storage: sqlite``, Optuna's journal file ``<run folder>/study.journal``
(SQLite is not safe for several processes). The workers write trial
checkpoints to ``<run folder>/trials``; the launcher writes the study's
outputs once they are all done, as a single ``run`` does.

A worker that dies (a crash, SIGKILL) has its running trial marked FAIL and
its parameters enqueued again, so a live worker retries it. SIGINT and
SIGTERM are forwarded to every worker (they run in their own sessions, so a
terminal's Ctrl-C reaches them once, through the launcher). Exit status: 0
with a best trial; 1 without one, or when workers died before the study was
done; 130 after Ctrl-C; 143 after SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from orchard_jax.study.callbacks import StopSignals
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.outputs import RETRY_OF, write_study_outputs
from orchard_jax.study.runner import _warn_if_changed, finished_count, open_study
from orchard_jax.study.storage import storage_url
from orchard_jax.study.workers import WORKER, budget_used

logger = logging.getLogger(__name__)

__all__ = ["device_env", "launch_workers", "parse_workers", "probe_devices"]

TPU_PORT = 8476
_PROBE = ("import json, jax; d = jax.local_devices(); print('PROBE' + json.dumps({'platform': "
          "d[0].platform, 'devices': len(d), 'chips': len({tuple(getattr(x, 'coords', None) or "
          "(x.id,)) for x in d})}))")
_FORCED = re.compile(r"--xla_force_host_platform_device_count=\S*")


def parse_workers(text: str) -> int | None:
  """``--workers``: a count >= 1, or ``all`` (None: one per local device)."""
  if text == "all":
    return None
  if not text.isdigit() or int(text) < 1:
    raise RecipeError(f"--workers must be a number of worker processes >= 1 or 'all', got {text!r}")
  return int(text)


def probe_devices(env: Mapping[str, str]) -> tuple[str, int]:
  """(platform, local device count; TPU chips on TPU), from a subprocess that exits after."""
  proc = subprocess.run([sys.executable, "-c", _PROBE], env=dict(env), capture_output=True,
                        text=True, timeout=300)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("PROBE")]
  if proc.returncode or not lines:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"cannot list the local JAX devices: {last}")
  found = json.loads(lines[-1][len("PROBE"):])
  return found["platform"], found["chips" if found["platform"] == "tpu" else "devices"]


def device_env(base: Mapping[str, str], index: int, platform: str) -> dict[str, str]:
  """The environment of worker ``index``: only its device is visible."""
  env = dict(base)
  if platform == "gpu":
    visible = (base.get("CUDA_VISIBLE_DEVICES") or base.get("HIP_VISIBLE_DEVICES") or "").split(",")
    visible = [v.strip() for v in visible if v.strip()]
    device = visible[index] if visible else str(index)
    env["CUDA_VISIBLE_DEVICES"] = env["HIP_VISIBLE_DEVICES"] = device
  elif platform == "tpu":
    port = str(TPU_PORT + index)
    env.update(TPU_VISIBLE_CHIPS=str(index), TPU_VISIBLE_DEVICES=str(index),
               TPU_CHIPS_PER_PROCESS_BOUNDS="1,1,1", TPU_PROCESS_BOUNDS="1,1,1",
               TPU_PROCESS_PORT=port, TPU_PROCESS_ADDRESSES=f"localhost:{port}",
               TPU_MESH_CONTROLLER_ADDRESS=f"localhost:{port}", TPU_MESH_CONTROLLER_PORT=port,
               CLOUD_TPU_TASK_ID="0")
  else:
    flags = " ".join(_FORCED.sub("", base.get("XLA_FLAGS", "")).split())
    env.pop("JAX_NUM_CPU_DEVICES", None)
    if flags:
      env["XLA_FLAGS"] = flags
    else:
      env.pop("XLA_FLAGS", None)
  return env


def _worker_count(requested: int | None, platform: str, available: int) -> int:
  if requested is None:
    return available
  if platform != "cpu" and requested > available:
    unit = "TPU chips" if platform == "tpu" else f"{platform} devices"
    raise RecipeError(f"--workers {requested}: this machine has {available} {unit}; use at most "
                      f"{available} (one worker per device) or --workers all")
  return requested


def reclaim(study: optuna.Study, name: str, returncode: int) -> list[int]:
  """Fails the running trials of a worker that exited and enqueues their parameters again."""
  numbers = []
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    if t.user_attrs.get(WORKER) == name:
      study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
      study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number})
      numbers.append(t.number)
  if numbers:
    logger.warning("Worker %s exited with status %d during trial(s) %s: marked FAIL, their "
                   "parameters are enqueued again", name, returncode, numbers)
  return numbers


class _Forward(StopSignals):
  """Forwards SIGINT/SIGTERM to the workers; remembers the last one."""

  def __init__(self, procs: Sequence[subprocess.Popen]):
    self.procs, self.signum = procs, None

  def _handle(self, signum: int, frame: Any) -> None:
    self.signum = signum
    for proc in self.procs:
      if proc.poll() is None:
        proc.send_signal(signum)


def _command(recipe_args: Sequence[str], url: str, run_dir: pathlib.Path, name: str,
             debug: bool) -> list[str]:
  return [sys.executable, "-m", "orchard_jax.cli", "worker", *recipe_args, "--storage", url,
          "--output", str(run_dir.absolute()), "--name", name, "--no-outputs",
          *(["--debug"] if debug else [])]


def launch_workers(recipe: Any, run_dir: pathlib.Path, workers: int | None,
                   recipe_args: Sequence[str], *, debug: bool = False, out: Any = None) -> int:
  """Runs the recipe's study with one worker process per local device; returns the exit status.

  ``recipe_args`` are the worker's arguments that name the recipe (its path
  and ``--set`` options), exactly as the launcher was given them.
  """
  out = out or sys.stdout
  config = recipe.study.config
  platform, available = probe_devices(os.environ)
  count = _worker_count(workers, platform, available)
  url = storage_url(config.storage, run_dir, several=True)
  study = open_study(recipe, url)
  run_dir.mkdir(parents=True, exist_ok=True)
  stored = study.get_trials(deepcopy=False)
  if stored:
    _warn_if_changed(recipe, run_dir / "recipe.yaml")
  if budget_used(stored) >= config.n_trials and not any(
      t.state == TrialState.WAITING for t in stored):
    logger.info("Nothing to run: the study has %d finished trials (optuna.n_trials=%d)",
                finished_count(stored), config.n_trials)
    return 0 if write_study_outputs(study, recipe, run_dir, out=out) is not None else 1
  logger.info("Starting %d worker(s), one per %s device, on study %r in %s", count, platform,
              config.study_name, url)
  names = [f"{platform}{i}" for i in range(count)]
  procs = [subprocess.Popen(_command(recipe_args, url, run_dir, name, debug),
                            env=device_env(os.environ, i, platform), start_new_session=True)
           for i, name in enumerate(names)]
  codes: dict[str, int] = {}
  with _Forward(procs) as forward:
    while len(codes) < len(procs):
      time.sleep(0.2)
      for name, proc in zip(names, procs):
        if name not in codes and proc.poll() is not None:
          codes[name] = proc.returncode
          reclaim(study, name, proc.returncode)
  best = write_study_outputs(study, recipe, run_dir, out=out)
  finished = finished_count(study.get_trials(deepcopy=False))
  if forward.signum is not None:
    cause = "SIGTERM" if forward.signum == signal.SIGTERM else "Ctrl-C"
    print(f"\nStopped by {cause} after {finished}/{config.n_trials} trials; run the same "
          f"command to continue.", file=out)
    return 128 + forward.signum
  failed = {name: code for name, code in codes.items() if code not in (0, 1)}
  if failed and finished < config.n_trials:
    print(f"\nWorker(s) exited abnormally ({', '.join(f'{n}: {c}' for n, c in failed.items())}) "
          f"after {finished}/{config.n_trials} trials; run the same command to continue.",
          file=out)
    return 1
  return 0 if best is not None else 1
