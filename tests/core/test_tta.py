"""The TTA ensemble against torchvision's ops and the reference's ``adaptive_tta_predict``."""

import functools
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchard_jax.core import tta
from orchard_jax.models import MiniCNN, as_model
from tests.models.test_mini_cnn import _to_flax, _torch_model
from tests.torchvision_cpu import import_functional

import_functional()
import torchvision.transforms.functional as TF  # noqa: E402  (the reference's v1 functional, after the CPU stubs)

FLAGS = list(itertools.product([False, True], repeat=2))  # (anatomical, texture_based)


# --- the reference, restated: orchard-ml 0.2.6, orchard/evaluation/tta.py ------------------------------------
def _get_tta_transforms(is_anatomical, is_texture_based, aug_cfg, resolution):
  tta_mode = aug_cfg.tta_mode
  scale_factor = resolution / 224
  tta_translate = aug_cfg.tta_translate * scale_factor
  tta_scale = 1.0 + (aug_cfg.tta_scale - 1.0) * scale_factor
  tta_blur_sigma = aug_cfg.tta_blur_sigma * scale_factor
  t_list = [(lambda x: x)]
  if not is_anatomical:
    t_list.append(lambda x: torch.flip(x, dims=[3]))
  if not is_texture_based:
    _translate, _scale = tta_translate, tta_scale
    _sigma = max(tta_blur_sigma, 0.01)
    _kernel = aug_cfg.tta_blur_kernel_size
    t_list.extend([
        (lambda x: TF.affine(x, angle=0, translate=(_translate, _translate), scale=1.0, shear=0)),
        (lambda x: TF.affine(x, angle=0, translate=(0, 0), scale=_scale, shear=0)),
        (lambda x: TF.gaussian_blur(x, kernel_size=_kernel, sigma=_sigma)),
    ])
  if not is_anatomical and not is_texture_based:
    if tta_mode == "full":
      t_list.extend([(lambda x: torch.rot90(x, k=1, dims=[2, 3])), (lambda x: torch.rot90(x, k=2, dims=[2, 3])),
                     (lambda x: torch.rot90(x, k=3, dims=[2, 3]))])
    else:
      t_list.append(lambda x: torch.flip(x, dims=[2]))
  return t_list


def adaptive_tta_predict(model, inputs, device, is_anatomical, is_texture_based, aug_cfg, resolution):
  model.eval()
  inputs = inputs.to(device)
  transforms = _get_tta_transforms(is_anatomical, is_texture_based, aug_cfg, resolution)
  ensemble_probs = None
  with torch.no_grad():
    for t in transforms:
      probs = F.softmax(model(t(inputs)), dim=1)
      ensemble_probs = probs if ensemble_probs is None else ensemble_probs + probs
  return ensemble_probs / len(transforms)
# ---------------------------------------------------------------------------------------------------------------


def _aug_cfg(spec):
  return types.SimpleNamespace(tta_mode=spec.mode, tta_translate=spec.translate, tta_scale=spec.scale,
                               tta_blur_sigma=spec.blur_sigma, tta_blur_kernel_size=spec.blur_kernel_size)


def _images(batch=4, size=28, channels=3, seed=0):
  """Normalised-looking NHWC inputs (the reference's TTA sees normalised batches) and their NCHW copy."""
  x = np.random.default_rng(seed).normal(size=(batch, size, size, channels)).astype(np.float32)
  return jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("mode", tta.MODES)
@pytest.mark.parametrize("anatomical,texture_based", FLAGS)
def test_views_equal_the_references_transforms_in_its_order(anatomical, texture_based, mode):
  spec = tta.TTASpec(anatomical, texture_based, mode, resolution=28)
  x, x_t = _images()
  ours = np.asarray(tta.views(x, spec))
  theirs = [_nhwc(t(x_t)) for t in _get_tta_transforms(anatomical, texture_based, _aug_cfg(spec), 28)]
  assert ours.shape[0] == len(theirs) == len(spec.view_names)
  for name, a, b in zip(spec.view_names, ours, theirs):
    if name == "blur":
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
    else:  # flips, rotations and nearest-neighbour shift and zoom pick the same pixels
      np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("kernel_size,sigma", [(3, 0.05), (3, 0.7), (5, 1.3), (7, 0.01), (1, 0.4)])
def test_blur_equals_torchvision(kernel_size, sigma):
  x, x_t = _images()
  np.testing.assert_allclose(tta.gaussian_blur(x, kernel_size, sigma),
                             _nhwc(TF.gaussian_blur(x_t, kernel_size=kernel_size, sigma=sigma)), rtol=0, atol=1e-5)


def _off_boundary(source_1d):
  """Pixels whose exact (float64) source row and column are not within 1e-4 of nearest neighbour's rounding
  boundary: at the boundary the float32 rounding of the coordinate decides, which torch computes with its own
  order of operations (a ``bmm``)."""
  ok = np.abs(np.abs(source_1d - np.floor(source_1d)) - 0.5) > 1e-4
  return ok[:, None] & ok[None, :]


