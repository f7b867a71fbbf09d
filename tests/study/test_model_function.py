"""Models from the user's code: ``architecture.function`` and ``fn:`` entries of ``model_pool``.

The functions are in ``user_models.py`` beside this file. The end-to-end tests
run the ``orchard-jax`` command in real subprocesses on the tiny data set of
``tests/test_cli.py`` (the ``workdir`` and ``make_recipe`` fixtures of
``conftest.py``); the others call the builders in process.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from orchard_jax.models import LinenModel, NNXModel
from orchard_jax.study.build import architecture_for, build_function_model, model_for
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.recipe import parse_recipe
from orchard_jax.study.space import build_space
from orchard_jax.study.sources import resolve_function

HERE = pathlib.Path(__file__).parent
USER = HERE / "user_models.py"
PNG = b"\x89PNG\r\n\x1a\n"
TIMEOUT = 240


def _user_models():
  """user_models.py, as a recipe's function would load it (so its bug_line is at hand)."""
  return resolve_function(f"{USER}:bug_line").__globals__


def line_of(name: str) -> int:
  return _user_models()["bug_line"](name)


class Source:
  """What model_for reads of a data source."""
  num_classes, input_shape = 3, (8, 8, 1)


def build(name: str, **kwargs):
  return build_function_model(f"{USER}:{name}", 3, (8, 8, 1), **kwargs)


def error_of(name: str, **kwargs) -> RecipeError:
  with pytest.raises(RecipeError) as info:
    build(name, **kwargs)
  assert "\n" not in str(info.value)
  return info.value


# ------------------------------------------------------------ the builders --


def test_a_function_may_return_a_linen_module_an_nnx_module_or_a_model():
  assert isinstance(build("build"), LinenModel)
  assert isinstance(build("build_nnx"), NNXModel)
  assert isinstance(build("build_model"), LinenModel)


def test_options_and_dropout_reach_the_function_and_equal_models_are_equal():
  model = build("build", dropout=0.3, options={"hidden": (4, 2)})
  assert model.module.hidden == (4, 2) and model.module.dropout == 0.3
  # Relative and absolute paths name one module, executed once: the classes are the same, so
  # every trial's model is equal to the first one's and reuses its compiled steps.
  relative = os.path.relpath(USER)
  again = build_function_model(f"{relative}:build", 3, (8, 8, 1), dropout=0.3,
                               options={"hidden": (4, 2)})
  assert again == model and hash(again) == hash(model)


def test_the_function_is_called_with_num_classes_and_the_channels_last_input_shape(tmp_path):
  path = tmp_path / "spy.py"
  path.write_text("import json\nfrom flax import linen as nn\n"
                  "class M(nn.Module):\n  n: int\n  @nn.compact\n"
                  "  def __call__(self, x, train=False):\n    return nn.Dense(self.n)(x)\n"
                  "calls = []\n"
                  "def build(num_classes, input_shape, **options):\n"
                  "  calls.append((num_classes, input_shape, options))\n  return M(num_classes)\n")
  build_function_model(f"{path}:build", 4, (6, 5, 1), dropout=0.1, options={"width": 3})
  assert resolve_function(f"{path}:build").__globals__["calls"] == [
      (4, (6, 5, 1), {"width": 3, "dropout": 0.1})]


def test_a_missing_file_suggests_the_closest_file():
  with pytest.raises(RecipeError, match=r"^architecture.function '.*user_model\.py:build': file "
                     r"not found: .*user_model\.py \(did you mean '.*user_models\.py'\?\)$"):
    build_function_model(f"{HERE / 'user_model.py'}:build", 3, (8, 8, 1))


def test_a_missing_module_suggests_the_closest_module(monkeypatch):
  monkeypatch.syspath_prepend(str(HERE))
  with pytest.raises(RecipeError, match=r"^architecture.function 'user_modles:build': cannot "
                     r"import 'user_modles': ModuleNotFoundError: No module named 'user_modles' "
                     r"\(did you mean 'user_models'\?\)$"):
    build_function_model("user_modles:build", 3, (8, 8, 1))


def test_a_module_form_names_the_same_module_as_its_file(monkeypatch):
  monkeypatch.syspath_prepend(str(HERE))
  assert build_function_model("user_models:build", 3, (8, 8, 1)) == build("build")


