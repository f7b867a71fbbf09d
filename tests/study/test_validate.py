"""``orchard-jax validate``: a recipe checked in full, with nothing trained or written.

The recipes are tests/test_cli.py's tiny study (the ``workdir`` and
``make_recipe`` fixtures of ``conftest.py``: an MLP on an 8x8 npz of 3
classes), changed per test; the models that cannot take that input are
written by :func:`models_file`. The happy path and one failure run the real
command in a subprocess, with ``HOME`` and JAX's cache folder of their own,
which must stay empty; the other failures run :func:`orchard_jax.cli.main` in
process (exit status and stderr) and :func:`validate_recipe` (the error).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import textwrap

import pytest
import yaml

from orchard_jax.cli import main
from orchard_jax.study.checks import RecipeError
from orchard_jax.study.recipe import bundled_recipe_text
from orchard_jax.study.space import FloatRange, IntRange, SearchSpace
from orchard_jax.study.validate import boundary_params, validate_recipe

TIMEOUT = 240

MODELS = textwrap.dedent('''
    from flax import linen as nn


    class Wide(nn.Module):
      """One logit too many."""
      num_classes: int

      @nn.compact
      def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes + 1)(x.reshape((x.shape[0], -1)))


    class Fixed(nn.Module):
      """Made for 28x28 inputs only."""
      num_classes: int

      @nn.compact
      def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], 28 * 28))  # BUG fixed
        return nn.Dense(self.num_classes)(x)


    class Small(nn.Module):
      """Takes batches of at most 48 samples."""
      num_classes: int

      @nn.compact
      def __call__(self, x, train: bool = False):
        if x.shape[0] > 48:
          raise ValueError(f"at most 48 samples a batch, got {x.shape[0]}")  # BUG small
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


    def wide(num_classes, input_shape):
      return Wide(num_classes)


    def fixed(num_classes, input_shape):
      return Fixed(num_classes)


    def small(num_classes, input_shape):
      return Small(num_classes)


    def raises(num_classes, input_shape):
      raise RuntimeError("no GPU model today")  # BUG raises
''')


@pytest.fixture(scope="module")
def models_file(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("validate_models") / "my_models.py"
  path.write_text(MODELS)
  return path


def bug_line(path: pathlib.Path, name: str) -> int:
  return next(i for i, line in enumerate(path.read_text().splitlines(), 1)
              if line.endswith(f"# BUG {name}"))


def write_recipe(make_recipe, workdir, name: str, *, drop_optuna: bool = False,
                 **sections) -> pathlib.Path:
  """tests/test_cli.py's tiny study, each of ``sections`` (``dataset={...}``,
  ``optuna={...}``, ``overrides={...}``) merged into its section, ``architecture`` replaced."""
  path = make_recipe(workdir, name)
  data = yaml.safe_load(path.read_text())
  for section, values in sections.items():
    if section == "architecture":
      data["architecture"] = values
    elif section == "overrides":
      data["optuna"]["search_space_overrides"].update(values)
    else:
      data[section].update(values)
  if drop_optuna:
    del data["optuna"]
  path.write_text(yaml.safe_dump(data))
  return path


def function(models_file: pathlib.Path, name: str) -> dict:
  return {"function": f"{models_file}:{name}"}


def env_of(root: pathlib.Path) -> dict:
  """The command's environment: CPU, and a HOME and a JAX cache folder of its own."""
  (root / "home").mkdir()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HOME": str(root / "home"),
         "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache")}
  env.pop("XLA_FLAGS", None)
  return env


def run_validate(command, args, env, cwd) -> subprocess.CompletedProcess:
  return subprocess.run([*command, "validate", *map(str, args)], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=TIMEOUT)


