"""Tests for orchard_jax.config: defaults, ranges, types, loading, precision."""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from orchard_jax.config import (ConfigError, OptunaConfig, TrainingConfig,
                                resolve_precision)

# The reference's defaults (UPSTREAM.md). If these change, the reference changed:
# update them only after checking orchard-ml's TrainingConfig/OptunaConfig.
REFERENCE_TRAINING = dict(
    seed=42, batch_size=16, epochs=60, optimizer_type="sgd", learning_rate=0.008,
    min_lr=1e-6, momentum=0.9, weight_decay=5e-4, grad_clip=1.0,
    label_smoothing=0.0, mixup_alpha=0.2, mixup_epochs=20, scheduler_type="cosine",
    monitor_metric="auc", monitor_direction="maximize", scheduler_patience=5,
    scheduler_factor=0.1, step_size=20, use_amp=True, criterion_type="cross_entropy",
    weighted_loss=False, focal_gamma=2.0)
REFERENCE_OPTUNA = dict(
    n_trials=50, epochs=15, timeout=None, enable_pruning=True,
    pruning_warmup_epochs=5, pruner_type="median", sampler_type="tpe",
    storage="sqlite", load_if_exists=True, n_jobs=1, search_space_preset="full",
    enable_early_stopping=True, early_stopping_threshold=None,
    early_stopping_patience=2)


def test_training_defaults_equal_reference():
  assert TrainingConfig().to_dict() == {**REFERENCE_TRAINING, "precision": None, "patience": 15,
                                        "use_tqdm": True, "use_tta": False,
                                        "augmentation": None}


def test_optuna_defaults_equal_reference_except_study_name():
  # cohort_size is ours (trials trained together); 1 trains each alone, as the reference does.
  # pruner_type unset is the reference's median one by one, and the same-epoch rule in cohorts.
  config = OptunaConfig()
  assert config.to_dict() == {**REFERENCE_OPTUNA, "study_name": "orchard_jax", "cohort_size": 1,
                              "pruner_type": None}
  assert config.pruner == REFERENCE_OPTUNA["pruner_type"]


@pytest.mark.parametrize("kwargs, pruner", [
    ({}, "median"), ({"cohort_size": 8}, "successive_halving"),
    ({"cohort_size": 8, "pruner_type": "median"}, "median"),
    ({"pruner_type": "same_epoch"}, "same_epoch"),
    ({"cohort_size": 8, "enable_pruning": False}, "none")])
def test_the_pruner_unset_is_median_one_by_one_and_successive_halving_in_cohorts(kwargs, pruner):
  assert OptunaConfig(**kwargs).pruner == pruner


# (field, value, other fields needed so that only `field` is under test)
TRAINING_INSIDE = [
    ("learning_rate", 2e-8, {"min_lr": 2e-8}), ("learning_rate", 0.999999, {}),
    ("min_lr", 1.1e-8, {}), ("min_lr", 0.008, {}),
    ("momentum", 0.0, {}), ("momentum", 0.999, {}),
    ("weight_decay", 0.0, {}), ("weight_decay", 0.2, {}),
    ("label_smoothing", 0.0, {}), ("label_smoothing", 0.3, {}),
    ("grad_clip", 0.0, {}), ("grad_clip", 100.0, {}),
    ("scheduler_factor", 0.0, {}), ("scheduler_factor", 1.0, {}),
    ("mixup_alpha", 0.0, {}), ("focal_gamma", 0.0, {}),
    ("batch_size", 1, {"use_amp": False}), ("batch_size", 4, {}),
    ("batch_size", 4096, {}), ("epochs", 1, {}), ("mixup_epochs", 0, {}),
    ("scheduler_patience", 0, {}), ("step_size", 1, {}), ("seed", 0, {}),
    ("seed", 2**32 - 1, {}),
]
TRAINING_OUTSIDE = [
    ("learning_rate", 1e-8, "in (1e-08, 1)"), ("learning_rate", 1.0, "in (1e-08, 1)"),
    ("learning_rate", -0.1, "in (1e-08, 1)"), ("min_lr", 1e-8, "in (1e-08, 1)"),
    ("min_lr", 1.0, "in (1e-08, 1)"), ("momentum", -0.01, "in [0, 1)"),
    ("momentum", 1.0, "in [0, 1)"), ("weight_decay", -1e-9, "in [0, 0.2]"),
    ("weight_decay", 0.2000001, "in [0, 0.2]"), ("label_smoothing", -0.01, "in [0, 0.3]"),
    ("label_smoothing", 0.31, "in [0, 0.3]"), ("grad_clip", -0.5, "in [0, 100]"),
    ("grad_clip", 100.5, "in [0, 100]"), ("scheduler_factor", -0.1, "in [0, 1]"),
    ("scheduler_factor", 1.1, "in [0, 1]"), ("mixup_alpha", -0.1, ">= 0"),
    ("focal_gamma", -1.0, ">= 0"), ("batch_size", 0, ">= 1"), ("epochs", 0, ">= 1"),
    ("mixup_epochs", -1, ">= 0"), ("scheduler_patience", -1, ">= 0"),
    ("step_size", 0, ">= 1"),
]