def test_a_missing_function_suggests_the_closest_name():
  assert str(error_of("biuld")).endswith(
      "module '" + str(USER) + "' has no function 'biuld' (did you mean 'build'?)")


def test_a_signature_that_cannot_take_the_arguments_is_refused_in_one_line():
  message = str(error_of("wrong_signature"))
  assert message.endswith("wrong_signature(num_classes) cannot be called as "
                          "wrong_signature(num_classes, input_shape): too many positional "
                          "arguments; it must take (num_classes, input_shape, **options), options "
                          "being architecture.options")
  assert "got an unexpected keyword argument 'size'" in str(
      error_of("build", options={"size": 3}))


def test_dropout_is_refused_for_a_function_without_a_dropout_parameter():
  assert str(error_of("no_dropout", dropout=0.2)).endswith(
      "architecture.dropout is 0.2, but no_dropout(num_classes, input_shape) has no dropout "
      "parameter; add one (or **kwargs) or set architecture.dropout: null")
  assert isinstance(build("no_dropout"), LinenModel)


@pytest.mark.parametrize("name, says", [
    ("returns_int", "returned 3 (int); it must return a flax Linen module (__call__(x, train)), "
                    "a flax NNX module or a Model (init and apply)"),
    ("returns_class", "returned the class Net, not an instance of it; it must return"),
    ("returns_untrainable", "returned a Linen module that cannot be trained: "
                            "NoTrainFlag.__call__ has no keyword argument 'train'"),
])
def test_what_is_not_a_model_is_named(name, says):
  assert says in str(error_of(name))


def test_an_error_in_the_function_names_its_file_and_line():
  e = error_of("buggy_build")
  shown = os.path.relpath(USER)
  assert str(e) == (f"architecture.function '{USER}:buggy_build' raised KeyError: 'large' at "
                    f"{shown}:{line_of('buggy_build')} in buggy_build")
  assert isinstance(e.user_error, KeyError) and e.__cause__ is e.user_error
  # Its traceback starts in the user's code.
  assert e.user_error.__traceback__.tb_frame.f_code.co_name == "buggy_build"


def test_an_error_in_a_library_the_function_calls_names_the_users_line():
  assert str(error_of("build_reading_json")).endswith(
      f"{os.path.relpath(USER)}:{line_of('build_reading_json')} in build_reading_json")


# ---------------------------------------------------- recipes and searches --


def recipe_of(architecture: dict, **optuna_keys):
  return parse_recipe({"architecture": architecture,
                       "optuna": {"search_space_preset": "quick", **optuna_keys}})


def test_the_recipes_function_is_a_model_name_and_round_trips_with_an_absolute_path():
  relative = os.path.relpath(USER)
  recipe = recipe_of({"function": f"{relative}:build", "options": {"hidden": [8]}})
  assert recipe.architecture.name == f"fn:{relative}:build"
  assert recipe.architecture.function == f"{relative}:build"
  assert recipe.to_dict()["architecture"] == {"function": f"{relative}:build", "dropout": None,
                                              "options": {"hidden": [8]}, "pretrained": False,
                                              "weight_variant": None}
  assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
  trial = architecture_for(recipe, {"dropout": 0.2})
  assert trial.function == f"{USER}:build" and trial.dropout == 0.2
  assert model_for(trial, Source()).module.hidden == (8,)


def test_dropout_is_not_searched_for_a_function_without_a_dropout_parameter():
  space = build_space(recipe_of({"function": f"{USER}:no_dropout"}).study, (8, 8, 1),
                      f"fn:{USER}:no_dropout")
  assert "dropout" not in space.dists and "learning_rate" in space.dists
  space = build_space(recipe_of({"function": f"{USER}:build"}).study, (8, 8, 1),
                      f"fn:{USER}:build")
  assert "dropout" in space.dists


