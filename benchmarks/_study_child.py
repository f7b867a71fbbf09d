"""``orchard-jax`` with its training and validation passes timed: the child of study_time.py.

  STUDY_TIME_OUT=/path/out.json python benchmarks/_study_child.py run --output DIR --set ...

Runs :func:`orchard_jax.cli.console` (the installed command) with the given
arguments after wrapping ``orchard_jax.engine.passes._pass``, the one function
that ``train_pass`` and ``validation_pass`` call (by its global name) for every
pass of a solo trial or a cohort, in a ``time.perf_counter`` accumulator. At
exit it writes ``{"pass_s": seconds in passes, "passes": how many, "t0":
time.time() when this file started running, "module": the orchard_jax
package's __init__.py it imported}`` to the JSON path in ``STUDY_TIME_OUT``. The exit status is the command's.
"""

from __future__ import annotations

import time

T0 = time.time()  # before any import that takes time

import atexit  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

OUT = os.environ.get("STUDY_TIME_OUT")
if not OUT:
  raise SystemExit("_study_child.py: set STUDY_TIME_OUT to the JSON file the pass times go to")

import orchard_jax  # noqa: E402
from orchard_jax.cli import console  # noqa: E402
from orchard_jax.engine import passes  # noqa: E402

TOTALS = {"pass_s": 0.0, "passes": 0, "t0": T0, "module": orchard_jax.__file__}


def timed_pass(inner):
  @functools.wraps(inner)
  def wrapper(*args, **kwargs):
    start = time.perf_counter()
    try:
      return inner(*args, **kwargs)
    finally:
      TOTALS["pass_s"] += time.perf_counter() - start
      TOTALS["passes"] += 1
  return wrapper


def write_totals() -> None:
  with open(OUT, "w", encoding="utf-8") as f:
    json.dump(TOTALS, f)


passes._pass = timed_pass(passes._pass)  # pylint: disable=protected-access
atexit.register(write_totals)

if __name__ == "__main__":
  sys.argv[0] = "orchard-jax"
  sys.exit(console())