@pytest.mark.parametrize("field,value,extra", TRAINING_INSIDE)
def test_training_accepts_boundary_value(field, value, extra):
  assert getattr(TrainingConfig(**{field: value, **extra}), field) == value


@pytest.mark.parametrize("field,value,allowed", TRAINING_OUTSIDE)
def test_training_refuses_out_of_range_value(field, value, allowed):
  expected = f"TrainingConfig.{field} must be {allowed}, got {value!r}"
  with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
    TrainingConfig(**{field: value})


@pytest.mark.parametrize("value", [-1, -3, 2**32, 2**64])
def test_seed_outside_the_samplers_range_is_refused(value):
  # numpy's and Optuna's samplers take seeds in [0, 2**32); outside it a study failed late.
  expected = f"TrainingConfig.seed must be in [0, 4294967295], got {value}"
  with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
    TrainingConfig(seed=value)


def test_seed_range_is_checked_by_replace_and_from_dict():
  expected = r"^TrainingConfig\.seed must be in \[0, 4294967295\], got -1$"
  with pytest.raises(ConfigError, match=expected):
    TrainingConfig().replace(seed=-1)
  with pytest.raises(ConfigError, match=expected):
    TrainingConfig.from_dict({"seed": -1})


def test_training_batch_size_has_no_upper_bound():
  assert TrainingConfig(batch_size=100_000).batch_size == 100_000


OPTUNA_INSIDE = [("n_trials", 1), ("pruning_warmup_epochs", 0), ("n_jobs", 1), ("cohort_size", 1),
                 ("cohort_size", 64),
                 ("early_stopping_patience", 1), ("timeout", 0.5),
                 ("early_stopping_threshold", -2.5)]
OPTUNA_OUTSIDE = [("n_trials", 0, ">= 1"), ("epochs", 0, ">= 1"),
                  ("pruning_warmup_epochs", -1, ">= 0"), ("n_jobs", 0, ">= 1"),
                  ("n_jobs", -1, ">= 1"), ("cohort_size", 0, ">= 1"),
                  ("early_stopping_patience", 0, ">= 1"),
                  ("timeout", 0, "> 0"), ("timeout", -1.0, "> 0")]


@pytest.mark.parametrize("field,value", OPTUNA_INSIDE)
def test_optuna_accepts_boundary_value(field, value):
  assert getattr(OptunaConfig(**{field: value}), field) == value


def test_optuna_accepts_one_epoch_without_pruning():
  assert OptunaConfig(epochs=1, enable_pruning=False).epochs == 1


@pytest.mark.parametrize("field,value,allowed", OPTUNA_OUTSIDE)
def test_optuna_refuses_out_of_range_value(field, value, allowed):
  expected = f"OptunaConfig.{field} must be {allowed}, got {value!r}"
  with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
    OptunaConfig(**{field: value, "enable_pruning": False})


