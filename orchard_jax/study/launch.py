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

Each launch names its workers uniquely (``cpu0.<launch>``). A worker that
dies (a crash, SIGKILL) has its running trial marked FAIL and its
parameters enqueued again, so a live worker (or the next run) retries it.
SIGINT and SIGTERM are forwarded to every worker (they run in their own
sessions, so a terminal's Ctrl-C reaches them once, through the launcher),
and the kernel sends each worker SIGTERM if the launcher itself dies
(``PR_SET_PDEATHSIG``): no orphans. The launcher owns the run folder as
``run`` does. Exit status: 0 with a best trial; 1 without one; 3 when the
study ends short of ``n_trials`` (workers died, a failure streak); 130
after Ctrl-C; 143 after SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from optuna.trial import TrialState

from orchard_jax.study.budget import budget_used, reclaim_lost
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.ending import exit_status, nothing_to_run
from orchard_jax.study.liveness import RunFolderLock, die_with_parent
from orchard_jax.study.locks import study_lock
from orchard_jax.study.opening import join_study, warn_if_changed
from orchard_jax.study.outputs import write_study_outputs
from orchard_jax.study.signals import StopSignals
from orchard_jax.study.storage import masked, storage_url
from orchard_jax.study.storing import under_lock

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


def reclaim(joined: Any, lock: Any) -> list[int]:
  """Under the study lock: fails the running trials of dead workers, enqueues their
  parameters again (and those of interrupted trials); returns the numbers failed
  (:func:`~orchard_jax.study.budget.reclaim_lost`)."""
  with under_lock(lock, lambda: reclaim_lost(joined.study, joined.liveness, joined.heartbeat),
                  "the trials of dead workers") as lost:
    return lost


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
          "--output", str(run_dir.absolute()), "--name", name, "--no-outputs", "--launched",
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
  joined = join_study(recipe, url, None, "optuna.storage", join=False)
  study = joined.study
  with RunFolderLock(run_dir):
    lock = study_lock(joined.storage, url, config.study_name)
    stored = study.get_trials(deepcopy=False)
    if stored:
      warn_if_changed(recipe, run_dir / "recipe.yaml")
      reclaim(joined, lock)  # what a killed launch left RUNNING is retried, not counted
      stored = study.get_trials(deepcopy=False)
    before = len(stored)
    if budget_used(stored) >= config.n_trials and not any(
        t.state == TrialState.WAITING for t in stored):
      nothing_to_run(stored, config.n_trials)
      return 0 if write_study_outputs(study, recipe, run_dir, out=out,
                                      recipe_ran=False) is not None else 1
    launch = uuid.uuid4().hex[:6]
    logger.info("Starting %d worker(s), one per %s device, on study %r in %s (launch %s)", count,
                platform, config.study_name, masked(url), launch)
    names = [f"{platform}{i}.{launch}" for i in range(count)]
    procs = [subprocess.Popen(_command(recipe_args, url, run_dir, name, debug),
                              env=device_env(os.environ, i, platform), start_new_session=True,
                              preexec_fn=die_with_parent)
             for i, name in enumerate(names)]
    codes: dict[str, int] = {}
    with _Forward(procs) as forward:
      while len(codes) < len(procs):
        time.sleep(0.2)
        for name, proc in zip(names, procs):
          if name not in codes and proc.poll() is not None:
            codes[name] = proc.returncode
            lost = reclaim(joined, lock)
            if lost:
              logger.warning("Worker %s exited with status %d during trial(s) %s: marked FAIL, "
                             "their parameters are enqueued again", name, proc.returncode, lost)
    trials = study.get_trials(deepcopy=False)
    best = write_study_outputs(study, recipe, run_dir, out=out, recipe_ran=len(trials) > before)
    failed = {name: code for name, code in codes.items() if code not in (0, 1)}
    why = (f"worker(s) exited abnormally: {', '.join(f'{n}: {c}' for n, c in failed.items())}"
           if failed else "the workers stopped early")
    return exit_status(trials, recipe, best, out, signum=forward.signum, why=why)
