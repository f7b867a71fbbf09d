"""Minimal torch re-implementations of torchvision/timm classifiers, for parity tests.

Each module has the same structure and ``state_dict`` keys as the original
(``torchvision.models.resnet18``, ``efficientnet_b0``, ``convnext_tiny``;
timm's ``vit_tiny_patch16_224``), so tests need neither torchvision nor timm.
Also: helpers to randomise a module's weights and statistics, to save its
state_dict, and to compare logits with an orchard_jax model.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k, stride=1, groups=1, act=True, eps=1e-5):
  """torchvision's Conv2dNormActivation: keys ``0.weight``, ``1.{weight,bias,running_*}``."""
  layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps)]
  return nn.Sequential(*layers, *([nn.SiLU()] if act else []))


# ----------------------------------------------------------------- ResNet-18 --


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
  """torchvision resnet18; ``low_res`` applies the reference's stem surgery (3x3/1 conv, no pool)."""

  def __init__(self, num_classes=1000, in_channels=3, low_res=False):
    super().__init__()
    if low_res:
      self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    else:
      self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for i, cout in enumerate((64, 128, 256, 512), start=1):
      stride = 1 if i == 1 else 2
      setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
      cin = cout
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------- EfficientNet-B0 --


class SqueezeExcitation(nn.Module):
  def __init__(self, channels, squeeze):
    super().__init__()
    self.fc1 = nn.Conv2d(channels, squeeze, 1)
    self.fc2 = nn.Conv2d(squeeze, channels, 1)

  def forward(self, x):
    s = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
    return x * torch.sigmoid(s)