@pytest.mark.parametrize("resolution", [28, 224])
@pytest.mark.parametrize("translate,scale", [(2.0, 1.1), (3.0, 1.3), (6.0, 0.8), (4.0, 1.1)])
def test_shift_and_zoom_equal_torchvision_at_each_resolution(resolution, translate, scale):
  """Fractional shifts (0.25 px at 28; 0.5 px for translate 4 at 28), zoom in and out (0 outside): the same
  pixels but where the source lands on a rounding boundary, everywhere at 28 px with the default strengths."""
  spec = tta.TTASpec(False, False, translate=translate, scale=scale, resolution=resolution)
  t, s, _ = spec.scaled
  x, x_t = _images(batch=4 if resolution == 28 else 1, size=resolution, channels=1)
  centred = np.arange(resolution) - (resolution - 1) / 2
  for name, theirs, source in (
      ("translate", TF.affine(x_t, angle=0, translate=(t, t), scale=1.0, shear=0), centred - t),
      ("zoom", TF.affine(x_t, angle=0, translate=(0, 0), scale=s, shear=0), centred / s)):
    ours, theirs = np.asarray(tta._view(x, name, spec))[..., 0], _nhwc(theirs)[..., 0]
    where = np.broadcast_to(_off_boundary(source + (resolution - 1) / 2), ours.shape)
    if resolution == 28 and (translate, scale) == (2.0, 1.1):
      assert where.all(), name
    np.testing.assert_array_equal(ours[where], theirs[where], err_msg=name)


def test_the_scaled_strengths_are_the_references():
  assert tta.TTASpec(False, False, resolution=28).scaled == (0.25, 1.0 + 0.1 * 28 / 224, 0.05)
  assert tta.TTASpec(False, False, blur_sigma=0.0, resolution=224).scaled == (2.0, 1.1, 0.01)


@pytest.fixture(scope="module")
def models():
  """The reference's MiniCNN in torch (random weights and BN statistics) and its weights converted to ours, as
  a ``logits_fn`` that runs the jitted model on chunks of 4 images (per-sample in evaluation mode), so that
  the ensembles of 1 to 8 views share one compiled model per channel count."""
  out = {}
  for channels in (1, 3):
    m = _torch_model(channels, num_classes=5, seed=channels).eval()
    params, state = _to_flax(m)
    model = as_model(MiniCNN(5))
    apply = jax.jit(lambda x, p=params, s=state, mod=model: mod.apply(p, s, x, train=False,
                                                                      rng=jax.random.key(0))[0])
    out[channels] = m, lambda x, apply=apply: jnp.concatenate([apply(x[i:i + 4]) for i in range(0, len(x), 4)])
  return out


# At 28 px the default shift (0.25 px), zoom (1.0125) and blur (sigma 0.05) leave the images as they are, in
# the reference as here; "strong" strengths (1 px, 1.1, sigma 0.5, kernel 5 at 28 px) make those views count.
STRENGTHS = {"default": {}, "strong": dict(translate=8.0, scale=1.8, blur_sigma=4.0, blur_kernel_size=5)}


ENSEMBLES = ([(*flags, mode, "default", 3) for flags in FLAGS for mode in tta.MODES]
             + [(False, False, "full", "strong", 1), (False, False, "light", "strong", 1),
                (True, False, "full", "strong", 1)])  # the strong strengths where shift, zoom and blur run


@pytest.mark.parametrize("anatomical,texture_based,mode,strengths,channels", ENSEMBLES)
def test_ensemble_equals_adaptive_tta_predict(models, anatomical, texture_based, mode, strengths, channels):
  torch_model, logits_fn = models[channels]
  spec = tta.TTASpec(anatomical, texture_based, mode, resolution=28, **STRENGTHS[strengths])
  x, x_t = _images(batch=4, channels=channels, seed=2)
  ours = tta.tta_probabilities(logits_fn, x, spec)
  theirs = adaptive_tta_predict(torch_model, x_t, "cpu", anatomical, texture_based, _aug_cfg(spec), 28)
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-5)
  # the views matter: the ensemble differs from the plain prediction unless every view is the image itself
  plain = jax.nn.softmax(logits_fn(x), axis=-1)
  every_view_is_identity = all(np.array_equal(v, x) for v in tta.views(x, spec))
  assert (np.abs(np.asarray(ours - plain)).max() > 1e-4) != every_view_is_identity
  assert every_view_is_identity == (anatomical and strengths == "default" or len(spec.view_names) == 1)


def test_the_model_sees_all_views_in_one_call():
  spec = tta.TTASpec(False, False, "full", resolution=28)
  calls = []

  def logits_fn(x):
    calls.append(x.shape)
    return x.mean(axis=(1, 2))

  x, _ = _images()
  probs = tta.tta_probabilities(logits_fn, x, spec)
  assert calls == [(8 * 4, 28, 28, 3)]
  assert probs.shape == (4, 3) and probs.dtype == jnp.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_bad_specs_and_shapes_are_refused_in_one_line():
  with pytest.raises(ValueError, match=r"mode must be one of \('full', 'light'\), got mode='heavy'"):
    tta.TTASpec(False, False, "heavy")
  with pytest.raises(ValueError, match="blur_kernel_size must be an odd int >= 1, got blur_kernel_size=4"):
    tta.TTASpec(False, False, blur_kernel_size=4)
  for field, value in (("translate", -1.0), ("scale", 0.0), ("blur_sigma", -0.1), ("resolution", 0)):
    with pytest.raises(ValueError, match=f"TTASpec.{field} must be"):
      tta.TTASpec(False, False, **{field: value})
  x = jax.ShapeDtypeStruct((2, 6, 8, 1), jnp.float32)
  with pytest.raises(ValueError, match="needs square images, got 6x8"):
    jax.eval_shape(functools.partial(tta.views, spec=tta.TTASpec(False, False, "full")), x)
  assert jax.eval_shape(functools.partial(tta.views, spec=tta.TTASpec(False, False, "light")), x).shape == (6, 2, 6, 8, 1)
  with pytest.raises(ValueError, match=r"larger than kernel_size // 2 = 3, got 3x3"):
    jax.eval_shape(functools.partial(tta.gaussian_blur, kernel_size=7, sigma=1.0),
                   jax.ShapeDtypeStruct((1, 3, 3, 1), jnp.float32))