ENUMS = [
    (TrainingConfig, "optimizer_type", ("sgd", "adamw"), "adam", "adamw", {}),
    (TrainingConfig, "scheduler_type", ("cosine", "plateau", "step", "none"),
     "cosin", "cosine", {}),
    (TrainingConfig, "monitor_direction", ("maximize", "minimize"), "maximise",
     "maximize", {}),
    (TrainingConfig, "criterion_type", ("cross_entropy", "focal"), "Focal", "focal", {}),
    (OptunaConfig, "pruner_type", ("median", "percentile", "hyperband", "successive_halving",
                                   "same_epoch", "none", None),
     "medain", "median", {"enable_pruning": False}),
    (OptunaConfig, "sampler_type", ("tpe", "cmaes", "random"), "cmaess", "cmaes", {}),
    (OptunaConfig, "search_space_preset", ("quick", "full"), "ful", "full", {}),
]


@pytest.mark.parametrize("cls,field,options,typo,suggestion,extra", ENUMS)
def test_enum_accepts_every_option(cls, field, options, typo, suggestion, extra):
  assert [getattr(cls(**{field: o, **extra}), field) for o in options] == list(options)


@pytest.mark.parametrize("cls,field,options,typo,suggestion,extra", ENUMS)
def test_enum_refuses_typo_and_suggests_closest(cls, field, options, typo,
                                                suggestion, extra):
  allowed = ", ".join(repr(o) for o in options if o is not None)
  allowed += " or null" if None in options else ""  # an optional Literal
  expected = (f"{cls.__name__}.{field} must be one of {allowed}, got {typo!r} "
              f"(did you mean {suggestion!r}?)")
  with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
    cls(**{field: typo, **extra})


@pytest.mark.parametrize("field,value", [
    ("epochs", True), ("epochs", 1.5), ("seed", 1.0), ("batch_size", "16")])
def test_int_field_refuses_non_int(field, value):
  expected = f"TrainingConfig.{field} must be an int, got {value!r} ({type(value).__name__})"
  with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
    TrainingConfig(**{field: value})


def test_int_field_accepts_numpy_int_and_stores_python_int():
  batch_size = TrainingConfig(batch_size=np.int64(8)).batch_size
  assert (batch_size, type(batch_size)) == (8, int)


def test_float_field_accepts_int_and_stores_float():
  cfg = TrainingConfig(weight_decay=0, grad_clip=5)
  assert (cfg.weight_decay, type(cfg.weight_decay), cfg.grad_clip) == (0.0, float, 5.0)


