"""The ``augmentation`` configuration: training augmentation on the device, and TTA's settings.

:class:`AugmentationConfig` is the reference's ``augmentation:`` section (orchard-ml's
``AugmentationConfig``: the same field names, defaults and ranges), plus the dataset's two
flags that decide which transforms apply (the reference reads them from its dataset
registry; a recipe sets them in its ``dataset:`` section) and the inputs' normalisation.

It hangs on :attr:`orchard_jax.TrainingConfig.augmentation`: ``None`` (the default) trains
without on-device augmentation, so that a Python user's own transforms (torchvision in a
DataLoader) stay the only ones; an ``AugmentationConfig`` turns it on. The training step
then applies, to every gathered batch, in the reference's order: a horizontal flip with
probability ``hflip`` and a rotation by an angle uniform in ``±rotation_angle`` degrees
(both skipped for anatomical data), a colour jitter of strength ``jitter_val`` (skipped for
texture-based data; saturation too for 3-channel inputs) and a random resized crop of scale
``[min_scale, 1]`` back to the input size (see :mod:`orchard_jax.core.augment`).

``hflip``, ``rotation_angle``, ``jitter_val`` and ``min_scale`` are per trial: they live in
the trial's state as arrays (``Hyperparams.augment``), so trials that differ only in them
share one compiled step and one cohort. The flags and the normalisation are structure:
they decide what the step compiles. The ``tta_*`` fields are read by the test-time
augmentation of the final evaluation (``TrainingConfig.use_tta``), never inside trials.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BeforeValidator, Field

from orchard_jax.config_base import ConfigError, Says, _Config, brief, validated
from orchard_jax.config_fields import Int

__all__ = ["AugmentationConfig"]


def _channels(value: tuple[float, ...] | None) -> tuple[float, ...] | None:
  if value is not None and not value:
    raise ValueError("must be None or a non-empty list of floats (one per channel), got ()")
  return value


Channels = Annotated[tuple[float, ...] | None,
                     BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v),
                     Says("None or a list of floats (one per channel)"), AfterValidator(_channels)]


@validated
class AugmentationConfig(_Config):
  """Training augmentation on the device and the settings of test-time augmentation.

  Attributes:
    hflip: Probability of a horizontal flip, in ``[0, 1]``.
    rotation_angle: Largest rotation in degrees, an int in ``[0, 360]``; each sample is
      rotated by an angle uniform in ``[-rotation_angle, rotation_angle]`` (nearest
      neighbour, about the centre, fill 0).
    jitter_val: Colour jitter strength, ``>= 0``: brightness and contrast (and saturation
      for 3-channel inputs) factors uniform in ``[max(0, 1 - jitter_val), 1 + jitter_val]``.
    min_scale: Smallest area share of the random resized crop, in ``[0, 1]`` (scale
      ``[min_scale, 1]``, aspect ratio ``[3/4, 4/3]``, resized back bilinearly).
    tta_mode: ``'full'`` (the TTA ensemble adds rotations by 90, 180 and 270 degrees) or
      ``'light'`` (a vertical flip instead).
    tta_translate: TTA's shift in pixels at 224 px, in ``[0, 50]``.
    tta_scale: TTA's zoom factor, in ``(0, 2]``.
    tta_blur_sigma: TTA's Gaussian blur sigma at 224 px, in ``[0, 5]``.
    tta_blur_kernel_size: TTA's Gaussian blur kernel size, an odd int in ``[1, 31]``.
    is_anatomical: The data has a meaningful orientation (organ scans): no flip and no
      rotation, in training or in TTA.
    is_texture_based: The data's classes are textures (tissue patches): no colour jitter in
      training, no translation, zoom or blur in TTA.
    mean: The per-channel mean the inputs were normalised with (``(x - mean) / std``), or
      None for inputs in ``[0, 1]`` (the recipes' sources). The transforms work on
      ``[0, 1]`` images, as the reference's do before its ``Normalize``: with ``mean`` and
      ``std`` they un-normalise first and normalise after. Given together, one value per
      channel.
    std: The per-channel standard deviation, each ``> 0``; None with ``mean``.
  """

  hflip: float = Field(0.5, ge=0, le=1)
  rotation_angle: Int = Field(10, ge=0, le=360)
  jitter_val: float = Field(0.2, ge=0)
  min_scale: float = Field(0.9, ge=0, le=1)
  tta_mode: Literal["full", "light"] = "full"
  tta_translate: float = Field(2.0, ge=0, le=50)
  tta_scale: float = Field(1.1, gt=0, le=2)
  tta_blur_sigma: float = Field(0.4, ge=0, le=5)
  tta_blur_kernel_size: Int = Field(3, ge=1, le=31)
  is_anatomical: bool = False
  is_texture_based: bool = False
  mean: Channels = None
  std: Channels = None

  @pydantic.model_validator(mode="after")
  def _check_combinations(self) -> AugmentationConfig:
    if self.tta_blur_kernel_size % 2 == 0:
      raise ConfigError(f"AugmentationConfig.tta_blur_kernel_size must be odd, got "
                        f"{self.tta_blur_kernel_size}")
    if (self.mean is None) != (self.std is None):
      raise ConfigError(f"AugmentationConfig.mean and std must be given together (the inputs' "
                        f"normalisation) or both None, got mean={brief(self.mean)}, "
                        f"std={brief(self.std)}")
    if self.mean is not None and len(self.mean) != len(self.std):
      raise ConfigError(f"AugmentationConfig.mean and std must have one value per channel "
                        f"each, got {len(self.mean)} and {len(self.std)} values")
    if self.std is not None and min(self.std) <= 0:
      raise ConfigError(f"AugmentationConfig.std must be > 0 in every channel, got "
                        f"{brief(self.std)}")
    return self

  def to_dict(self) -> dict[str, Any]:
    """Every field by name, ``mean``/``std`` as lists (YAML-ready)."""
    out = _Config.to_dict(self)
    for key in ("mean", "std"):
      if out[key] is not None:
        out[key] = list(out[key])
    return out

  @property
  def strengths(self) -> dict[str, float]:
    """The per-trial strengths (``hflip``, ``rotation_angle``, ``jitter_val``,
    ``min_scale``) as floats: what a trial's state holds."""
    return {"hflip": float(self.hflip), "rotation_angle": float(self.rotation_angle),
            "jitter_val": float(self.jitter_val), "min_scale": float(self.min_scale)}
