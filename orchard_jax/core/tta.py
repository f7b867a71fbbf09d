"""The reference's test-time augmentation (TTA) ensemble as one batched program.

orchard-ml's ``evaluation/tta.py`` (``adaptive_tta_predict``) averages the softmax
probabilities of a model over views of each test batch, in this order:

1. the images as they are;
2. a horizontal flip (``torch.flip(x, dims=[3])``), unless the data is anatomical;
3. unless the data is texture-based: a shift by ``t`` pixels right and down
   (``TF.affine(x, angle=0, translate=(t, t), scale=1, shear=0)``), a zoom by ``s``
   (``TF.affine(x, angle=0, translate=(0, 0), scale=s, shear=0)``), both nearest
   neighbour with 0 outside, and a Gaussian blur (``TF.gaussian_blur(x, k, sigma)``,
   reflect padding);
4. unless anatomical or texture-based: rotations by 90, 180 and 270 degrees
   (``torch.rot90(x, k, dims=[2, 3])``, mode ``"full"``) or a vertical flip (``"light"``).

Shift, zoom and blur strengths scale with the resolution over 224:
``t = translate * r / 224``, ``s = 1 + (scale - 1) * r / 224``,
``sigma = max(blur_sigma * r / 224, 0.01)``; the shift stays fractional, as
torchvision's tensor ``affine`` keeps it. With the default strengths at 28 px these
three views are the images themselves, in the reference as here: nearest neighbour
rounds a 0.25 px shift away, a 1.0125 zoom moves no source by half a pixel, and a
sigma of 0.05 px leaves the blur's off-centre weights at ``exp(-200)``, 0 in float32.

The reference runs the views one by one on its *normalised* test batches, so the
shift's and zoom's fill 0 is 0 in the model's input space; :func:`views` works on
the model's inputs as given, for the same reason, and takes no normalisation.
:func:`tta_probabilities` runs every view through the model as one batch of
``V * B`` images: memory grows with the number of views (at most 8).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from orchard_jax.core import warp

MODES = ("full", "light")
BASELINE_RESOLUTION = 224  # the reference's _TTA_BASELINE_RESOLUTION
MIN_BLUR_SIGMA = 0.01  # the reference's floor: "blur sigma must be > 0"


@dataclasses.dataclass(frozen=True)
class TTASpec:
  """The ensemble's structure and strengths (static: hashable, part of what is compiled).

  Attributes:
    anatomical: The data has a meaningful orientation: no flips, no rotations.
    texture_based: The data's classes are textures: no shift, zoom or blur, no rotations.
    mode: ``"full"`` (rotations by 90, 180, 270 degrees) or ``"light"`` (a vertical flip).
    translate: Shift in pixels at 224 px (the reference's ``tta_translate``), ``>= 0``.
    scale: Zoom factor at 224 px (``tta_scale``), ``> 0``.
    blur_sigma: Gaussian blur sigma at 224 px (``tta_blur_sigma``), ``>= 0``.
    blur_kernel_size: Gaussian blur kernel size (``tta_blur_kernel_size``), odd, ``>= 1``.
    resolution: The dataset's resolution, which scales shift, zoom and blur by
      ``resolution / 224``, ``>= 1``.
  """

  anatomical: bool
  texture_based: bool
  mode: str = "full"
  translate: float = 2.0
  scale: float = 1.1
  blur_sigma: float = 0.4
  blur_kernel_size: int = 3
  resolution: int = 28

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"TTASpec.mode must be one of {MODES}, got mode={self.mode!r}")
    if not self.translate >= 0:
      raise ValueError(f"TTASpec.translate must be >= 0, got translate={self.translate}")
    if not self.scale > 0:
      raise ValueError(f"TTASpec.scale must be > 0, got scale={self.scale}")
    if not self.blur_sigma >= 0:
      raise ValueError(f"TTASpec.blur_sigma must be >= 0, got blur_sigma={self.blur_sigma}")
    if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
      raise ValueError(f"TTASpec.blur_kernel_size must be an odd int >= 1, got "
                       f"blur_kernel_size={self.blur_kernel_size}")
    if self.resolution < 1:
      raise ValueError(f"TTASpec.resolution must be >= 1, got resolution={self.resolution}")

  @property
  def scaled(self) -> tuple[float, float, float]:
    """``(translate, scale, sigma)`` at this resolution, in the reference's double precision."""
    factor = self.resolution / BASELINE_RESOLUTION
    sigma = max(self.blur_sigma * factor, MIN_BLUR_SIGMA)
    return self.translate * factor, 1.0 + (self.scale - 1.0) * factor, sigma

  @property
  def view_names(self) -> tuple[str, ...]:
    """The views, in the reference's order."""
    names = ["identity"]
    if not self.anatomical:
      names.append("hflip")
    if not self.texture_based:
      names += ["translate", "zoom", "blur"]
    if not self.anatomical and not self.texture_based:
      names += ["rot90", "rot180", "rot270"] if self.mode == "full" else ["vflip"]
    return tuple(names)


def gaussian_kernel1d(kernel_size: int, sigma: float) -> jax.Array:
  """torchvision's ``_get_gaussian_kernel1d``: ``exp(-x^2 / (2 sigma^2))`` on
  ``linspace(-(k-1)/2, (k-1)/2, k)``, normalised to sum 1 (float32)."""
  half = (kernel_size - 1) * 0.5
  x = jnp.linspace(-half, half, kernel_size, dtype=jnp.float32)
  pdf = jnp.exp(-0.5 * (x / jnp.float32(sigma)) ** 2)
  return pdf / pdf.sum()


def gaussian_blur(images_BxHxWxC: jax.Array, kernel_size: int, sigma: float) -> jax.Array:
  """``TF.gaussian_blur(x, kernel_size, sigma)`` on NHWC images: reflect padding, the
  same 1-D kernel along H and W (torchvision's 2-D kernel is their outer product).

  Applied as two passes of shifted sums, exact float32 arithmetic on every backend
  (no convolution whose precision a GPU may lower).
  """
  _, height, width, _ = images_BxHxWxC.shape
  pad = kernel_size // 2
  if pad >= min(height, width):
    raise ValueError(f"gaussian_blur's reflect padding needs images larger than kernel_size // 2 = {pad}, "
                     f"got {height}x{width}")
  kernel = gaussian_kernel1d(kernel_size, sigma)
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  along_w = sum(kernel[j] * padded[:, :, j:j + width, :] for j in range(kernel_size))
  return sum(kernel[i] * along_w[:, i:i + height, :, :] for i in range(kernel_size))


def _view(images: jax.Array, name: str, spec: TTASpec) -> jax.Array:
  translate, scale, sigma = spec.scaled
  no_shear = (0.0, 0.0)
  if name == "identity":
    return images
  if name == "hflip":
    return jnp.flip(images, axis=2)
  if name == "vflip":
    return jnp.flip(images, axis=1)
  if name == "translate":
    return warp.affine(images, 0.0, (translate, translate), 1.0, no_shear, "nearest")
  if name == "zoom":
    return warp.affine(images, 0.0, (0.0, 0.0), scale, no_shear, "nearest")
  if name == "blur":
    return gaussian_blur(images, spec.blur_kernel_size, sigma)
  # torch.rot90(x, k, dims=[2, 3]) on NCHW turns from H towards W; so does jnp.rot90 on axes (1, 2).
  quarter_turns = {"rot90": 1, "rot180": 2, "rot270": 3}[name]
  return jnp.rot90(images, quarter_turns, axes=(1, 2))


def views(images_BxHxWxC: jax.Array, spec: TTASpec) -> jax.Array:
  """The reference's TTA views of a batch, in its order: ``[V, B, H, W, C]``."""
  if images_BxHxWxC.ndim != 4:
    raise ValueError(f"views takes [B, H, W, C] images, got shape {images_BxHxWxC.shape}")
  _, height, width, _ = images_BxHxWxC.shape
  names = spec.view_names
  if height != width and "rot90" in names:
    raise ValueError(f"TTA mode 'full' rotates by 90 degrees, which needs square images, got {height}x{width} "
                     f"(use mode 'light')")
  return jnp.stack([_view(images_BxHxWxC, name, spec) for name in names])


def tta_probabilities(logits_fn: Callable[[jax.Array], jax.Array], images_BxHxWxC: jax.Array,
                      spec: TTASpec) -> jax.Array:
  """``adaptive_tta_predict``: the mean softmax over the views, ``[B, num_classes]`` float32.

  ``logits_fn`` maps ``[N, H, W, C]`` inputs to ``[N, num_classes]`` logits (a model
  in evaluation mode); it is called once, on all ``V * B`` views.
  """
  views_VxBxHxWxC = views(images_BxHxWxC, spec)
  num_views, batch = views_VxBxHxWxC.shape[:2]
  logits = logits_fn(views_VxBxHxWxC.reshape(num_views * batch, *views_VxBxHxWxC.shape[2:]))
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return probs.reshape(num_views, batch, -1).mean(axis=0)
