"""The install lines the docs give work from a checkout (orchard_jax is not on PyPI)."""

import importlib.metadata
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/distributed.md")


def _install_lines(text: str) -> list[str]:
  return re.findall(r"pip install[^`\n]*", text)


def test_every_extra_the_docs_install_is_one_of_the_project():
  extras = set(importlib.metadata.metadata("orchard_jax").get_all("Provides-Extra") or [])
  named = {}
  for doc in DOCS:
    for line in _install_lines((ROOT / doc).read_text()):
      for extra in re.findall(r"\[([\w,-]+)\]", line):
        named.setdefault(extra, []).append((doc, line))
  assert "postgres" in named, "the docs no longer say how to install the PostgreSQL driver"
  for extra, where in named.items():
    assert set(extra.split(",")) <= extras, f"{where}: no such extra; the project has {extras}"


def test_an_extra_is_installed_from_the_checkout_not_from_pypi():
  """``pip install "orchard_jax[postgres]"`` asks PyPI, which has no orchard_jax."""
  for doc in DOCS:
    for line in _install_lines((ROOT / doc).read_text()):
      if "[" in line:
        for target in re.findall(r"[\"']?[\w./-]*\[[\w,-]+\][\"']?", line):
          assert target.strip("\"'").startswith(".["), f"{doc}: {line!r} installs {target} from PyPI"


def test_the_postgres_extra_brings_a_driver():
  requires = importlib.metadata.requires("orchard_jax") or []
  assert any(r.startswith("psycopg2") and 'extra == "postgres"' in r for r in requires), requires
