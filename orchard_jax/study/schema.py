"""The recipe's JSON Schema, built from its pydantic models (``orchard-jax schema``).

Each section's schema is its model's: :class:`~.sections.DatasetSpec`,
:class:`~.sections.ArchitectureSection`, :class:`~orchard_jax.config.TrainingConfig`
(without ``augmentation``, a section of its own: :class:`~orchard_jax.config.AugmentationConfig`
without the dataset's flags),
:class:`~orchard_jax.config.OptunaConfig` with the study's own keys
(:class:`~.sections.StudySpec`) and :class:`~.sections.TelemetrySpec`. Unknown keys and
sections are refused (``additionalProperties: false``), as the recipe's parser
does. A few rules the parser checks across sections (``dataset.path`` only for
``source: npz``, ...) are not in the schema; ``orchard-jax run`` still checks
them. Numbers are numbers: PyYAML reads ``1e-6`` (no dot) as a string, which
the parser accepts but the schema does not (YAML 1.2 editors read it as a number).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from orchard_jax.config import AugmentationConfig, OptunaConfig, TrainingConfig
from orchard_jax.study.checks import FOLDER_MAX
from orchard_jax.study.recipe import SECTIONS
from orchard_jax.study.sections import (FLAGS, RECIPE_METRICS, ArchitectureSection, DatasetSpec,
                                        StudySpec, TelemetrySpec)

__all__ = ["recipe_schema", "schema_json"]

_MODELS = {"dataset": DatasetSpec, "architecture": ArchitectureSection,
           "training": TrainingConfig, "augmentation": AugmentationConfig,
           "optuna": OptunaConfig, "telemetry": TelemetrySpec}
# Keys of orchard-ml's optuna: section that a recipe reads and turns into orchard-jax's.
_REFERENCE = {
    "storage_type": {"enum": ["sqlite", "memory", "postgresql"],
                     "description": "orchard-ml's; becomes storage"},
    "storage_path": {"type": ["string", "null"], "description": "orchard-ml's; becomes storage"},
    "postgresql_url": {"type": ["string", "null"], "description": "orchard-ml's; becomes storage"},
    "metric_name": {"enum": list(RECIPE_METRICS),
                    "description": "orchard-ml's; must be training.monitor_metric"},
    "direction": {"enum": ["maximize", "minimize"],
                  "description": "orchard-ml's; must be training.monitor_direction"},
}


def _section(model: Any) -> dict[str, Any]:
  schema = TypeAdapter(model).json_schema()
  schema.pop("$defs", None)
  return schema


def recipe_schema() -> dict[str, Any]:
  """The JSON Schema (draft 2020-12) of a recipe file, as ``orchard-jax schema`` prints it."""
  sections = {key: _section(model) for key, model in _MODELS.items()}
  training, optuna = sections["training"]["properties"], sections["optuna"]["properties"]
  del training["augmentation"]  # a section of its own in a recipe
  augmentation = sections["augmentation"]["properties"]
  for flag in FLAGS:  # the dataset's, in its section
    del augmentation[flag]
  sections["augmentation"]["description"] = (
      "training augmentation on the device and TTA settings; null or absent: no augmentation")
  training["monitor_metric"].update(enum=list(RECIPE_METRICS))  # what validation computes
  optuna["study_name"].update(pattern=f"^[A-Za-z0-9_][A-Za-z0-9._-]{{0,{FOLDER_MAX - 1}}}$",
                              description="also the run folder: outputs/<study_name>")
  optuna["n_jobs"] = {"anyOf": [{"type": "integer", "minimum": 1}, {"const": -1}],
                      "default": 1, "description": "parallel trials; -1: one per CPU"}
  own = _section(StudySpec)["properties"]
  optuna.update({k: v for k, v in own.items() if k not in ("config", "overrides")})
  optuna["search_space_overrides"] = {
      "type": ["object", "null"], "description": "ranges of the search space preset to change"}
  optuna.update(_REFERENCE)
  sections["telemetry"]["properties"]["log_level"]["enum"] += [
      level.lower() for level in sections["telemetry"]["properties"]["log_level"]["enum"]]
  return {
      "$schema": "https://json-schema.org/draft/2020-12/schema",
      "title": "orchard-jax recipe",
      "description": "A study (with an optuna section) or a single training run; see "
                     "orchard_jax.study.recipe.",
      "type": "object",
      "properties": {key: {**sections[key], "type": ["object", "null"]} for key in SECTIONS},
      "additionalProperties": False,
  }


def schema_json() -> str:
  """:func:`recipe_schema` as ``orchard-jax schema`` prints it (and ``init`` writes it)."""
  return json.dumps(recipe_schema(), indent=2) + "\n"