def files_under(path: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---------------------------------------------------- the real command --


def test_the_bundled_recipe_is_valid_and_nothing_is_written(command, tmp_path):
  env = env_of(tmp_path)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  (cwd / "recipe.yaml").write_text(bundled_recipe_text())
  proc = run_validate(command, ["recipe.yaml"], env, cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == [
      "recipe.yaml is valid: digits (1257 train, 270 val, 270 test), inputs 8x8x1, 10 classes; "
      "model mini_cnn; 2 search-space configurations checked (batch size 32), nothing trained"]
  # No run folder (outputs/digits_mini_cnn), no study.db, no compilation cache, nothing in HOME.
  assert files_under(cwd) == ["recipe.yaml"]
  assert files_under(tmp_path / "home") == [] and not (tmp_path / "jax_cache").exists()


def test_a_model_that_cannot_take_the_input_exits_2_in_one_line_and_writes_nothing(
    command, make_recipe, workdir, models_file, tmp_path):
  path = write_recipe(make_recipe, workdir, "validate_fixed",
                      architecture=function(models_file, "fixed"))
  env = env_of(tmp_path)
  proc = run_validate(command, [path], env, tmp_path)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stdout == ""
  line = (f"orchard-jax: error: model 'fn:{models_file}:fixed': the model cannot be initialised "
          f"on inputs of shape (8, 8, 1) (channels last): TypeError: cannot reshape array of "
          f"shape (1, 8, 8, 1) (size 64) into shape (1, 784) (size 784) at "
          f"{models_file}:{bug_line(models_file, 'fixed')} in __call__ (run with --debug for its "
          f"traceback)")
  assert proc.stderr.splitlines() == [line]
  assert files_under(tmp_path) == ["home"] and not (workdir / "validate_fixed").exists()


@pytest.mark.parametrize("model, sets", [
    ("wide", []),  # one logit too many in every configuration
    ("small", ["optuna.search_space_overrides.batch_size_low_res=[16, 64]"]),  # only at 64
])
def test_run_refuses_what_validate_refuses_before_any_trial(model, sets, command, make_recipe,
                                                            workdir, models_file, tmp_path,
                                                            capsys, monkeypatch):
  name = f"run_refused_{model}"
  path = write_recipe(make_recipe, workdir, name, dataset={"eval_batch_size": 32},
                      architecture=function(models_file, model))
  args = [x for s in sets for x in ("--set", s)]
  proc = subprocess.run([*command, "run", str(path), *args], env=env_of(tmp_path), cwd=tmp_path,
                        capture_output=True, text=True, timeout=TIMEOUT)
  monkeypatch.chdir(tmp_path)
  status, out, validated = validate_in_process(capsys, path, *sets)
  assert status == 2 and len(validated) == 1
  assert (proc.returncode, proc.stderr.splitlines()[-1:]) == (2, validated), proc.stderr[-3000:]
  assert proc.stdout == "" and "Trial" not in proc.stderr
  searched = "; searching learning_rate 0.5|1e-07" + (", batch_size 16|64" if sets else "")
  assert proc.stderr.splitlines()[0].endswith(searched)  # the study's first line
  # no trial was created: the study's storage (in its run folder) was not even opened
  assert not (workdir / name).exists()


# ------------------------------------------------- the command, in process --


def validate_in_process(capsys, path, *sets) -> tuple[int, list[str], list[str]]:
  status = main(["validate", str(path), *(x for s in sets for x in ("--set", s))])
  out, err = capsys.readouterr()
  return status, out.splitlines(), err.splitlines()


@pytest.mark.parametrize("case, message", [
    ("typo", "orchard-jax: error: unknown key 'optuna.n_trail' in the recipe (did you mean "
             "'n_trials'?)"),
    ("missing npz", "orchard-jax: error: dataset.path: file not found: {workdir}/missing.npz"),
    ("wide logits", "orchard-jax: error: model 'fn:{models}:wide': the model returns logits of "
                    "shape (16, 4) for a training batch of shape (16, 8, 8, 1), expected logits "
                    "of shape (16, 3) for num_classes=3"),
    ("function raises", "orchard-jax: error: architecture.function '{models}:raises' raised "
                        "RuntimeError: no GPU model today at {models}:{line} in raises (run with "
                        "--debug for its traceback)"),
])
def test_a_bad_recipe_exits_2_with_one_line_naming_the_cause(case, message, capsys, monkeypatch,
                                                              make_recipe, workdir, models_file,
                                                              tmp_path):
  monkeypatch.chdir(tmp_path)
  sections = {"typo": {"optuna": {"n_trail": 3}},
              "missing npz": {"dataset": {"path": str(workdir / "missing.npz")}},
              "wide logits": {"architecture": function(models_file, "wide")},
              "function raises": {"architecture": function(models_file, "raises")}}[case]
  name = "validate_" + case.replace(" ", "_")
  path = write_recipe(make_recipe, workdir, name, **sections)
  status, out, err = validate_in_process(capsys, path)
  assert (status, out) == (2, [])
  assert err == [message.format(workdir=workdir, models=models_file,
                                line=bug_line(models_file, "raises"))]
  assert files_under(tmp_path) == [] and not (workdir / name).exists()


def test_every_model_of_the_pool_is_checked_and_the_bad_one_named(capsys, make_recipe, workdir,
                                                                  models_file):
  pool = ["mlp", f"fn:{models_file}:wide"]
  path = write_recipe(make_recipe, workdir, "validate_pool",
                      optuna={"enable_model_search": True, "model_pool": pool})
  status, out, err = validate_in_process(capsys, path)
  assert (status, out) == (2, [])
  assert len(err) == 1 and err[0].startswith(f"orchard-jax: error: model 'fn:{models_file}:wide'")
  assert "logits of shape (16, 4)" in err[0]
  status, out, err = validate_in_process(capsys, path, "optuna.model_pool=[mlp, mini_cnn]")
  assert (status, err) == (0, [])
  assert out == [f"{path} is valid: tiny (96 train, 48 val, 48 test), inputs 8x8x1, 3 classes; "
                 f"models mlp, mini_cnn; 2 search-space configurations checked (batch size 16), "
                 f"nothing trained"]


def test_the_largest_batch_size_of_the_search_space_is_checked(capsys, make_recipe, workdir,
                                                               models_file):
  path = write_recipe(make_recipe, workdir, "validate_batch",
                      dataset={"eval_batch_size": 32},
                      architecture=function(models_file, "small"),
                      overrides={"batch_size_low_res": [16, 32]})
  status, out, err = validate_in_process(capsys, path)
  assert (status, err) == (0, [])
  assert out[0].endswith(
      "2 search-space configurations checked (batch size 16/32), nothing trained")
  wider = "optuna.search_space_overrides.batch_size_low_res=[16, 64]"
  status, out, err = validate_in_process(capsys, path, wider)
  assert (status, out) == (2, [])
  assert err == [f"orchard-jax: error: model 'fn:{models_file}:small' with batch_size=64: the "
                 f"model cannot be applied to a training batch of shape (64, 8, 8, 1): "
                 f"ValueError: at most 48 samples a batch, got 64 at "
                 f"{models_file}:{bug_line(models_file, 'small')} in __call__ (run with --debug "
                 f"for its traceback)"]


# ------------------------------------------------------ the Python function --


def test_the_function_returns_what_it_checked_and_compiles_nothing(make_recipe, workdir,
                                                                   xla_compiles):
  from orchard_jax.engine import executables

  path = write_recipe(make_recipe, workdir, "validate_function",
                      optuna={"search_space_preset": "full", "enable_model_search": True,
                              "model_pool": ["mlp", "mini_cnn"]},
                      overrides={"batch_size_low_res": [16, 48, 32], "dropout": {}})
  executables.clear()
  with xla_compiles() as seen:
    result = validate_recipe(path)
  assert seen.count == 0 and executables.stats() == {
      "compiled": 0, "loaded": 0, "saved": 0, "ahead": 0}
  assert result.models == ("mlp", "mini_cnn") and result.batch_sizes == (16, 48)
  # 2 models x 2 batch sizes x 2 dropouts; every optimizer, criterion and scheduler is among them.
  configurations = result.configurations
  assert len(configurations) == 8
  assert {(c["model_name"], c["batch_size"], c["dropout"]) for c in configurations} == {
      (m, b, d) for m in ("mlp", "mini_cnn") for b in (16, 48) for d in (0.1, 0.5)}
  assert {c["criterion_type"] for c in configurations} == {"cross_entropy", "focal"}
  assert {c["scheduler_type"] for c in configurations} == {"cosine", "plateau", "step"}
  assert {c["mixup_alpha"] for c in configurations} == {0.0, 0.4}
  assert all(("focal_gamma" in c) == (c["criterion_type"] == "focal") for c in configurations)
  assert not (workdir / "validate_function").exists()


def test_a_single_training_run_is_validated_too(make_recipe, workdir, models_file):
  path = write_recipe(make_recipe, workdir, "validate_single", drop_optuna=True)
  result = validate_recipe(path)
  assert result.configurations == ({},) and result.models == ("mlp",)
  assert result.summary().endswith("model mlp; 1 training configuration checked (batch size 16), "
                                   "nothing trained")
  path = write_recipe(make_recipe, workdir, "validate_single_wide", drop_optuna=True,
                      architecture=function(models_file, "wide"))
  with pytest.raises(RecipeError, match=r"logits of shape \(16, 4\)"):
    validate_recipe(path)


def test_sets_reach_the_function_as_they_reach_the_command():
  with pytest.raises(RecipeError) as info:
    validate_recipe(None, ["dataset.eval_batch_size=0"])
  assert "eval_batch_size" in str(info.value) and "\n" not in str(info.value)


def test_the_user_error_is_kept_for_debug(make_recipe, workdir, models_file):
  path = write_recipe(make_recipe, workdir, "validate_debug",
                      architecture=function(models_file, "fixed"))
  with pytest.raises(RecipeError) as info:
    validate_recipe(path)
  assert isinstance(info.value.user_error, TypeError)
  assert info.value.__cause__ is info.value.user_error


def test_boundary_params_cross_models_batch_sizes_and_dropouts_and_cover_every_choice():
  space = SearchSpace({"optimizer_type": ("sgd", "adamw"),
                       "learning_rate": FloatRange(1e-4, 1e-1, log=True),
                       "dropout": FloatRange(0.1, 0.45, step=0.1),
                       "batch_size": (32, 16, 64),
                       "scheduler_type": ("cosine", "plateau", "step"),
                       "scheduler_patience": IntRange(3, 10, step=2)},
                      model_pool=("mlp", "mini_cnn"))
  values = boundary_params(space)
  assert len(values) == 8
  assert sorted((v["model_name"], v["batch_size"], v["dropout"]) for v in values) == sorted(
      (m, b, d) for m in ("mlp", "mini_cnn") for b in (16, 64) for d in (0.1, 0.4))
  assert {v["optimizer_type"] for v in values} == {"sgd", "adamw"}
  assert {v["learning_rate"] for v in values} == {1e-4, 1e-1}
  assert {v["scheduler_type"] for v in values} == {"cosine", "plateau", "step"}
  assert {v["scheduler_patience"] for v in values} == {3, 9}  # 9: the last on the step
  # Fewer crossed configurations than choices: more configurations, until each choice is in one.
  values = boundary_params(SearchSpace({"scheduler_type": ("cosine", "plateau", "step")}))
  assert [v["scheduler_type"] for v in values] == ["cosine", "plateau", "step"]


def test_worker_refuses_what_validate_refuses_before_joining_the_study(
    command, make_recipe, workdir, models_file, tmp_path, capsys, monkeypatch):
  path = write_recipe(make_recipe, workdir, "worker_refused", dataset={"eval_batch_size": 32},
                      architecture=function(models_file, "wide"))
  journal = tmp_path / "shared" / "study.journal"
  proc = subprocess.run([*command, "worker", str(path), "--storage", f"journal:///{journal}"],
                        env=env_of(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                        timeout=TIMEOUT)
  monkeypatch.chdir(tmp_path)
  status, out, validated = validate_in_process(capsys, path)
  assert status == 2 and len(validated) == 1
  assert (proc.returncode, proc.stderr.splitlines()[-1:]) == (2, validated), proc.stderr[-3000:]
  assert "Trial" not in proc.stderr
  assert not journal.exists() and not (workdir / "worker_refused").exists()  # no study joined
