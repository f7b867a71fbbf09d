"""Where a recipe's functions are found: one rule for a recipe file, its best_config.yaml and --set.

A project folder ``proj/`` holds ``recipe.yaml``, ``tiny.npz``, a module
``my_module.py`` and a package ``mypkg/`` whose ``models.py`` imports a sibling
module relatively. The real command runs in subprocesses from several working
directories (a module, once imported, would be found from anywhere in one
process): a recipe file's relative paths and modules are found in its own
folder first, then in the working directory; ``--set`` values in the working
directory. ``validate`` makes the same checks as ``run`` without training,
so most cases use it.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from orchard_jax.study.recipe import load_recipe

TIMEOUT = 240

MODULE = textwrap.dedent('''
    from flax import linen as nn


    class Net(nn.Module):
      num_classes: int

      @nn.compact
      def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


    def build(num_classes, input_shape):
      return Net(num_classes)
''')


@pytest.fixture(scope="module")
def project(tmp_path_factory, workdir, make_recipe) -> pathlib.Path:
  """``root/proj/`` (the recipe, its data and its code) and ``root/elsewhere/``."""
  root = tmp_path_factory.mktemp("paths")
  proj = root / "proj"
  (proj / "mypkg").mkdir(parents=True)
  (root / "elsewhere").mkdir()
  shutil.copy(workdir / "tiny.npz", proj / "tiny.npz")
  (proj / "my_module.py").write_text(MODULE)
  (proj / "mypkg" / "__init__.py").write_text("")
  (proj / "mypkg" / "layers.py").write_text(MODULE)
  (proj / "mypkg" / "models.py").write_text("from .layers import build  # a relative import\n")
  data = yaml.safe_load(make_recipe(workdir, "paths", n_trials=1).read_text())
  data["dataset"]["path"] = "tiny.npz"
  data["architecture"] = {"function": "my_module:build"}
  data["telemetry"]["output_dir"] = "outputs/paths"
  (proj / "recipe.yaml").write_text(yaml.safe_dump(data))
  data["architecture"] = {"function": "mypkg.models:build"}
  (proj / "package.yaml").write_text(yaml.safe_dump(data))
  return root


@pytest.fixture(scope="module")
def env(workdir) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax")}
  env.pop("XLA_FLAGS", None)
  return env


def orchard(command, env, cwd, *args) -> subprocess.CompletedProcess:
  return subprocess.run([*command, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_a_recipe_files_module_is_found_in_its_folder_from_any_working_directory(
    where, project, command, env):
  cwd = project / where.replace("root", ".")
  for recipe in ("recipe.yaml", "package.yaml"):
    proc = orchard(command, env, cwd, "validate", project / "proj" / recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is valid" in proc.stdout


def test_a_module_in_the_recipes_folder_is_read_as_its_file_there(project):
  recipe = load_recipe(project / "proj" / "package.yaml")
  assert recipe.architecture.function == f"{project / 'proj' / 'mypkg' / 'models.py'}:build"


def test_best_config_of_a_module_function_runs_from_any_working_directory(project, command,
                                                                          env):
  proc = orchard(command, env, project, "run", "proj/recipe.yaml")
  assert proc.returncode == 0, proc.stderr[-3000:]
  best = project / "proj" / "outputs" / "paths" / "best_config.yaml"  # output_dir: the recipe's
  assert yaml.safe_load(best.read_text())["architecture"]["function"] == "../../my_module.py:build"
  for cwd in (project / "elsewhere", best.parent):
    proc = orchard(command, env, cwd, "validate", best)
    assert proc.returncode == 0, (cwd, proc.stderr[-3000:])


def test_a_set_module_is_found_in_the_working_directory_and_the_error_names_the_file_form(
    project, command, env):
  function = "architecture.function=my_module:build"
  proc = orchard(command, env, project / "proj", "validate", "recipe.yaml", "--set", function)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = orchard(command, env, project, "validate", "proj/recipe.yaml", "--set", function)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.splitlines() == [
      f"orchard-jax: error: architecture.function 'my_module:build': cannot import 'my_module': "
      f"ModuleNotFoundError: No module named 'my_module'; a module is found in the recipe's "
      f"folder or the working directory ({project}), a file anywhere by its path: "
      f"'path/to/my_module.py:build'"]
  proc = orchard(command, env, project, "validate", "proj/recipe.yaml", "--set",
                 "architecture.function=proj/my_module.py:build")  # --set: the working directory
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_best_config_writes_a_module_of_the_working_directory_as_its_file(tmp_path, monkeypatch):
  from orchard_jax.study.best_files import relative_paths
  (tmp_path / "cwd_module.py").write_text(MODULE)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "cwd_module", raising=False)
  importlib.import_module("cwd_module")  # as resolve_function imports it, from the cwd
  config = {"architecture": {"function": "cwd_module:build"},
            "dataset": {"source": "function", "function": "json:loads"}}  # installed: as it is
  written = relative_paths(config, tmp_path / "outputs" / "study")
  assert written["architecture"]["function"] == "../../cwd_module.py:build"
  assert written["dataset"]["function"] == "json:loads"


def test_a_model_pools_functions_follow_the_same_rule(project):
  path = project / "proj" / "pool.yaml"
  data = yaml.safe_load((project / "proj" / "recipe.yaml").read_text())
  data["optuna"].update(enable_model_search=True,
                        model_pool=["mlp", "fn:my_module:build", "fn:mypkg/models.py:build",
                                    "fn:json:loads"])
  path.write_text(yaml.safe_dump(data))
  pool = load_recipe(path).study.model_pool
  proj = project / "proj"
  assert pool == ("mlp", f"fn:{proj / 'my_module.py'}:build",
                  f"fn:{proj / 'mypkg' / 'models.py'}:build", "fn:json:loads")
