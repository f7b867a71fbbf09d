"""A throwaway PostgreSQL server for the worker tests, from Debian's packages.

The ``postgres`` fixture finds ``/usr/lib/postgresql/*/bin/initdb`` and
``pg_ctl``, creates a cluster in a temporary folder (as the ``postgres`` user
when run as root: PostgreSQL refuses to run as root), starts it on
127.0.0.1 at a free port with its socket in that folder, and stops it at the
end of the session. Its superuser ``orchard`` has a password (scram-sha-256),
so wrong credentials are refused as on a real server.

Without the binaries (``apt-get install postgresql``) or psycopg2 the tests
that use it are skipped, except under CI (``CI`` set), where they fail.

The worker tests also share, per session, the tiny data set and recipes of
``tests/test_cli.py`` and one JAX compilation cache that a first one-trial run
fills (``warm_env``), so that worker processes running at once do not each
compile the same steps on two cores.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

import numpy as np
import optuna
import pytest

USER, PASSWORD = "orchard", "orchard-test-pw"


def _missing(reason: str) -> None:
  if os.environ.get("CI"):
    pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
  pytest.skip(reason)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Postgres:
  """A running server: ``url(db)``, ``create_database()``, ``port``; ``stop(mode)`` and
  ``start()`` take it down and bring it back (``pg_ctl``), for the faults of a restart."""

  def __init__(self, port: int, pg_ctl: list[str] | None = None, start_options=()):
    self.port, self._pg_ctl, self._start_options = port, pg_ctl, list(start_options)

  def url(self, database: str, password: str = PASSWORD, port: int | None = None) -> str:
    return f"postgresql://{USER}:{password}@127.0.0.1:{port or self.port}/{database}"

  def create_database(self) -> str:
    """A fresh, empty database; returns its URL."""
    import psycopg2
    name = f"t_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER,
                                  password=PASSWORD, dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
      cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return self.url(name)

  def stop(self, mode: str = "fast") -> None:
    """``pg_ctl stop -m <mode>``: ``fast`` ends every session, ``immediate`` kills the server."""
    self._run("-m", mode, "-w", "stop")

  def start(self) -> None:
    self._run(*self._start_options, "-w", "start")

  def _run(self, *args: str) -> None:
    proc = subprocess.run([*self._pg_ctl, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"pg_ctl {' '.join(args)}: {proc.stdout}{proc.stderr}"


def _server(root: pathlib.Path, *, durable: bool = False):
  """A fresh cluster in ``root``, started; yields its :class:`Postgres`, stops it at the end.

  Not ``durable``: commits return before their WAL is written (fast, for servers that only
  stop at the end); ``durable``: a commit survives ``pg_ctl stop -m immediate``, as on a
  production server.
  """
  binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
  if not binaries:
    _missing("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): "
             "apt-get install postgresql")
  try:
    import psycopg2  # noqa: F401
  except ImportError:
    _missing("psycopg2 is not installed: pip install -e '.[postgres]'")
  bindir = pathlib.Path(binaries[-1]).parent
  runas: list[str] = []
  if os.geteuid() == 0:  # PostgreSQL refuses root; the Debian package creates 'postgres'
    try:
      user = pwd.getpwnam("postgres")
    except KeyError:
      _missing("running as root without a 'postgres' user to start PostgreSQL as")
    os.chmod(root, 0o755)
    os.chown(root, user.pw_uid, user.pw_gid)
    runas = ["runuser", "-u", "postgres", "--"]
  data, pwfile, log = root / "data", root / "pw", root / "server.log"
  pwfile.write_text(PASSWORD + "\n")
  if runas:
    shutil.chown(pwfile, "postgres")
  port = _free_port()

  def run(*args: str) -> None:
    proc = subprocess.run([*runas, *args], capture_output=True, text=True, timeout=120)
    if proc.returncode:
      extra = log.read_text()[-2000:] if log.exists() else ""
      pytest.fail(f"{args[0]} failed: {proc.stdout}{proc.stderr}{extra}", pytrace=False)

  run(str(bindir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}",
      "--auth=scram-sha-256", "--no-sync", "-E", "UTF8")
  options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
             f"-c synchronous_commit={'on' if durable else 'off'} -c full_page_writes=off")
  pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data)]
  start_options = ["-o", options, "-l", str(log)]
  run(*pg_ctl, *start_options, "-w", "start")
  try:
    yield Postgres(port, [*runas, *pg_ctl], start_options)
  finally:
    subprocess.run([*runas, *pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True,
                   timeout=60)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
  yield from _server(pathlib.Path(tempfile.mkdtemp(prefix="orchard_pg_")))


@pytest.fixture(scope="module")
def postgres_to_restart():
  """A server of the module's own, which its tests stop and start again (the session's
  ``postgres`` stays up for every other test); durable, so that a crash loses no commit."""
  yield from _server(pathlib.Path(tempfile.mkdtemp(prefix="orchard_pg_")), durable=True)


@pytest.fixture(autouse=True)
def _quiet_optuna():
  """Optuna's own per-trial log lines off (errors still show) during each study test."""
  verbosity = optuna.logging.get_verbosity()
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  yield
  optuna.logging.set_verbosity(verbosity)


# ------------------------------------------------ the command, on tiny data --


def _load_cli_helpers():
  """``tests/test_cli.py`` (its ``synthetic``, ``recipe``, ``COMMAND``), loaded by path."""
  path = pathlib.Path(__file__).parents[1] / "test_cli.py"
  spec = importlib.util.spec_from_file_location("_orchard_test_cli_helpers", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


cli = _load_cli_helpers()
COMMAND, TIMEOUT = cli.COMMAND, cli.TIMEOUT


@pytest.fixture(scope="session")
def command() -> list[str]:
  """The ``orchard-jax`` command (tests/test_cli.py's)."""
  return list(COMMAND)


@pytest.fixture(scope="session")
def make_recipe():
  """tests/test_cli.py's ``recipe(workdir, name, **optuna_keys)``: 4 trials of an MLP on tiny.npz,
  2 epochs each, random sampler over a learning rate that learns and one that does not."""
  return cli.recipe


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("workers")
  arrays = {}
  for split, n, seed in (("train", 96, 0), ("val", 48, 1), ("test", 48, 2)):
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = cli.synthetic(n, seed)
  np.savez(root / "tiny.npz", **arrays)
  return root


@pytest.fixture(scope="session")
def warm_env(workdir) -> dict:
  """The environment of the command's subprocesses, with a filled compilation cache."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("XLA_FLAGS", None)
  path = cli.recipe(workdir, "warmup", n_trials=1, storage="memory", save_plots=False)
  proc = subprocess.run([*cli.COMMAND, "run", str(path)], env=env, cwd=workdir,
                        capture_output=True, text=True, timeout=cli.TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return env
