"""Fuzzed recipes: seeded mutations of the bundled recipe either parse or raise one line.

Each case mutates one key of the bundled recipe (deletes it, misspells it, gives it a value of
another type, a number out of range, a number as a string, nested garbage, a list where a
mapping was...). ``parse_recipe`` must then return a recipe or raise the library's error
(a :class:`ConfigError`, :class:`RecipeError` included) in one line that names the key; never
another exception (TypeError, KeyError, pydantic's ValidationError...). Parsing only: nothing
trains.
"""

from __future__ import annotations

import copy
import random

import pytest
import yaml

from orchard_jax.config import ConfigError
from orchard_jax.study.recipe import bundled_recipe_text, parse_recipe

CASES = 300
SEED = 18
BUNDLED = yaml.safe_load(bundled_recipe_text())
GARBAGE = [None, True, False, 0, -1, 7, 2**40, -(2**70), 10**5000, 0.5, -0.5, 1e308, float("nan"),
           float("inf"), "", " ", "x", "x" * 500, "1e-3", "NaN", "-7", "sqlite", [], [1, "a"],
           [[None]], {}, {"a": {"b": [None, {"c": 1}]}}, {1: 2}, {None: "x"}, ("t",), b"bytes"]


def key_paths(data: dict, prefix: tuple = ()) -> list[tuple]:
  """Every key path of the nested mappings in ``data``, sections included."""
  out = []
  for key, value in data.items():
    out.append((*prefix, key))
    if isinstance(value, dict):
      out.extend(key_paths(value, (*prefix, key)))
  return out


def typo(rng: random.Random, key: str) -> str:
  """``key`` with one letter dropped, doubled, swapped with the next one or replaced."""
  i = rng.randrange(len(key))
  op = rng.choice(["drop", "double", "swap", "replace"])
  if op == "drop" and len(key) > 1:
    return key[:i] + key[i + 1:]
  if op == "swap" and i + 1 < len(key) and key[i] != key[i + 1]:
    return key[:i] + key[i + 1] + key[i] + key[i + 2:]
  if op == "replace":
    return key[:i] + ("z" if key[i] != "z" else "q") + key[i + 1:]
  return key[:i] + key[i] + key[i:]


def out_of_range(rng: random.Random, value: object) -> object:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return rng.choice([-1, 10**9, -0.25, 2.5])
  return rng.choice([-value - 1, value * 1000 + 10**6, -abs(value) * 0.5 - 1e-9, 2**32,
                     type(value)(0)])


def mutate(rng: random.Random) -> tuple[dict, tuple, str]:
  """The bundled recipe with one mutated key: (recipe, key path, the mutation's name)."""
  data = copy.deepcopy(BUNDLED)
  path = rng.choice(key_paths(data))
  parent = data
  for key in path[:-1]:
    parent = parent[key]
  key, value = path[-1], parent[path[-1]]
  op = rng.choice(["delete", "typo", "garbage", "garbage", "range", "string", "nested", "listed",
                   "null"])
  if op == "delete":
    del parent[key]
  elif op == "typo":
    parent[typo(rng, key)] = parent.pop(key)
  elif op == "garbage":
    parent[key] = copy.deepcopy(rng.choice(GARBAGE))
  elif op == "range":
    parent[key] = out_of_range(rng, value)
  elif op == "string":
    parent[key] = str(value) if not isinstance(value, (dict, list)) else yaml.safe_dump(value)
  elif op == "nested":
    parent[key] = {"deeper": {key: [value, {"and": None}]}, 3: value}
  elif op == "listed":
    parent[key] = list(value.items()) if isinstance(value, dict) else [value, value]
  else:
    parent[key] = None
  return data, path, op


def cases() -> list[tuple[dict, tuple, str]]:
  rng = random.Random(SEED)
  return [mutate(rng) for _ in range(CASES)]


CASE_LIST = cases()


def test_the_cases_are_deterministic_and_varied():
  assert [c[1:] for c in cases()] == [c[1:] for c in CASE_LIST]  # same seed, same mutations
  assert {op for _, _, op in CASE_LIST} == {"delete", "typo", "garbage", "range", "string",
                                           "nested", "listed", "null"}
  assert len({path[0] for _, path, _ in CASE_LIST}) == 6  # every section


def test_every_mutated_recipe_parses_or_raises_one_line_naming_the_key():
  outcomes = {"parsed": 0, "refused": 0}
  for i, (data, path, op) in enumerate(CASE_LIST):
    where = f"case {i}: {op} at {'.'.join(map(str, path))}"
    try:
      parse_recipe(data)
    except ConfigError as e:  # RecipeError included
      message = str(e)
      assert message and "\n" not in message, where
      assert len(message) < 1000, where
      assert "pydantic" not in message and "Input should" not in message, (where, message)
      named = [str(p) for p in path if isinstance(p, str)]
      assert any(p in message for p in named), (where, message)
      outcomes["refused"] += 1
    except Exception as e:  # pylint: disable=broad-except
      pytest.fail(f"{where}: {type(e).__name__}: {e}")
    else:
      outcomes["parsed"] += 1
  assert outcomes["parsed"] >= 20 and outcomes["refused"] >= 150, outcomes
