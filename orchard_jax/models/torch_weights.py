"""Loading torch ``state_dict`` checkpoints (torchvision / timm layouts) into the flax models.

Shell code: it imports torch, lazily, inside the functions that read a file
or resample a kernel; nothing in ``orchard_jax.core`` imports this module.

**Names.** The built-in models name their submodules after the torch
attributes, a numeric index joining its parent with ``_``; so a torch key maps
to a flax path by rule (:func:`flax_path`)::

  layer1.0.downsample.0.weight   ->  params/layer1_0/downsample_0/kernel
  features.2.1.block.3.1.running_var  ->  batch_stats/features_2_1/block_3_1/var
  blocks.3.attn.qkv.bias         ->  params/blocks_3/attn/qkv/bias

Leaves: ``weight`` is a conv/Linear ``kernel`` or a norm ``scale``
(whichever the flax module has), ``bias`` is ``bias``, ``running_mean`` /
``running_var`` are the ``batch_stats`` ``mean`` / ``var``,
``num_batches_tracked`` is dropped, and any other name (``cls_token``,
``pos_embed``, ``layer_scale``) keeps its name.

**Layouts.** Conv weights OIHW -> HWIO (depthwise ``[C, 1, k, k]`` ->
``[k, k, 1, C]``), Linear weights transposed, other leaves reshaped when they
differ only by unit axes (ConvNeXt's ``layer_scale`` ``[C, 1, 1]`` -> ``[C]``).
ViT keeps timm's fused ``qkv``, so nothing is split.

**The reference's adaptations** (orchard-ml):

* *Grayscale input*: a 3-channel stem conv loaded into a 1-channel model is
  averaged over its input channels (``w.mean(dim=1, keepdim=True)``, as the
  reference), so a gray image ``g`` gives the response of the RGB image
  ``(g, g, g)`` divided by 3. Other channel changes are shape mismatches.
* *Low-resolution ResNet-18*: a 7x7 ``conv1`` loaded into the 3x3 stem is
  resampled with bicubic interpolation (``align_corners=True``), then
  averaged over channels if needed, as the reference's ``_adapt_stem_28``.
* *New head*: with ``head="auto"`` the classifier (``fc``, ``classifier.1``,
  ``classifier.2``, ``head``) is loaded when its shapes fit and otherwise
  kept as given in ``params`` (freshly initialised for the new class count);
  ``head="new"`` always keeps it, ``head="load"`` always loads it.

Everything else must match: unknown keys, missing keys and shape mismatches
are reported by name in one ``ValueError`` (or, with ``strict=False``, one
warning, the matching leaves being loaded and the rest left as given).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

logger = logging.getLogger(__name__)

# Per architecture: (stem conv torch module, classifier torch module).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "mini_cnn": ("conv1", "fc"),
    "resnet_18": ("conv1", "fc"),
    "efficientnet_b0": ("features.0.0", "classifier.1"),
    "convnext_tiny": ("features.0.0", "classifier.2"),
    "vit_tiny": ("patch_embed.proj", "head"),
}
# Architectures whose stem kernel may be resampled spatially (the reference's 7x7 -> 3x3).
_RESAMPLED_STEMS = ("resnet_18",)
_HEAD_MODES = ("auto", "new", "load")
_DROPPED_LEAVES = ("num_batches_tracked",)
_STATS = {"running_mean": "mean", "running_var": "var"}

Path = tuple[str, ...]


def flax_module_path(torch_module: str) -> Path:
  """``"layer1.0.downsample.0"`` -> ``("layer1_0", "downsample_0")``: numeric parts join their parent."""
  path: list[str] = []
  for part in torch_module.split(".") if torch_module else ():
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path)


def flax_path(torch_key: str, targets: Mapping[Path, Any]) -> Path | None:
  """The flax leaf (``("params" | "batch_stats", *module, leaf)``) a torch key loads into.

  ``targets`` holds the model's leaves (flattened ``{"params": ..., **model_state}``);
  ``weight`` resolves to ``kernel`` or ``scale`` by what the module has.
  Returns ``None`` when the key has no counterpart.
  """
  module, _, leaf = torch_key.rpartition(".")
  path = flax_module_path(module)
  if leaf in _STATS:
    candidates = [("batch_stats", *path, _STATS[leaf])]
  elif leaf == "weight":
    candidates = [("params", *path, "kernel"), ("params", *path, "scale")]
  else:
    candidates = [("params", *path, leaf)]
  return next((c for c in candidates if c in targets), None)


def torch_key(path: Path) -> str:
  """The inverse of :func:`flax_path`: ``("params", "layer1_0", "conv1", "kernel")`` -> ``"layer1.0.conv1.weight"``."""
  collection, *module, leaf = path
  names = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
  if collection == "params" and leaf in ("mean", "var"):
    names = {}
  module = [re.sub(r"_(\d+)", r".\1", part) for part in module]
  return ".".join([*module, names.get(leaf, leaf)])


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch ``state_dict`` file (``torch.load(..., map_location="cpu", weights_only=True)``).

  Raises:
    ValueError: if the file does not hold a mapping of names to tensors.
  """
  import torch  # the shell's dependency; imported only when a file is read

  obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise ValueError(
        f"{os.fspath(path)!r} does not hold a state_dict (a mapping of names to tensors), got"
        f" {type(obj).__name__}; save one with torch.save(model.state_dict(), path)"
    )
  return as_numpy(obj)


