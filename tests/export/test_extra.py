"""The export extra: what it brings, that the test command installs it, and that it installs
without a conflict (jax2onnx releases after 0.13.0 pin orbax-checkpoint below this
project's)."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _extra(name: str) -> dict[str, Requirement]:
  reqs = [Requirement(r) for r in importlib.metadata.requires("orchard_jax") or []]
  return {r.name: r for r in reqs if r.marker and r.marker.evaluate({"extra": name})}


def test_the_export_extra_brings_serialization_the_converter_and_the_runtime():
  assert set(_extra("export")) == {"flatbuffers", "jax2onnx", "onnx", "onnxruntime"}


def test_the_readme_test_command_installs_the_export_extra():
  text = (ROOT / "README.md").read_text()
  command = text.split("<!-- test-command -->", 1)[1].split("```")[1]
  assert re.search(r'-e "\.\[[\w,]*\bexport\b[\w,]*\]"', command), command


@pytest.mark.parametrize("dist", ["jax2onnx", "onnx", "onnxruntime", "orchard_jax"])
def test_every_installed_requirement_of_the_export_stack_is_satisfied(dist):
  """What ``pip check`` checks, for the packages the extra adds (and the project itself)."""
  pytest.importorskip(dist)
  for text in importlib.metadata.requires(dist) or []:
    req = Requirement(text)
    if req.marker and not req.marker.evaluate({"extra": ""}):
      continue
    version = importlib.metadata.version(req.name)  # PackageNotFoundError: a missing one
    assert req.specifier.contains(version, prereleases=True), f"{dist} needs {req}, has {version}"


def test_importing_the_export_package_imports_none_of_the_extra():
  """onnx, onnxruntime and jax2onnx load only when an ONNX function runs (jax2onnx's first
  conversion imports its plugins for seconds). flatbuffers is JAX's own import."""
  code = ("import sys, orchard_jax.export; print(sorted(m for m in ('onnx', 'onnxruntime',"
          " 'jax2onnx') if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["[]"]
