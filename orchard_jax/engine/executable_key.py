"""What a compiled program's file on disk is keyed on, besides the program's arguments.

A program goes to disk only when its model is fully described by the key
(:func:`portable`: a model of orchard_jax's own modules whose attributes are
plain data, :func:`plain`). The key then holds a fingerprint of everything
else the program could depend on: the source of the orchard_jax package, the
versions of jax, jaxlib, flax, optax and numpy (:func:`code_fingerprint`),
JAX's configuration, ``XLA_FLAGS``, the backend, the CPU and the convolution lowerings
chosen on it (:func:`environment`). :mod:`orchard_jax.engine.executables` names its files
by it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import sys
from typing import Any

import jax
import numpy as np

from orchard_jax.models import conv_choice
from orchard_jax.engine import conv_store

__all__ = ["code_fingerprint", "environment", "plain", "portable"]

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.dtype)
_TRUSTED_CODE = ("orchard_jax.", "flax.", "jax.", "jaxlib.", "optax.", "numpy", "ml_dtypes")


def portable(model: Any) -> bool:
  """Whether ``model``'s code and attributes are all covered by the disk key."""
  from orchard_jax.models.base import LinenModel  # pylint: disable=import-outside-toplevel
  return isinstance(model, LinenModel) and _plain_module(model.module)


def _plain_module(module: Any) -> bool:
  if not type(module).__module__.startswith("orchard_jax."):
    return False
  fields = [f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")]
  return all(plain(getattr(module, f)) for f in fields)


def plain(value: Any) -> bool:
  """Whether ``value``, an attribute of a model, is data the disk key describes: plain values,
  containers of them, orchard_jax's submodules, and functions or types of trusted code."""
  if isinstance(value, _PLAIN):
    return True
  if isinstance(value, (tuple, list, frozenset)):
    return all(plain(v) for v in value)
  if isinstance(value, dict):
    return all(plain(k) and plain(v) for k, v in value.items())
  if dataclasses.is_dataclass(value) and hasattr(value, "parent"):  # a Linen submodule
    return _plain_module(value)
  if isinstance(value, type) or callable(value):  # e.g. nn.relu, jnp.float32
    return (getattr(value, "__module__", None) or "").startswith(_TRUSTED_CODE)
  return False


@functools.cache
def code_fingerprint() -> str:
  """The SHA-256 of the orchard_jax package's source and of the versions of the packages its
  programs are built with."""
  root = pathlib.Path(__file__).resolve().parents[1]
  digest = hashlib.sha256()
  for file in sorted(root.rglob("*.py")):
    digest.update(str(file.relative_to(root)).encode())
    digest.update(file.read_bytes())
  for package in _PACKAGES:
    try:
      digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    except importlib.metadata.PackageNotFoundError:
      digest.update(f"{package}=?".encode())
  return digest.hexdigest()


def environment() -> tuple:
  """JAX's configuration (but its cache and log settings), the XLA flags, the backend, the
  CPU and the convolution lowerings (:func:`conv_lowerings`): what else a compiled program
  depends on."""
  config = tuple(sorted((k, repr(v)) for k, v in jax.config.values.items()
                        if "cache" not in k and "log" not in k))
  device = jax.devices()[0]
  return (config, os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""),
          device.platform, device.client.platform_version, _cpu(), conv_lowerings())


def conv_lowerings() -> tuple[str, str | None]:
  """What decides the convolution lowerings a program is traced with: ``ORCHARD_JAX_CONV``
  and, under ``auto``, the table of choices kept beside the executables, attached here to
  the executables' directory (:mod:`orchard_jax.engine.conv_store`). Its choices never
  change, so a program keyed with it holds the choices a later process would make."""
  # executables imports this module (and is the caller): looked up, not imported
  executables = sys.modules.get("orchard_jax.engine.executables")
  directory = executables.cache_dir() if executables is not None else None
  conv_store.attach(directory, _cpu())
  return conv_choice.key_part()


@functools.cache
def _cpu() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))]
    return hashlib.sha256("".join(sorted(set(lines))).encode()).hexdigest()
  except OSError:
    return f"{platform.machine()} {platform.processor()}"