def test_a_model_pool_may_name_functions():
  pool = ["mlp", f"fn:{USER}:build", f"fn:{USER}:no_dropout"]
  recipe = recipe_of({"name": "mlp", "dropout": 0.1}, enable_model_search=True, model_pool=pool)
  space = build_space(recipe.study, (8, 8, 1), recipe.architecture.name)
  assert space.model_pool == tuple(pool) and "dropout" in space.dists
  assert isinstance(model_for(architecture_for(recipe, {"model_name": pool[1], "dropout": 0.3}),
                              Source()), LinenModel)
  # The sampled dropout (and the recipe's) is not passed to a function without the parameter.
  arch = architecture_for(recipe, {"model_name": pool[2], "dropout": 0.3})
  assert arch.dropout is None and isinstance(model_for(arch, Source()), LinenModel)


@pytest.mark.parametrize("architecture, optuna_keys, message", [
    ({"name": "mlp", "function": "m:build"}, {},
     "architecture.name ('mlp') and architecture.function ('m:build') are mutually exclusive: "
     "give a registry name or a function of your own, not both (name: null drops the name)"),
    ({"function": "build"}, {},
     "architecture.function must be 'module:function' or 'path/file.py:function', got 'build'"),
    ({"name": "my_models:build"}, {},
     "got 'my_models:build'; a model of your own is architecture.function: 'module:function'"),
    ({"function": "m:build", "dropout": 0.1, "options": {"dropout": 0.2}}, {},
     "architecture.dropout and architecture.options.dropout are both set; give the function's "
     "dropout once, as architecture.dropout"),
    ({}, {"enable_model_search": True, "model_pool": ["mlp", "my_models:build"]},
     "optuna.model_pool: unknown architecture 'my_models:build' (did you mean "
     "'fn:my_models:build'?)"),
    ({}, {"enable_model_search": True, "model_pool": ["mlp", "fn:build"]},
     "optuna.model_pool[1] must be a registry name or 'fn:module:function' "
     "('fn:path/file.py:function'), got 'fn:build'"),
])
def test_recipe_mistakes_about_functions_are_one_line(architecture, optuna_keys, message):
  with pytest.raises(RecipeError) as info:
    recipe_of(architecture, **optuna_keys)
  assert message in str(info.value) and "\n" not in str(info.value)


def test_name_null_gives_way_to_a_function():
  recipe = recipe_of({"name": None, "function": "m:build"})
  assert recipe.architecture.name == "fn:m:build"


# -------------------------------------------------------------- end to end --


@pytest.fixture(scope="module")
def env(warm_env) -> dict:
  """The study tests' command environment (tests/study/conftest.py)."""
  return warm_env