@pytest.mark.parametrize("value", [True, "0.01", None])
def test_float_field_refuses_non_number_in_constructor(value):
  with pytest.raises(ConfigError, match=r"^TrainingConfig\.learning_rate must be a float, got "):
    TrainingConfig(learning_rate=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_float_field_refuses_non_finite(value):
  with pytest.raises(ConfigError, match=r"^TrainingConfig\.mixup_alpha must be a finite float"):
    TrainingConfig(mixup_alpha=value)


@pytest.mark.parametrize("value", [1, "true", None])
def test_bool_field_refuses_non_bool(value):
  with pytest.raises(ConfigError, match=r"^TrainingConfig\.use_amp must be True or False"):
    TrainingConfig(use_amp=value)


def test_grad_clip_none_disables_clipping_as_zero():
  assert TrainingConfig(grad_clip=None).grad_clip == 0.0


def test_monitor_metric_refuses_empty_name():
  with pytest.raises(ConfigError, match=r"^TrainingConfig\.monitor_metric must be a non-empty str"):
    TrainingConfig(monitor_metric="")


def test_constructor_refuses_unknown_field_with_suggestion():
  with pytest.raises(ConfigError, match=re.escape(
      "TrainingConfig has no field 'learning_rte' (did you mean 'learning_rate'?)")):
    TrainingConfig(learning_rte=0.01)


def test_from_dict_refuses_unknown_field_with_suggestion():
  with pytest.raises(ConfigError, match=re.escape(
      "OptunaConfig has no field 'n_trial' (did you mean 'n_trials'?)")):
    OptunaConfig.from_dict({"n_trial": 3})


def test_unknown_field_without_close_match_lists_valid_fields():
  with pytest.raises(ConfigError, match=r"has no field 'zzz'; valid fields: seed, batch_size"):
    TrainingConfig.from_dict({"zzz": 1})


def test_replace_refuses_unknown_field_with_suggestion():
  with pytest.raises(ConfigError, match=re.escape("(did you mean 'batch_size'?)")):
    TrainingConfig().replace(bach_size=32)


def test_reference_only_training_keys_load_with_their_values():
  cfg = TrainingConfig.from_dict({"use_tta": True, "patience": 7, "use_tqdm": False})
  assert (cfg.use_tta, cfg.patience, cfg.use_tqdm) == (True, 7, False)
  with pytest.raises(ConfigError, match=r"TrainingConfig.patience must be >= 1, got 0"):
    TrainingConfig(patience=0)


def test_config_is_frozen():
  cfg = TrainingConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.learning_rate = 0.1  # type: ignore[misc]


def test_equal_configs_hash_equal():
  assert hash(TrainingConfig(seed=1)) == hash(TrainingConfig(seed=1))


def test_replace_returns_checked_copy():
  cfg = TrainingConfig()
  new = cfg.replace(learning_rate=0.01)
  assert (new.learning_rate, cfg.learning_rate) == (0.01, 0.008)


def test_replace_reruns_validation():
  with pytest.raises(ConfigError, match=r"must be >= 4 when use_amp=True"):
    TrainingConfig().replace(batch_size=2)


def test_dataclasses_replace_reruns_validation():
  with pytest.raises(ConfigError, match=r"learning_rate must be in"):
    dataclasses.replace(TrainingConfig(), learning_rate=2.0)


def test_amp_with_batch_below_4_is_refused():
  with pytest.raises(ConfigError, match=re.escape(
      "TrainingConfig.batch_size must be >= 4 when use_amp=True") + ".*got batch_size=3"):
    TrainingConfig(batch_size=3, use_amp=True)


def test_batch_below_4_is_allowed_without_amp():
  assert TrainingConfig(batch_size=3, use_amp=False).batch_size == 3


def test_min_lr_above_learning_rate_is_refused_naming_both():
  with pytest.raises(ConfigError, match=re.escape(
      "TrainingConfig.min_lr must be <= learning_rate, got min_lr=0.01, learning_rate=0.001")):
    TrainingConfig(learning_rate=0.001, min_lr=0.01)


def test_warmup_not_below_epochs_is_refused_when_pruning():
  with pytest.raises(ConfigError, match=re.escape(
      "got pruning_warmup_epochs=15, epochs=15")):
    OptunaConfig(epochs=15, pruning_warmup_epochs=15, enable_pruning=True)


def test_warmup_just_below_epochs_is_allowed_when_pruning():
  assert OptunaConfig(epochs=15, pruning_warmup_epochs=14).pruning_warmup_epochs == 14


def test_warmup_not_below_epochs_is_allowed_without_pruning():
  cfg = OptunaConfig(epochs=3, pruning_warmup_epochs=5, enable_pruning=False)
  assert cfg.pruning_warmup_epochs == 5


def test_pruner_none_is_refused_when_pruning():
  with pytest.raises(ConfigError, match=r"OptunaConfig\.pruner_type must be .* got 'none'"):
    OptunaConfig(pruner_type="none", enable_pruning=True)


@pytest.mark.parametrize("storage", [
    "sqlite", "memory", "postgresql://user:pw@host:5432/db", "sqlite:///tmp/study.db",
    "mysql+pymysql://u@h/db"])
def test_storage_accepts_keyword_or_url(storage):
  assert OptunaConfig(storage=storage).storage == storage


@pytest.mark.parametrize("storage", ["postgresql", "", "sqlite:/x.db", 3])
def test_storage_refuses_other_values(storage):
  with pytest.raises(ConfigError, match=r"^OptunaConfig\.storage must be 'sqlite', 'memory' or a database URL"):
    OptunaConfig(storage=storage)


def test_storage_error_hides_url_password():
  with pytest.raises(ConfigError) as info:
    OptunaConfig(storage="postgresql://me:secret@host/db name")
  assert "secret" not in str(info.value) and "postgresql://***@host" in str(info.value)


@pytest.mark.parametrize("precision", [
    "float32", "bfloat16", "float16", "bf16", "half", "BF16",
    "params=float32,compute=bfloat16,output=float32", "p=f32, c=bf16, o=f32",
    "param=fp32,compute=fp16,output=f32"])
def test_precision_accepts_dtype_or_policy(precision):
  assert TrainingConfig(precision=precision).precision == precision


@pytest.mark.parametrize("precision,message", [
    ("bfloat61", "unknown dtype 'bfloat61'"),
    ("params=float32,compute=bf61,output=float32", "unknown dtype 'bf61'"),
    ("parms=float32,c=f32,o=f32", "unknown key 'parms'"),
    ("p=f32,params=f32,c=f32,o=f32", "given twice"),
    ("p=f32,bf16", "got 'bf16'"),
    ("compute=bfloat16", "missing params, output"),
    ("params=float16,compute=float16,output=float16", "param_dtype must be float32 or bfloat16"),
])
def test_precision_typo_is_named(precision, message):
  prefix = f"TrainingConfig.precision={precision!r} is invalid: "
  with pytest.raises(ConfigError, match=f"^{re.escape(prefix)}.*{re.escape(message)}"):
    TrainingConfig(precision=precision)


def test_precision_typo_suggests_closest_dtype():
  with pytest.raises(ConfigError, match=re.escape("did you mean 'bfloat16'?")):
    TrainingConfig(precision="bfloat61")


def test_precision_refuses_non_str():
  with pytest.raises(ConfigError, match=r"must be None or a dtype policy str, got 32 \(int\)"):
    TrainingConfig(precision=32)


@pytest.mark.parametrize("use_amp,backend,expected", [
    (True, "cpu", "float32"), (True, "gpu", "bfloat16"), (True, "tpu", "bfloat16"),
    (True, "GPU", "bfloat16"), (True, "cuda", "bfloat16"), (True, "metal", "float32"),
    (False, "cpu", "float32"), (False, "gpu", "float32"), (False, "tpu", "float32")])
def test_use_amp_resolves_by_backend(use_amp, backend, expected):
  assert resolve_precision(TrainingConfig(use_amp=use_amp), backend) == expected


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_explicit_precision_overrides_use_amp(backend):
  cfg = TrainingConfig(use_amp=True, precision="params=float32,compute=float16,output=float32")
  assert cfg.resolved_precision(backend) == cfg.precision


def test_resolve_precision_refuses_empty_backend():
  with pytest.raises(ConfigError, match=r"backend must be a non-empty str"):
    resolve_precision(TrainingConfig(), "")


def test_training_round_trips_through_dict():
  cfg = TrainingConfig(seed=7, batch_size=256, optimizer_type="adamw", grad_clip=None,
                       scheduler_type="plateau", monitor_metric="loss",
                       monitor_direction="minimize", precision="bf16")
  assert TrainingConfig.from_dict(cfg.to_dict()) == cfg


def test_optuna_round_trips_through_dict():
  cfg = OptunaConfig(study_name="s", timeout=60, storage="memory", n_jobs=4,
                     early_stopping_threshold=0.9999, pruner_type="hyperband")
  assert OptunaConfig.from_dict(cfg.to_dict()) == cfg


def test_configs_round_trip_through_pickle():
  cfg = TrainingConfig(seed=3)
  assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_from_dict_parses_numeric_string_for_float_field():
  assert TrainingConfig.from_dict({"min_lr": "1e-7"}).min_lr == 1e-7


def test_from_dict_refuses_non_numeric_string_for_float_field():
  with pytest.raises(ConfigError, match=r"min_lr must be a float, got 'small' \(str\)"):
    TrainingConfig.from_dict({"min_lr": "small"})


def test_from_dict_refuses_string_for_int_field():
  with pytest.raises(ConfigError, match=r"epochs must be an int, got '10' \(str\)"):
    TrainingConfig.from_dict({"epochs": "10"})


@pytest.mark.parametrize("data", [None, [("seed", 1)]])
def test_from_dict_refuses_non_mapping(data):
  with pytest.raises(ConfigError, match=r"^TrainingConfig\.from_dict expects a mapping"):
    TrainingConfig.from_dict(data)


def test_from_dict_refuses_non_str_key():
  with pytest.raises(ConfigError, match=r"field names must be str, got 1 \(int\)"):
    TrainingConfig.from_dict({1: 2})


# Written like the reference's recipes: `5e-4` / `1e-6` without a dot, which
# PyYAML reads as strings.
REFERENCE_TRAINING_YAML = """
training:
  seed: 42
  batch_size: 128
  epochs: 60
  optimizer_type: "sgd"
  learning_rate: 0.01
  min_lr: 1e-6
  momentum: 0.9
  weight_decay: 5e-4
  grad_clip: 1.0
  label_smoothing: 0.1
  mixup_alpha: 0.2
  mixup_epochs: 0
  scheduler_type: "cosine"
  monitor_metric: "auc"
  monitor_direction: "maximize"
  scheduler_patience: 5
  scheduler_factor: 0.1
  step_size: 20
  use_amp: false
  criterion_type: "cross_entropy"
  weighted_loss: false
  focal_gamma: 2.0
  patience: 15
  use_tta: true
  use_tqdm: true
"""


def test_reference_training_section_loads_unchanged():
  section = yaml.safe_load(REFERENCE_TRAINING_YAML)["training"]
  expected = {**REFERENCE_TRAINING, "batch_size": 128, "learning_rate": 0.01,
              "label_smoothing": 0.1, "mixup_epochs": 0, "use_amp": False,
              "precision": None, "patience": 15, "use_tta": True, "use_tqdm": True,
              "augmentation": None}
  assert TrainingConfig.from_dict(section).to_dict() == expected


def test_configs_without_precision_do_not_import_jax():
  path = pathlib.Path(__file__).parents[1] / "orchard_jax" / "config.py"
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('cfg', {str(path)!r})\n"
          "module = importlib.util.module_from_spec(spec)\n"
          "sys.modules['cfg'] = module\n"
          "spec.loader.exec_module(module)\n"
          "module.TrainingConfig(); module.OptunaConfig()\n"
          "module.TrainingConfig.from_dict({'use_amp': False, 'grad_clip': None})\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


# Echoed values are capped: over 80 characters, the first 60, '…' and the length.
LONG = "x" * 5000
CAPPED = "'" + "x" * 59 + "… (5000 characters)"


@pytest.mark.parametrize("cls,field,expected", [
    (TrainingConfig, "optimizer_type",
     f"TrainingConfig.optimizer_type must be one of 'sgd', 'adamw', got {CAPPED}"),
    (TrainingConfig, "learning_rate",
     f"TrainingConfig.learning_rate must be a float, got {CAPPED} (str)"),
    (TrainingConfig, "seed", f"TrainingConfig.seed must be an int, got {CAPPED} (str)"),
    (TrainingConfig, "precision",
     "TrainingConfig.precision must be a dtype policy str of at most 100 characters, such as "
     f"'bfloat16' or 'params=float32,compute=bfloat16,output=float32', got {CAPPED}"),
    (OptunaConfig, "storage",
     "OptunaConfig.storage must be 'sqlite', 'memory' or a database URL such as "
     "'postgresql://user:pass@host/db' or 'sqlite:///path/study.db', got " + CAPPED),
    (OptunaConfig, "pruner_type",
     "OptunaConfig.pruner_type must be one of 'median', 'percentile', 'hyperband', "
     f"'successive_halving', 'same_epoch', 'none' or null, got {CAPPED}"),
])
def test_a_5000_character_value_is_echoed_capped(cls, field, expected):
  with pytest.raises(ConfigError) as info:
    cls(**{field: LONG})
  message = str(info.value)
  assert message == expected and "\n" not in message and len(message) < 300


def test_a_long_unknown_field_name_is_capped():
  with pytest.raises(ConfigError) as info:
    OptunaConfig(**{LONG: 1})
  assert str(info.value).startswith(f"OptunaConfig has no field {CAPPED}; valid fields: study_name")


def test_a_short_value_is_echoed_in_full():
  value = "y" * 78  # its repr has 80 characters: the cap's limit
  with pytest.raises(ConfigError, match=f"got '{value}'$"):
    TrainingConfig(optimizer_type=value)


def test_an_int_too_long_to_print_is_described():
  with pytest.raises(ConfigError, match=r"^TrainingConfig\.seed must be in \[0, 4294967295\], "
                                        r"got <an int of 16610 bits>$"):
    TrainingConfig(seed=10**5000)


def test_training_config_takes_any_metric_name_and_direction():
  # Task adapters name their own metrics; the check against the default
  # validation's metrics is TrialConfig's (tests/engine/test_trial_config.py).
  cfg = TrainingConfig(monitor_metric="roc_auc", monitor_direction="minimize")
  assert (cfg.monitor_metric, cfg.monitor_direction) == ("roc_auc", "minimize")
  assert TrainingConfig(monitor_metric="loss").monitor_direction == "maximize"


# ------------------------------------------------ pydantic underneath (issue 18) --


@pytest.mark.parametrize("cls", [TrainingConfig, OptunaConfig])
def test_configs_are_pydantic_dataclasses_that_forbid_extra_fields(cls):
  import pydantic.dataclasses
  assert pydantic.dataclasses.is_pydantic_dataclass(cls)
  assert cls.__pydantic_config__["extra"] == "forbid" and cls.__pydantic_config__["strict"]


def test_a_pydantic_error_becomes_one_config_error_line_without_its_report():
  with pytest.raises(ConfigError) as info:
    TrainingConfig(seed=-1, epochs="many", bogus=1)
  # unknown fields first, as before; pydantic's multi-line report is never attached
  assert str(info.value) == "TrainingConfig has no field 'bogus'; valid fields: " + ", ".join(
      f.name for f in dataclasses.fields(TrainingConfig))
  assert info.value.__cause__ is None and info.value.__suppress_context__
  assert not isinstance(info.value, __import__("pydantic").ValidationError)


def test_the_first_bad_field_in_field_order_is_named():
  with pytest.raises(ConfigError, match=r"^TrainingConfig\.seed must be an int"):
    TrainingConfig(focal_gamma=-1.0, seed="x")


def test_fields_are_keyword_only():
  with pytest.raises(TypeError):
    TrainingConfig(3)  # type: ignore[misc]


def test_an_int_too_large_for_a_float_field_is_one_line():
  with pytest.raises(ConfigError, match=r"^TrainingConfig\.momentum must be a float, got "
                                        r"<an int of 16610 bits> \(int\)$"):
    TrainingConfig(momentum=10**5000)


def test_configs_have_a_json_schema_with_their_ranges():
  from pydantic import TypeAdapter
  properties = TypeAdapter(TrainingConfig).json_schema()["properties"]
  assert properties["learning_rate"] == {"default": 0.008, "exclusiveMaximum": 1,
                                         "exclusiveMinimum": 1e-08, "title": "Learning Rate",
                                         "type": "number"}
  assert properties["optimizer_type"]["enum"] == ["sgd", "adamw"]
