"""The package's version, importable without JAX (``orchard-jax --version``); pyproject.toml's
``project.version`` is the same."""

__version__ = "0.1.0"
