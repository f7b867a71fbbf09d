"""The bundled recipe and the recipe's JSON Schema, as ``orchard-jax init`` writes them.

Both are package files, read without importing :mod:`orchard_jax.study` (JAX,
Optuna), so that ``init`` answers at once. The recipe's first line,
:data:`SCHEMA_COMMENT`, points editors with the YAML language server (VS
Code's YAML extension, Neovim, Helix...) at :data:`SCHEMA_FILE`, which
``init`` writes next to the recipe. The shipped schema is
:func:`orchard_jax.study.schema.recipe_schema` (``orchard-jax schema``);
``tests/study/test_schema.py`` keeps the two equal.
"""

from __future__ import annotations

import importlib.resources

SCHEMA_FILE = "recipe.schema.json"
SCHEMA_COMMENT = f"# yaml-language-server: $schema={SCHEMA_FILE}"


def _read(name: str) -> str:
  return (importlib.resources.files("orchard_jax") / "recipes" / name).read_text()


def recipe_text() -> str:
  """The bundled, commented default recipe, :data:`SCHEMA_COMMENT` its first line."""
  return f"{SCHEMA_COMMENT}\n{_read('default.yaml')}"


def schema_text() -> str:
  """The recipe's JSON Schema as shipped (``recipes/recipe.schema.json``)."""
  return _read(SCHEMA_FILE)