def run(command, args, env, cwd) -> subprocess.CompletedProcess:
  return subprocess.run([*command, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=TIMEOUT)


def function_recipe(make_recipe, workdir, name: str, architecture: dict, **optuna_keys):
  """tests/test_cli.py's tiny study with ``architecture`` (and 2 trials)."""
  path = make_recipe(workdir, name, **{"n_trials": 2, **optuna_keys})
  data = yaml.safe_load(path.read_text())
  data["architecture"] = architecture
  path.write_text(yaml.safe_dump(data))
  return path


@pytest.fixture(scope="module")
def function_study(workdir, make_recipe, command, env):
  # Run from this folder, the function named by a path relative to it.
  path = function_recipe(make_recipe, workdir, "fn_study",
                         {"function": "user_models.py:build", "options": {"hidden": [16]}})
  proc = run(command, ["run", path], env, HERE)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, workdir / "fn_study"


def test_a_study_of_a_model_function_writes_every_output(function_study):
  proc, run_dir = function_study
  trials = optuna.load_study(study_name="fn_study",
                             storage=f"sqlite:///{run_dir / 'study.db'}").trials
  assert len(trials) == 2 and TrialState.COMPLETE in {t.state for t in trials}
  rows = list(csv.DictReader(open(run_dir / "trials.csv")))
  assert [r["number"] for r in rows] == ["0", "1"]
  assert "Best validation accuracy: 1.0000" in proc.stdout
  for name in ("optimization_history", "intermediate_values", "best_trial_curves"):
    assert (run_dir / "plots" / f"{name}.png").read_bytes().startswith(PNG), name
  assert (run_dir / "best_model" / "checkpoint").is_dir()
  best = yaml.safe_load((run_dir / "best_config.yaml").read_text())
  assert "name" not in best["architecture"] and best["architecture"]["options"] == {"hidden": [16]}
  target, _, attr = best["architecture"]["function"].rpartition(":")
  assert attr == "build" and (run_dir / target).resolve() == USER.resolve()


def test_best_config_of_a_model_function_retrains_from_another_folder(function_study, command,
                                                                      env, tmp_path):
  _, run_dir = function_study
  proc = run(command, ["run", run_dir / "best_config.yaml", "--set", "training.epochs=2"], env,
             tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((run_dir / "retrain" / "metrics.json").read_text())
  assert metrics["epochs_run"] == 2 and metrics["val"]["accuracy"] == 1.0
  assert "user_models.py:build" in proc.stderr + proc.stdout


def test_workers_load_a_model_pool_of_functions_in_their_own_processes(workdir, make_recipe,
                                                                       command, env):
  # The module form: the working directory (inherited by the workers) is on sys.path.
  path = function_recipe(make_recipe, workdir, "fn_workers", {"name": "mlp"},
                         enable_model_search=True,
                         model_pool=["fn:user_models:build", "fn:user_models:build_nnx"])
  proc = run(command, ["run", path, "--workers", "1"], env, HERE)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.DictReader(open(workdir / "fn_workers" / "trials.csv")))
  assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED"]  # the second cannot learn
  assert [r["params_model_name"] for r in rows] == ["fn:user_models:build",
                                                    "fn:user_models:build_nnx"]
  assert (workdir / "fn_workers" / "best_config.yaml").is_file()


def test_a_bad_pool_function_stops_the_command_before_training(workdir, make_recipe, command, env):
  path = function_recipe(make_recipe, workdir, "fn_bad_pool", {"name": "mlp"},
                         enable_model_search=True,
                         model_pool=["mlp", "fn:user_models:biuld"])
  proc = run(command, ["run", path], env, HERE)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr == ("orchard-jax: error: optuna.model_pool 'fn:user_models:biuld': module "
                         "'user_models' has no function 'biuld' (did you mean 'build'?)\n")


# ------------------------------------------------------- the user's traceback --


def bug_recipe(workdir, make_recipe, name: str, **sections):
  path = make_recipe(workdir, name, n_trials=1)
  data = yaml.safe_load(path.read_text())
  data.update(sections)
  path.write_text(yaml.safe_dump(data))
  return path


@pytest.mark.parametrize("debug", [False, True])
def test_a_bug_in_the_data_function_shows_its_line_and_with_debug_its_traceback(
    workdir, make_recipe, command, env, debug):
  path = bug_recipe(workdir, make_recipe, "fn_bug_data",
                    dataset={"source": "function", "function": "user_models:bug_loaders",
                             "num_classes": 3})
  proc = run(command, ["run", path, *(["--debug"] if debug else [])], env, HERE)
  line = line_of("bug_loaders")
  message = (f"orchard-jax: error: dataset.function 'user_models:bug_loaders' raised KeyError: "
             f"'label' at user_models.py:{line} in bug_loaders")
  assert proc.returncode == 2 and proc.stdout == ""
  if not debug:
    assert proc.stderr == message + " (run with --debug for its traceback)\n"
    return
  traceback, _, last = proc.stderr.rstrip("\n").rpartition("\n")
  assert last == message
  assert traceback.startswith("Traceback (most recent call last):\n")
  assert f'user_models.py", line {line}, in bug_loaders\n' in traceback
  assert traceback.endswith("KeyError: 'label'")
  assert "orchard_jax" not in traceback  # the user's frames only


def test_a_bug_in_the_model_function_shows_its_traceback_with_debug(workdir, make_recipe,
                                                                    command, env):
  path = bug_recipe(workdir, make_recipe, "fn_bug_model",
                    architecture={"function": "user_models.py:buggy_build"})
  proc = run(command, ["run", path, "--debug"], env, HERE)
  line = line_of("buggy_build")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert f'user_models.py", line {line}, in buggy_build\n' in proc.stderr
  assert proc.stderr.endswith(
      f"orchard-jax: error: architecture.function 'user_models.py:buggy_build' raised KeyError: "
      f"'large' at user_models.py:{line} in buggy_build\n")
