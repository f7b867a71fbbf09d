"""Studies from YAML recipes: what the ``orchard-jax`` command runs.

* :mod:`~orchard_jax.study.recipe` -- the recipe schema and its validation.
* :mod:`~orchard_jax.study.sources` -- digits, MedMNIST-format ``.npz``, user functions.
* :mod:`~orchard_jax.study.space` -- the ``quick``/``full`` presets and their overrides.
* :mod:`~orchard_jax.study.runner` -- ``orchard-jax run``: a study run (or resumed) and its outputs.
* :mod:`~orchard_jax.study.opening` -- sampler, pruner, storage: a study created, loaded, joined.
* :mod:`~orchard_jax.study.storage` -- storage URLs, opening them, heartbeats, storage faults.
* :mod:`~orchard_jax.study.ask_tell` -- the study's ask and tell for the engine's one driver.
* :mod:`~orchard_jax.study.workers` -- a worker of a study shared by processes or machines.
* :mod:`~orchard_jax.study.launch` -- ``run --workers``: one worker process per local device.
* :mod:`~orchard_jax.study.outputs` -- trials.csv, best_config.yaml, plots, best model, together.
* :mod:`~orchard_jax.study.train` -- a recipe without ``optuna:``: one training run.

Typical use from Python (the command line does the same)::

  recipe = load_recipe("recipe.yaml", ["optuna.n_trials=20"])
  source = load_source(recipe.dataset, batch_size=recipe.training.batch_size,
                       seed=recipe.training.seed)
  run_study(recipe, source, pathlib.Path("outputs/my_study"))
"""

from orchard_jax.study.checks import RecipeError
from orchard_jax.study.recipe import Recipe, load_recipe, parse_recipe
from orchard_jax.study.runner import run_study
from orchard_jax.study.sources import load_source
from orchard_jax.study.train import run_training

__all__ = ["Recipe", "RecipeError", "load_recipe", "load_source", "parse_recipe", "run_study",
           "run_training"]
