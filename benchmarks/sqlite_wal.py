"""A study's storage calls: SQLite with a rollback journal (its default) or the write-ahead log,
and Optuna's journal file.

orchard_jax opens a study's SQLite file in write-ahead-log mode with
``synchronous=NORMAL`` (``orchard_jax.study.storage.write_ahead``); ``journal:``
URLs (and ``run --workers``) use Optuna's journal file. This times the calls a
trial makes, through Optuna on a real file in a temporary folder of the
filesystem given (``--dir``, default the system's temporary folder):
per trial an ask, one ``suggest_float``, ``--epochs`` epochs of ``report`` +
``should_prune`` (the median pruner) + one ``set_user_attr``, and a tell.
The three run in one process, rotating between rounds, each on a new file;
printed: milliseconds per call (median over rounds) and the ratios to the
rollback journal.

  python benchmarks/sqlite_wal.py [--trials 20] [--epochs 10] [--rounds 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import optuna
import sqlalchemy

CALLS = ("ask", "report", "should_prune", "set_user_attr", "tell")
MODES = ("rollback", "wal", "journal")


def _storage(path: str, mode: str) -> optuna.storages.BaseStorage:
  from orchard_jax.study.storage import open_storage  # the project's own opening
  if mode == "wal":
    return open_storage(f"sqlite:///{path}")
  if mode == "journal":
    return open_storage(f"journal:///{path}.journal")
  storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
  with storage.engine.connect() as connection:
    mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
  assert mode == "delete", mode
  return storage


def one_round(mode: str, trials: int, epochs: int, folder: str) -> dict[str, float]:
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    storage = _storage(f"{tmp}/study.db", mode)
    study = optuna.create_study(storage=storage, direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=4))
    seconds = dict.fromkeys(CALLS, 0.0)

    def timed(name, fn, *args):
      start = time.perf_counter()
      out = fn(*args)
      seconds[name] += time.perf_counter() - start
      return out

    for _ in range(trials):
      trial = timed("ask", study.ask)
      x = trial.suggest_float("x", 0.0, 1.0)
      for epoch in range(epochs):
        timed("report", trial.report, x * (epoch + 1) / epochs, epoch)
        timed("should_prune", trial.should_prune)
        timed("set_user_attr", trial.set_user_attr, f"epoch_{epoch}", epoch)
      timed("tell", study.tell, trial, x)
    if isinstance(storage, optuna.storages.RDBStorage):
      storage.engine.dispose()
    per = {"ask": trials, "tell": trials}
    return {name: 1e3 * s / per.get(name, trials * epochs) for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dir", default=None, help="folder of the study files (default: $TMPDIR)")
  args = parser.parse_args(argv)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
  for r in range(args.rounds):
    for mode in MODES[r % 3:] + MODES[:r % 3]:
      results[mode].append(one_round(mode, args.trials, args.epochs, args.dir))
  print(f"sqlite_wal: {args.trials} trials x {args.epochs} epochs, {args.rounds} rounds, "
        f"sqlalchemy {sqlalchemy.__version__}, optuna {optuna.__version__}; ms per call "
        f"(median)")
  print(f"  {'call':15s} {'rollback':>9s} {'WAL':>9s} {'journal':>9s} {'WAL/rb':>8s} "
        f"{'journal/rb':>11s}")
  for name in CALLS:
    rollback, wal, journal = (statistics.median(r[name] for r in results[mode])
                              for mode in MODES)
    print(f"  {name:15s} {rollback:9.2f} {wal:9.2f} {journal:9.2f} {wal / rollback:8.2f} "
          f"{journal / rollback:11.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
