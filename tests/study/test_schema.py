"""The recipe's JSON Schema: `orchard-jax schema`, the copy `init` writes, what it accepts."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from orchard_jax import bundled
from orchard_jax.cli import main
from orchard_jax.study.recipe import bundled_recipe_text, parse_recipe
from orchard_jax.study.schema import recipe_schema, schema_json

SCHEMA = recipe_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
BUNDLED = yaml.safe_load(bundled_recipe_text())


def errors(data) -> list[str]:
  return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
          for e in VALIDATOR.iter_errors(data)]


def test_the_schema_is_a_valid_json_schema():
  jsonschema.Draft202012Validator.check_schema(SCHEMA)
  assert set(SCHEMA["properties"]) == {"dataset", "architecture", "training", "augmentation",
                                       "optuna", "telemetry"}


def test_the_schema_command_prints_the_schema(capsys):
  assert main(["schema"]) == 0
  assert json.loads(capsys.readouterr().out) == SCHEMA


def test_the_installed_command_prints_it_too():
  proc = subprocess.run([sys.executable, "-m", "orchard_jax.cli", "schema"], capture_output=True,
                        text=True, timeout=300, check=True)
  assert json.loads(proc.stdout) == SCHEMA


def test_the_shipped_copy_is_the_schema_of_the_models():
  # `init` copies recipes/recipe.schema.json (it does not import the study package); after
  # changing a model: orchard-jax schema > orchard_jax/recipes/recipe.schema.json
  assert bundled.schema_text() == schema_json()


def test_the_bundled_recipe_is_valid():
  assert errors(BUNDLED) == []


def test_init_writes_the_editor_comment_first_and_the_schema_beside_the_recipe(tmp_path):
  path = tmp_path / "recipe.yaml"
  assert main(["init", str(path)]) == 0
  text = path.read_text()
  assert text.splitlines()[0] == "# yaml-language-server: $schema=recipe.schema.json"
  schema = json.loads((tmp_path / "recipe.schema.json").read_text())
  assert schema == SCHEMA
  assert list(jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(text))) == []


def test_sections_may_be_empty_or_absent():
  assert errors({}) == [] and errors({"training": None, "dataset": {}}) == []


@pytest.mark.parametrize("section, key", [
    ("training", "learnig_rate"), ("optuna", "n_trails"), ("dataset", "sorce"),
    ("architecture", "nmae"), ("telemetry", "log_levle")])
def test_a_misspelt_key_is_refused(section, key):
  data = copy.deepcopy(BUNDLED)
  data[section][key] = 1
  found = errors(data)
  assert len(found) == 1 and key in found[0] and found[0].startswith(section)


def test_a_misspelt_section_is_refused():
  assert "trainig" in " ".join(errors({**BUNDLED, "trainig": {}}))


@pytest.mark.parametrize("section, key, value", [
    ("training", "batch_size", "big"), ("training", "learning_rate", "fast"),
    ("training", "use_amp", "yes"), ("training", "seed", 1.5), ("training", "seed", True),
    ("training", "optimizer_type", "adam"), ("training", "learning_rate", 2.0),
    ("training", "monitor_metric", "roc_auc"), ("optuna", "n_trials", 0),
    ("optuna", "study_name", "../x"), ("optuna", "storage", "postgresql"),
    ("optuna", "model_pool", "mlp"), ("dataset", "split_seed", 2**32),
    ("dataset", "function", "no_colon"), ("architecture", "options", [1]),
    ("telemetry", "log_level", "LOUD")])
def test_a_wrong_type_or_value_is_refused_and_the_parser_agrees(section, key, value):
  data = copy.deepcopy(BUNDLED)
  data[section][key] = value
  assert errors(data) and errors(data)[0].startswith(f"{section}.{key}")
  from orchard_jax.config import ConfigError
  with pytest.raises(ConfigError):
    parse_recipe(data)


@pytest.mark.parametrize("section, key, value", [
    ("optuna", "n_jobs", -1), ("optuna", "storage", "postgresql://u:p@h/db"),
    ("optuna", "storage_type", "sqlite"), ("optuna", "metric_name", "accuracy"),
    ("telemetry", "log_level", "debug"), ("architecture", "dropout", None),
    ("training", "precision", "bfloat16"), ("optuna", "timeout", 60)])
def test_values_the_parser_accepts_are_valid(section, key, value):
  data = copy.deepcopy(BUNDLED)
  if key == "storage_type":  # the reference's way instead of storage
    del data["optuna"]["storage"]
  data[section][key] = value
  assert errors(data) == []
  parse_recipe(data)


def test_a_function_of_the_users_is_valid_instead_of_a_name():
  data = copy.deepcopy(BUNDLED)
  del data["architecture"]["name"]
  data["architecture"]["function"] = "my_models:build"
  assert errors(data) == []
