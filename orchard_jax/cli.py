"""The ``orchard-jax`` command: Optuna studies (or single training runs) from YAML recipes.

::

  orchard-jax run [RECIPE] [--set key.path=value ...] [--output DIR] [--workers N|all]
  orchard-jax worker [RECIPE] [--storage URL] [--set ...] [--output DIR] [--heartbeat S] ...
  orchard-jax init [PATH]
  orchard-jax schema
  orchard-jax validate [RECIPE] [--set key.path=value ...]
  orchard-jax evaluate RUN [--tta|--no-tta]
  orchard-jax export RUN

``run`` without a recipe runs the bundled default (a small study of MiniCNN
on scikit-learn's digits); with ``--workers`` it runs one worker process per
local device (:mod:`orchard_jax.study.launch`). After the search it trains
the best configuration, evaluates it on the test split and exports it
(``--final``; ``evaluate`` and ``export`` run those phases alone:
:mod:`orchard_jax.study.phases`). ``worker`` joins a study in
a shared storage, e.g. PostgreSQL, from any number of machines
(:mod:`orchard_jax.study.workers`). ``validate`` checks a recipe in full
without training or writing anything (:mod:`orchard_jax.study.validate`).
Recipe errors (a storage URL that cannot be opened included) stop before
any training with a one-line message on stderr and exit status 2; a storage
that fails (a full disk) stops with one line and exit status 1; Ctrl-C
exits with 130 and SIGTERM with 143 after writing what finished (see
:mod:`orchard_jax.study.runner`).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import pathlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

PROG = "orchard-jax"
EXIT_RECIPE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def _parser() -> argparse.ArgumentParser:
  from orchard_jax._version import __version__  # not JAX: --help and init answer at once

  from orchard_jax.cli_phases import add_commands, add_run_options  # argparse only
  parser = argparse.ArgumentParser(
      prog=PROG, description="Optuna hyperparameter studies on JAX from YAML recipes.",
      epilog=f"Start with '{PROG} run' (the bundled digits study) or '{PROG} init' "
             f"(write the default recipe to edit).")
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  run = commands.add_parser(
      "run", help="run a study (or, without an optuna section, one training run)",
      description="Run the study a recipe describes; a recipe without an 'optuna' section "
                  "(such as a study's best_config.yaml) is a single training run that reports "
                  "validation and test metrics. Running the same command again resumes an "
                  "interrupted study.")
  _recipe_arguments(run, "YAML recipe (default: the bundled recipe, digits + MiniCNN)",
                    "override a recipe value, e.g. --set optuna.n_trials=20 (repeatable; VALUE "
                    "is read as YAML)")
  _output_argument(run, "run folder (default: telemetry.output_dir, else outputs/<study_name>, "
                        "or outputs/train for a single run)")
  run.add_argument("--workers", metavar="N|all",
                   help="run the study with N worker processes, one per local device (GPU, TPU "
                        "chip; on CPU, N single-device processes), 'all' for one per device; "
                        "they share <run folder>/study.journal, or the recipe's database URL")
  _debug_argument(run, "show Python tracebacks of unexpected errors and of warnings (e.g. a "
                       "checkpoint that could not be written), and debug log lines")
  add_run_options(run)
  run.set_defaults(func=_run)
  _worker_parser(commands)
  add_commands(commands, _debug_argument, _setup)
  validate = commands.add_parser(
      "validate", help="check a recipe in full without training",
      description="Check a recipe without training or writing anything: it parses, its data "
                  "source loads, and its model -- for a study, every boundary configuration of "
                  "the search space: each model of the pool, the smallest and largest batch "
                  "size and dropout, each choice of the other parameters -- builds, initialises "
                  "on an input shaped like the data and gives logits of shape (batch, "
                  "num_classes) (traced with jax.eval_shape: nothing is compiled). Exit status "
                  "0 when it is valid, 2 with the problem in one line.")
  _recipe_arguments(validate)
  _debug_argument(validate, "show Python tracebacks of unexpected errors")
  validate.set_defaults(func=_validate)
  init = commands.add_parser("init", help="write the commented default recipe",
                             description="Write the bundled, commented default recipe to PATH.")
  init.add_argument("path", nargs="?", default="recipe.yaml", metavar="PATH",
                    help="where to write it (default: recipe.yaml)")
  init.add_argument("--force", action="store_true", help="overwrite an existing file")
  init.set_defaults(func=_init)
  schema = commands.add_parser(
      "schema", help="print the recipe's JSON Schema",
      description="Print the JSON Schema of recipes (built from the recipe's models) to stdout. "
                  "'init' writes it next to the recipe as recipe.schema.json, which the "
                  "recipe's first line names for YAML editors (the YAML language server).")
  schema.set_defaults(func=_schema)
  return parser


def _recipe_arguments(parser: Any, recipe_help: str = "YAML recipe (default: the bundled recipe)",
                      set_help: str = "override a recipe value (repeatable), as for run") -> None:
  """RECIPE and --set, as every command that reads a recipe takes them."""
  parser.add_argument("recipe", nargs="?", metavar="RECIPE", help=recipe_help)
  parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help=set_help)


def _output_argument(parser: Any, help_text: str) -> None:
  """--output DIR: the run folder."""
  parser.add_argument("--output", metavar="DIR", help=help_text)


def _debug_argument(parser: Any, help_text: str) -> None:
  """--debug: tracebacks (and, where the command logs, debug log lines)."""
  parser.add_argument("--debug", action="store_true", help=help_text)


def _worker_parser(commands: Any) -> None:
  worker = commands.add_parser(
      "worker", help="join a study in a shared database and run its trials",
      description="Join the recipe's study in a storage shared by several processes or machines "
                  "(created if it does not exist) and run trials until optuna.n_trials trials "
                  "are done across all workers. Start one per machine (or per device, with "
                  "CUDA_VISIBLE_DEVICES). A worker that dies mid-trial stops beating; after the "
                  "grace period its trial is marked FAIL and a live worker retries it. SIGTERM "
                  "stops at once (the trial is retried elsewhere), exit status 143.")
  _recipe_arguments(worker)
  worker.add_argument("--storage", metavar="URL",
                      help="the shared study storage: postgresql://user:password@host:5432/db, "
                           "mysql+pymysql://..., sqlite:///path or journal:///path (default: "
                           "optuna.storage, which must then be one of those)")
  _output_argument(worker, "this worker's run folder: trial checkpoints and, at the end, the "
                           "study's outputs (default as for run)")
  worker.add_argument("--name", metavar="NAME",
                      help="the worker's name in logs and in each trial's 'worker' attribute "
                           "(default: host:pid)")
  worker.add_argument("--heartbeat", type=int, default=30, metavar="S",
                      help="seconds between heartbeats of the running trial (default 30)")
  worker.add_argument("--grace", type=int, default=120, metavar="S",
                      help="seconds without a heartbeat before a trial counts as lost, is "
                           "marked FAIL and retried (default 120)")
  worker.add_argument("--max-retry", type=int, default=2, metavar="N",
                      help="retries of one lost trial (default 2)")
  worker.add_argument("--no-outputs", action="store_true",
                      help="write only trial checkpoints, not the study's outputs (run "
                           "--workers writes those once)")
  _debug_argument(worker, "show Python tracebacks of unexpected errors and of warnings, and "
                          "debug log lines")
  # started by run --workers on a study it has just opened: a restarting server is waited out
  worker.add_argument("--launched", action="store_true", help=argparse.SUPPRESS)
  worker.set_defaults(func=_worker)


def _validate(args: argparse.Namespace) -> int:
  from orchard_jax.study.validate import validate_recipe

  result = validate_recipe(args.recipe, args.sets)
  print(f"{args.recipe or 'The bundled recipe'} is valid: {result.summary()}")
  return 0


def _configure_logging(level: str, prefix: str = "", debug: bool = False) -> None:
  import optuna

  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
  package = logging.getLogger("orchard_jax")
  package.handlers[:] = [handler]
  package.setLevel(level)
  if debug:  # its debug lines, and the tracebacks of warnings that have one
    package.setLevel(logging.DEBUG)
  package.propagate = False
  # The runner logs one line per trial; the engine's per-trial start and summary would repeat it.
  for name in ("orchard_jax.engine.start", "orchard_jax.engine.trial"):
    logging.getLogger(name).setLevel(max(package.level, logging.WARNING))
  optuna.logging.set_verbosity(optuna.logging.ERROR)  # the runner logs each trial itself
  logging.getLogger("absl").setLevel(logging.WARNING)
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _compilation_cache(path: str | None) -> None:
  """Turns on JAX's persistent compilation cache and orchard_jax's executable cache.

  ``path`` (or ``JAX_COMPILATION_CACHE_DIR`` when set) holds JAX's cache;
  its ``executables/`` subdirectory holds whole compiled steps, which a later
  process loads without tracing (:mod:`orchard_jax.engine.executables`).
  """
  if path is None:
    return
  import jax
  from orchard_jax.engine import executables
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    # A run compiles a few dozen small programs; cache them all, not only those over 1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  executables.set_cache_dir(os.path.join(path, "executables"))


def _run_dir(recipe, output: str | None) -> pathlib.Path:
  if output is not None:
    return pathlib.Path(output)
  if recipe.telemetry.output_dir is not None:
    return pathlib.Path(os.path.expanduser(recipe.telemetry.output_dir))
  name = recipe.study.config.study_name if recipe.study is not None else "train"
  return pathlib.Path("outputs") / name


def _describe(source) -> str:
  splits = getattr(source, "splits", None)
  sizes = "" if splits is None else " (" + ", ".join(
      f"{len(y)} {name}" for name, (_, y) in splits.items()) + ")"
  shape = "x".join(map(str, source.input_shape))
  return f"{source.name}{sizes}, inputs {shape}, {source.num_classes} classes"


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
  """The validated recipe and its data source."""
  from orchard_jax.study.build import architecture_for, model_for
  from orchard_jax.study.recipe import load_recipe
  from orchard_jax.study.sources import load_source

  recipe = load_recipe(args.recipe, args.sets)
  source = load_source(recipe.dataset, batch_size=recipe.training.batch_size,
                       seed=recipe.training.seed)
  function = recipe.architecture.function  # named as the recipe gives it
  model_for(architecture_for(recipe, {}), source,  # bad architecture options fail here
            where=None if function is None else f"architecture.function {function!r}")
  if recipe.study is not None and recipe.study.enable_model_search:
    from orchard_jax.study.sources import resolve_function
    from orchard_jax.study.model_names import model_function
    for name in recipe.study.model_pool or ():  # every model of the pool, functions included
      where = f"optuna.model_pool {name!r}"
      if model_function(name) is not None:
        resolve_function(model_function(name), where)
      model_for(architecture_for(recipe, {"model_name": name}), source, where=where)
  if getattr(args, "freeze_imports", False):
    # The modules and the data live until the process ends: kept out of the
    # cycle collector's full passes, which would otherwise walk them again
    # and again (about 0.5 s of a study's wall time; see console()).
    gc.freeze()
  return recipe, source


def _setup(recipe: Any, prefix: str = "", debug: bool = False) -> None:
  """Process-wide settings, made only once the recipe (and storage) are good."""
  _configure_logging(recipe.telemetry.log_level, prefix, debug)
  _compilation_cache(recipe.telemetry.compilation_cache)


def _recipe_args(args: argparse.Namespace) -> list[str]:
  """The recipe path and --set options, as given, for worker processes."""
  return [*([args.recipe] if args.recipe else []), *(x for s in args.sets for x in ("--set", s))]


def _run(args: argparse.Namespace) -> int:
  from orchard_jax.study.checks import RecipeError

  workers = None
  if args.workers is not None:
    from orchard_jax.study.launch import parse_workers
    workers = parse_workers(args.workers)
  recipe, source = _load(args)
  if args.workers is not None and (recipe.study is None or args.keep_checkpoints):
    raise RecipeError("--workers runs a study, but the recipe has no optuna section" if
                      recipe.study is None else "--keep-checkpoints does not apply to --workers")
  from orchard_jax.study.phases import check_phases, final_phases, run_recipe
  check_phases(recipe, source)  # what would fail after training fails before it
  _setup(recipe, debug=args.debug)
  run_dir = _run_dir(recipe, args.output)
  logger = logging.getLogger("orchard_jax.cli")
  if args.workers is not None:
    from orchard_jax.study.launch import launch_workers
    status = launch_workers(recipe, run_dir, workers, _recipe_args(args), debug=args.debug)
    return status or final_phases(recipe, source, run_dir, args)
  if recipe.study is None:
    logger.info("Training %s on %s -> %s", recipe.architecture.name, _describe(source), run_dir)
    return run_recipe(recipe, source, run_dir, args)
  from orchard_jax.study.runner import run_study, storage_url
  from orchard_jax.study.space import build_space
  config = recipe.study.config
  space = build_space(recipe.study, source.input_shape, recipe.architecture.name)
  logger.info("Study %r: %d trials of %d epochs, %s preset, %s sampler, pruning %s, on %s -> %s; "
              "searching %s", config.study_name, config.n_trials, config.epochs,
              config.search_space_preset, config.sampler_type,
              config.pruner if config.enable_pruning else "off", _describe(source), run_dir,
              space.describe())
  url = storage_url(config.storage, run_dir)
  if url is not None and url.startswith(("sqlite:", "journal:")):
    logger.info("Storage %s (optuna-dashboard %s)", url, url.replace("journal://", ""))
  return (run_study(recipe, source, run_dir, keep_checkpoints=args.keep_checkpoints)
          or final_phases(recipe, source, run_dir, args))


def _worker(args: argparse.Namespace) -> int:
  from orchard_jax.study.checks import RecipeError
  from orchard_jax.study.storage import Heartbeat
  from orchard_jax.study.workers import default_name, join_study, run_worker

  heartbeat = Heartbeat(args.heartbeat, args.grace, args.max_retry)
  name = args.name or default_name()
  recipe, source = _load(args)
  if recipe.study is None:
    raise RecipeError("worker runs a study, but the recipe has no optuna section")
  url = args.storage or recipe.study.config.storage
  if url in ("sqlite", "memory"):
    raise RecipeError(f"worker needs a storage shared with the other workers: --storage "
                      f"postgresql://user:password@host/db (or mysql+pymysql://..., "
                      f"sqlite:///path, journal:///path), or such a URL in optuna.storage; "
                      f"got {url!r}")
  from orchard_jax.study.validate import validate
  validate(recipe, source)  # run's checks: a recipe validate refuses joins no study
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in RDB ..."
  joined = join_study(recipe, url, heartbeat, "--storage" if args.storage else "optuna.storage",
                      patient=args.launched)
  _setup(recipe, prefix=f"[{name}] ", debug=args.debug)
  return run_worker(recipe, source, _run_dir(recipe, args.output), joined, name=name,
                    write_outputs=not args.no_outputs)


def _init(args: argparse.Namespace) -> int:
  # Not orchard_jax.study (optuna, JAX): orchard_jax.bundled reads the same files without it.
  from orchard_jax import bundled
  from orchard_jax.config import ConfigError

  from orchard_jax.fileio import atomic_write_text

  path = pathlib.Path(args.path)
  try:
    if path.exists() and not args.force:
      raise ConfigError(f"{path} exists; use --force to overwrite it")
    if path.parent != pathlib.Path("") and not path.parent.is_dir():
      raise ConfigError(f"folder {path.parent} does not exist")
  except OSError as e:  # a folder on the way that cannot be searched
    raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
  # The recipe's first line names the schema, for editors: the schema is written first.
  for file, text in ((path.parent / bundled.SCHEMA_FILE, bundled.schema_text()),
                     (path, bundled.recipe_text())):
    try:
      atomic_write_text(file, text)
    except OSError as e:  # a read-only folder, a full disk, no permission
      raise ConfigError(f"cannot write {file}: {e.strerror or e}") from None
  print(f"Wrote {path} (and {bundled.SCHEMA_FILE} beside it, its schema for editors); edit it, "
        f"then run: {PROG} run {path}")
  return 0


def _schema(args: argparse.Namespace) -> int:
  from orchard_jax.study.schema import schema_json

  sys.stdout.write(schema_json())
  return 0


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def main(argv: Sequence[str] | None = None, *, freeze_imports: bool = False) -> int:
  """Entry point of the ``orchard-jax`` command; returns the exit status.

  ``freeze_imports=True`` (what the installed command passes, see
  :func:`console`) moves every object that exists once the recipe and data
  are loaded -- the imported modules above all -- out of the cycle
  collector's reach (``gc.freeze``). A program that calls ``main`` itself
  keeps its collector as it is.
  """
  parser = _parser()
  args = parser.parse_args(argv)
  args.freeze_imports = freeze_imports
  if args.command is None:
    parser.print_help(sys.stderr)
    return EXIT_RECIPE
  from orchard_jax.config import ConfigError
  from orchard_jax.errors import StorageFault

  try:
    return args.func(args)
  except ConfigError as e:  # RecipeError included: a bad recipe, data source or setting
    user_error = getattr(e, "user_error", None)  # raised in the user's data or model function
    debug = getattr(args, "debug", False)
    if user_error is not None and debug:
      import traceback
      traceback.print_exception(user_error, file=sys.stderr)
    hint = " (run with --debug for its traceback)" if user_error is not None and not debug else ""
    print(f"{PROG}: error: {_one_line(e)}{hint}", file=sys.stderr)
    return EXIT_RECIPE
  except StorageFault as e:  # what could not be stored is retried by the next run
    print(f"{PROG}: error: {_one_line(e)}; what it could not store is retried by the next run "
          f"of the same command", file=sys.stderr)
    return EXIT_FAILED
  except KeyboardInterrupt:
    print(f"\n{PROG}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as e:  # pylint: disable=broad-except
    if getattr(args, "debug", False):
      raise
    print(f"{PROG}: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the "
          f"traceback)", file=sys.stderr)
    return EXIT_FAILED


def console(argv: Sequence[str] | None = None) -> int:
  """The installed ``orchard-jax`` command: :func:`main`, with the tuned allocator and less
  garbage collection.

  The command is a program, so it makes the process-wide choices a library
  import must not: first glibc's allocator keeps freed memory
  (:func:`orchard_jax.hostmem.tune_host_memory`; ``ORCHARD_JAX_MALLOC=system``
  leaves it alone, another value is a one-line error).

  Python's cycle collector walks every live object in its full passes, and
  the imports (JAX, torch, optuna, matplotlib) make millions of them. On 2 CPU
  cores that cost the bundled study about 1.4 s during the run and 1.7 s more
  when the interpreter exits (``benchmarks/gc_freeze.py``: 0.87 s and 0.20 s
  frozen). So the command freezes the collector's objects
  (``gc.freeze``) twice: once the recipe and data are loaded
  (``freeze_imports``), and when :func:`main` returns, by which time every
  output is written and closed. ``atexit`` handlers, ``weakref.finalize``
  callbacks and the flush of stdout and stderr still run at exit; only cyclic
  garbage is left unreclaimed, as the process ends anyway. :func:`main`
  itself, which tests and embedding programs call, leaves the collector alone.
  """
  from orchard_jax.hostmem import tune_host_memory
  try:
    tune_host_memory()
  except ValueError as e:  # an ORCHARD_JAX_MALLOC that is neither tuned nor system
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return EXIT_RECIPE
  status = main(argv, freeze_imports=True)
  gc.freeze()
  return status


if __name__ == "__main__":
  sys.exit(console())
