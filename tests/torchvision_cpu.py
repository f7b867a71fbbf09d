"""torchvision on the CPU wheel of torch, for tests that compare with its transforms.

PyPI's torchvision wheels are CUDA builds: importing them registers meta and autograd
kernels of CUDA-only operators, which fails against the CPU torch the README installs.
:func:`import_functional` stubs those two registration modules in ``sys.modules`` (only
when torchvision is not imported yet) and returns ``torchvision.transforms.v2.functional``,
which then runs on the CPU.
"""

from __future__ import annotations

import sys
import types

STUBBED = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_functional():
  """``torchvision.transforms.v2.functional``, importable on the CPU torch wheel."""
  if "torchvision" not in sys.modules:
    for name in STUBBED:
      sys.modules.setdefault(name, types.ModuleType(name))
  import torchvision.transforms.v2.functional as F
  return F