def as_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A state_dict's values as numpy arrays (floating tensors as float32)."""
  out = {}
  for key, value in state_dict.items():
    if hasattr(value, "detach"):  # a torch tensor
      value = value.detach().cpu()
      value = value.float().numpy() if value.is_floating_point() else value.numpy()
    out[str(key)] = np.asarray(value)
  return out


def _resample_kernel(w_OIHW: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic resampling of conv kernels, as the reference (``F.interpolate(align_corners=True)``)."""
  import torch
  import torch.nn.functional as F

  with torch.no_grad():
    w = F.interpolate(torch.from_numpy(w_OIHW), size=size, mode="bicubic", align_corners=True)
  return w.numpy()


def _adapt_stem(w_OIHW: np.ndarray, want_HWIO: tuple[int, ...], resample: bool) -> tuple[np.ndarray, list[str]]:
  """The reference's stem surgery, in torch layout; returns the kernel and what was done."""
  notes = []
  kh, kw, cin = want_HWIO[0], want_HWIO[1], want_HWIO[2]
  if w_OIHW.ndim == 4 and resample and w_OIHW.shape[2:] != (kh, kw):
    w_OIHW = _resample_kernel(w_OIHW, (kh, kw))
    notes.append(f"resampled bicubically to {kh}x{kw}")
  if w_OIHW.ndim == 4 and w_OIHW.shape[1] == 3 and cin == 1:
    w_OIHW = w_OIHW.mean(axis=1, keepdims=True)
    notes.append("averaged over its 3 input channels for a 1-channel input")
  return w_OIHW, notes


def _to_flax_layout(value: np.ndarray, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
  """torch layout -> flax layout for one leaf (see the module docstring)."""
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if value.shape != shape and value.size == int(np.prod(shape)):
    if tuple(d for d in value.shape if d != 1) == tuple(d for d in shape if d != 1):
      return value.reshape(shape)
  return value


def load_torch_state_dict(
    source: str | os.PathLike | Mapping[str, Any],
    model_name: str,
    *,
    params: Any,
    model_state: Any,
    head: str = "auto",
    strict: bool = True,
) -> tuple[Any, Any]:
  """Loads a torchvision/timm ``state_dict`` into a built-in model's ``(params, model_state)``.

  Args:
    source: a path to a file saved with ``torch.save(model.state_dict(), path)``
      (read with ``weights_only=True``; nothing is downloaded), or the
      mapping itself (torch tensors or arrays).
    model_name: one of :data:`ARCHITECTURES` (``"resnet_18"``,
      ``"efficientnet_b0"``, ``"convnext_tiny"``, ``"vit_tiny"``,
      ``"mini_cnn"``); it names the stem and head modules.
    params, model_state: the target model's initial values (from
      ``model.init``); they give the shapes, dtypes, the input channel count
      and the class count, and supply every leaf that is not loaded (the new
      head). When every leaf is loaded, shape structs suffice
      (``jax.eval_shape(model.init, ...)``), which skips initialisation.
    head: ``"auto"``, ``"new"`` or ``"load"`` (see the module docstring).
    strict: raise on unknown keys, missing keys and shape mismatches (True),
      or warn and load what fits (False).

  Returns:
    ``(params, model_state)`` of the same structure, shapes and dtypes.

  Raises:
    ValueError: for an unknown ``model_name`` or ``head``, a file that holds
      no state_dict, or (``strict=True``) a checkpoint that does not fit,
      naming every offending key.
  """
  if model_name not in ARCHITECTURES:
    raise ValueError(f"unknown model_name={model_name!r}; allowed: {sorted(ARCHITECTURES)}")
  if head not in _HEAD_MODES:
    raise ValueError(f"head must be one of {_HEAD_MODES}, got head={head!r}")
  state_dict = as_numpy(source) if isinstance(source, Mapping) else read_state_dict(source)
  targets = traverse_util.flatten_dict({"params": params, **dict(model_state)})
  stem, head_module = ARCHITECTURES[model_name]
  head_prefix = ("params", *flax_module_path(head_module))
  head_paths = {p for p in targets if p[: len(head_prefix)] == head_prefix}

  loaded, unknown, mismatched, sources = {}, [], [], {}
  for key, value in state_dict.items():
    if key.rpartition(".")[2] in _DROPPED_LEAVES:
      continue
    path = flax_path(key, targets)
    if path is None:
      unknown.append(key)
      continue
    want = tuple(targets[path].shape)
    if key == f"{stem}.weight":
      value, notes = _adapt_stem(value, want, model_name in _RESAMPLED_STEMS)
      for note in notes:
        logger.info("stem %s: %s", key, note)
    sources[path] = (key, value.shape)
    loaded[path] = _to_flax_layout(value, path[-1], want)

  head_fits = all(p in loaded and loaded[p].shape == targets[p].shape for p in head_paths)
  new_head = head == "new" or (head == "auto" and not head_fits)
  if new_head:
    logger.info("keeping the given (new) classification head %r", head_module)
    loaded = {p: v for p, v in loaded.items() if p not in head_paths}
  for path, value in list(loaded.items()):
    if value.shape != targets[path].shape:
      key, shape = sources[path]
      mismatched.append(f"{key}: checkpoint {tuple(shape)}, model {'/'.join(path)}"
                        f" {tuple(targets[path].shape)} (torch layout"
                        f" {_torch_shape(path[-1], targets[path].shape)})")
      del loaded[path]
  missing = [torch_key(p) for p in targets if p not in loaded and not (new_head and p in head_paths)]
  problems = _describe(model_name, unknown, missing, mismatched)
  if problems:
    if strict:
      raise ValueError(problems)
    warnings.warn(problems + "; loaded the leaves that fit (strict=False)", stacklevel=2)

  abstract = [torch_key(p) for p in targets if p not in loaded and not hasattr(targets[p], "__array__")]
  if abstract:
    raise ValueError(
        f"no values for {sorted(abstract)}: they are not loaded from the state_dict and the given"
        " params/model_state hold only their shapes (e.g. from jax.eval_shape); pass initialised values"
    )
  merged = {p: (jnp.asarray(loaded[p], targets[p].dtype) if p in loaded else targets[p]) for p in targets}
  tree = traverse_util.unflatten_dict(merged)
  new_params = tree.pop("params", {})
  return new_params, {k: tree.get(k, v) for k, v in dict(model_state).items()}


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _describe(model_name: str, unknown: list[str], missing: list[str], mismatched: list[str]) -> str:
  parts = []
  if unknown:
    parts.append(f"{len(unknown)} unknown key(s) {sorted(unknown)}")
  if missing:
    parts.append(f"{len(missing)} missing key(s) {sorted(missing)}")
  if mismatched:
    parts.append(f"{len(mismatched)} shape mismatch(es) [{'; '.join(sorted(mismatched))}]")
  return f"state_dict does not fit {model_name}: " + "; ".join(parts) if parts else ""