class MBConv(nn.Module):
  def __init__(self, expand, k, stride, cin, cout):
    super().__init__()
    hidden = cin * expand
    layers = [conv_bn(cin, hidden, 1)] if hidden != cin else []
    layers += [conv_bn(hidden, hidden, k, stride, groups=hidden),
               SqueezeExcitation(hidden, max(1, cin // 4)), conv_bn(hidden, cout, 1, act=False)]
    self.block = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    return self.block(x) + x if self.residual else self.block(x)


B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
      (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


class EfficientNetB0(nn.Module):
  """torchvision efficientnet_b0 (eval-mode forward: no stochastic depth, no dropout)."""

  def __init__(self, num_classes=1000, in_channels=3):
    super().__init__()
    stages = [conv_bn(in_channels, 32, 3, 2)]
    for expand, k, stride, cin, cout, n in B0:
      stages.append(nn.Sequential(*[MBConv(expand, k, stride if j == 0 else 1, cin if j == 0 else cout, cout)
                                    for j in range(n)]))
    stages.append(conv_bn(320, 1280, 1))
    self.features = nn.Sequential(*stages)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


# ------------------------------------------------------------- ConvNeXt-Tiny --


class LayerNorm2d(nn.LayerNorm):
  def forward(self, x):
    return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                        self.eps).permute(0, 3, 1, 2)


class Permute(nn.Module):
  def __init__(self, dims):
    super().__init__()
    self.dims = dims

  def forward(self, x):
    return x.permute(*self.dims)


class CNBlock(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.block = nn.Sequential(
        nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute((0, 2, 3, 1)), nn.LayerNorm(dim, eps=1e-6),
        nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Permute((0, 3, 1, 2)))
    self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * 1e-6)

  def forward(self, x):
    return self.layer_scale * self.block(x) + x


class ConvNeXtTiny(nn.Module):
  """torchvision convnext_tiny (eval-mode forward)."""

  def __init__(self, num_classes=1000, in_channels=3):
    super().__init__()
    dims, depths = (96, 192, 384, 768), (3, 3, 9, 3)
    layers = [nn.Sequential(nn.Conv2d(in_channels, 96, 4, 4), LayerNorm2d(96, eps=1e-6))]
    for i, (dim, depth) in enumerate(zip(dims, depths)):
      layers.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
      if i < 3:
        layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(LayerNorm2d(768, eps=1e-6), nn.Flatten(1), nn.Linear(768, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3), keepdim=True))


# ------------------------------------------------------------------ ViT-Tiny --


class PatchEmbed(nn.Module):
  def __init__(self, in_channels, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(in_channels, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    attn = ((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
  """timm vit_tiny_patch16_224 (``img_size`` sets the position-embedding length)."""

  def __init__(self, num_classes=1000, in_channels=3, img_size=224, dim=192, depth=12, heads=3, patch=16):
    super().__init__()
    self.patch_embed = PatchEmbed(in_channels, dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size // patch) ** 2, dim) * 0.02)
    self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    return self.head(self.norm(self.blocks(x))[:, 0])


# ------------------------------------------------------------------- helpers --


def randomize_(module: nn.Module, seed: int = 0, calibrate: torch.Tensor | None = None) -> nn.Module:
  """Seeds the weights and gives every norm layer non-trivial affine params and statistics.

  Weights keep torch's default initialisation (seeded); BatchNorm/LayerNorm
  scales are drawn from U(0.8, 1.2) and biases from U(-0.1, 0.1); ConvNeXt's
  ``layer_scale`` from U(0.1, 0.3) (its 1e-6 default would hide the
  blocks); ViT tokens from N(0, 0.02). BatchNorm running statistics are those
  of a train-mode pass over ``calibrate`` (so eval-mode activations stay of
  order one through the depth), then perturbed by factors in U(0.8, 1.2).
  Returns the module in eval mode.
  """
  torch.manual_seed(seed)
  for m in module.modules():
    if hasattr(m, "reset_parameters") and not isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
      m.reset_parameters()
  bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("layer_scale"):
        p.uniform_(0.1, 0.3)
      elif name in ("cls_token", "pos_embed"):
        p.normal_(0.0, 0.02)
    for m in module.modules():
      if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
        m.weight.uniform_(0.8, 1.2)
        m.bias.uniform_(-0.1, 0.1)
    if calibrate is not None and bns:
      for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: the stats of this one pass
      module.train()(calibrate)
      for bn in bns:
        bn.momentum = 0.1
    for bn in bns:
      bn.running_mean.mul_(torch.empty_like(bn.running_mean).uniform_(0.8, 1.2))
      bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.2))
  return module.eval()


def save_state_dict(module: nn.Module, path) -> str:
  torch.save(module.state_dict(), path)
  return str(path)


def n_params(tree_or_module) -> int:
  """Trainable parameter count of a torch module or a pytree of arrays / shape structs."""
  if isinstance(tree_or_module, nn.Module):
    return sum(p.numel() for p in tree_or_module.parameters() if p.requires_grad)
  return sum(math.prod(a.shape) for a in jax.tree.leaves(tree_or_module))


def random_images(batch: int, size: int, channels: int = 3, seed: int = 1):
  """A random NCHW torch batch and its NHWC jax copy."""
  x = np.random.default_rng(seed).normal(size=(batch, channels, size, size)).astype(np.float32)
  return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def torch_logits(module: nn.Module, x: torch.Tensor) -> np.ndarray:
  with torch.no_grad():
    return module.eval()(x).numpy()


@functools.partial(jax.jit, static_argnums=0)
def eval_logits(model, params, model_state, x):
  """Eval-mode logits of an orchard_jax model (jitted; tests with equal models share the compile)."""
  return model.apply(params, model_state, x, train=False, rng=jax.random.key(0))[0]


def abstract_init(model, x):
  """``(params, model_state)`` shape structs of ``model`` for inputs like ``x`` (no initialisation)."""
  return jax.eval_shape(model.init, jax.random.key(0), x)


def one_train_step(module, size: int, channels: int, precision: str, num_classes: int = 3):
  """Builds a TrainState for ``module`` and runs one ``train_step`` on a random batch of 2.

  Returns ``(before, after, metrics)``: the state's ``(params, model_state)``
  as numpy before the step, the new state, and the step's metrics.
  """
  from orchard_jax.core.state import create_train_state
  from orchard_jax.core.steps import train_step

  state = create_train_state(module, input_shape=(size, size, channels), num_classes=num_classes,
                             precision=precision, seed=0)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(2, size, size, channels)), jnp.float32),
           "label": jnp.asarray([0, num_classes - 1], jnp.int32), "mask": jnp.ones(2, jnp.bool_)}
  before = jax.tree.map(np.asarray, (state.params, state.model_state))
  after, metrics = train_step(state, batch)
  return before, after, metrics


def forward_dtypes(state, size: int, channels: int, train: bool = True):
  """The dtypes of ``(logits, model_state)`` the state's model gives in the policy's compute dtype.

  Traced with ``jax.eval_shape`` (nothing is compiled), with params and
  input cast as the core casts them.
  """
  policy, model = state.spec.policy, state.spec.model
  x = jnp.zeros((2, size, size, channels), policy.compute_dtype)
  logits, model_state = jax.eval_shape(
      lambda p, s, x: model.apply(p, s, x, train=train, rng=jax.random.key(0)),
      policy.cast_to_compute(state.params), state.model_state, x)
  return logits.dtype, {a.dtype for a in jax.tree.leaves(model_state)}


def check_train_step(module, size: int, channels: int, precision: str, stem: str, head: str):
  """Asserts what every architecture's train step must give.

  Finite loss over both samples; params stay float32 and finite, and the
  first (``stem``) and last (``head``) layers' kernels move (the gradient
  crossed the whole network); running statistics stay float32, finite, and
  all move; the module's logits come out in the policy's compute dtype.
  Returns the initial ``(params, model_state)`` (numpy) for further checks.
  """
  before, after, metrics = one_train_step(module, size, channels, precision)
  assert float(metrics["count"]) == 2.0
  assert np.isfinite(float(metrics["loss_sum"]))
  assert {a.dtype for a in jax.tree.leaves(after.params)} == {np.dtype(np.float32)}
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(after.params))
  for name in (stem, head):
    path = (*name.split("/"), "kernel")
    old, new = before[0], after.params
    for key in path:
      old, new = old[key], new[key]
    assert not np.array_equal(np.asarray(new), old), f"{name} did not move in one SGD step"
  stats = jax.tree.leaves(after.model_state)
  assert all(a.dtype == np.float32 and np.isfinite(np.asarray(a)).all() for a in stats)
  if stats:
    moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), after.model_state, before[1])
    assert all(jax.tree.leaves(moved)), "train mode should update every running statistic"
  logits_dtype, state_dtypes = forward_dtypes(after, size, channels)
  assert logits_dtype == after.spec.policy.compute_dtype
  assert state_dtypes <= {np.dtype(np.float32)}
  return before


def numpy_init(model, x, seed: int = 0, scale: float = 0.1):
  """``(params, model_state)`` drawn with numpy (N(0, scale^2) params, BN mean 0 / var 1).

  Cheaper than ``model.init`` on XLA:CPU, whose threefry draws compile slowly.
  """
  rng = np.random.default_rng(seed)
  params, state = abstract_init(model, x)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), params)
  state = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.full(s.shape, 1.0 if path[-1].key == "var" else 0.0, s.dtype), state)
  return params, state
