"""ViT-Tiny/16 (timm's ``vit_tiny_patch16_224`` layout; flax Linen, NHWC).

Submodules and parameters are named after timm's ``VisionTransformer``
attributes, a numeric index joining its parent with ``_`` (timm
``blocks.3.attn.qkv`` is flax ``blocks_3/attn/qkv``). Attention keeps timm's
fused ``qkv`` projection, so :mod:`orchard_jax.models.torch_weights` maps a
timm ``state_dict`` by name, without splitting it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from orchard_jax.models.resnet import check_classifier_args, check_input

LN_EPSILON = 1e-6
# timm: trunc_normal_(std=0.02) for Linear weights and pos_embed, normal(1e-6) for cls_token.
_INIT = nn.initializers.truncated_normal(stddev=0.02)
# timm keeps torch's default Conv2d init for the patch projection.
_PATCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

_layer_norm = functools.partial(nn.LayerNorm, epsilon=LN_EPSILON)
_dense = functools.partial(nn.Dense, kernel_init=_INIT)


def drop_path(rate: float, train: bool) -> nn.Dropout:
  """timm's ``DropPath`` for ``[B, N, D]`` tokens: whole samples' branches dropped, survivors rescaled."""
  return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train or rate == 0.0)


class PatchEmbed(nn.Module):
  """timm's ``PatchEmbed``: a ``patch x patch`` stride-``patch`` conv ``proj``, flattened to tokens."""

  patch_size: int
  embed_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), (p, p), padding="VALID", kernel_init=_PATCH_INIT,
                name="proj")(x)
    return x.reshape(x.shape[0], -1, self.embed_dim)


class Attention(nn.Module):
  """timm's ``Attention``: fused ``qkv`` Dense, scaled dot-product per head, ``proj`` Dense.

  ``qkv``'s output is laid out as timm's: ``[3, heads, head_dim]`` along the
  feature axis. The softmax runs in float32 and its weights are cast back to
  the compute dtype.
  """

  num_heads: int

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
    b, n, d = x_BxNxD.shape
    head_dim = d // self.num_heads
    qkv = _dense(3 * d, name="qkv")(x_BxNxD).reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, N, H, hd]
    logits_BxHxNxN = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
    weights = jax.nn.softmax(logits_BxHxNxN.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
    return _dense(d, name="proj")(out)


class Mlp(nn.Module):
  """timm's ``Mlp``: ``fc1`` (``hidden``) -> exact GELU -> ``fc2`` (back to the input width)."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.gelu(_dense(self.hidden, name="fc1")(x), approximate=False)
    return _dense(x.shape[-1], name="fc2")(y)


class Block(nn.Module):
  """timm's pre-norm ``Block``: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, with drop-path."""

  num_heads: int
  mlp_ratio: int
  drop_rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = Attention(self.num_heads, name="attn")(_layer_norm(name="norm1")(x))
    x = x + drop_path(self.drop_rate, train)(y)
    y = Mlp(self.mlp_ratio * x.shape[-1], name="mlp")(_layer_norm(name="norm2")(x))
    return x + drop_path(self.drop_rate, train)(y)


class ViTTiny(nn.Module):
  """timm's ``vit_tiny_patch16_224``: embed 192, depth 12, 3 heads, MLP ratio 4, class token.

  ::

    patch_embed/proj: conv 16x16/16 (192) -> tokens [B, HW/256, 192]
    prepend cls_token, add pos_embed ([1, 1 + HW/256, 192], learned)
    blocks_0..11: pre-norm Blocks (LayerNorm eps 1e-6, exact GELU)
    norm (LayerNorm) -> the class token -> dropout -> head (Dense)

  Trainable parameters: 5,717,416 for 3 channels, 1000 classes and 224 px.
  The position embedding is sized by the input seen at ``init`` (197 tokens
  at 224 px, as the timm model); a pretrained 224-px ``pos_embed`` therefore
  loads only into a model initialised at 224 px. ``H`` and ``W`` must be
  multiples of ``patch_size``. Drop-path rates grow linearly over the blocks
  from 0 to ``drop_path`` (timm's ``drop_path_rate``, default 0); identity in
  eval mode. Initialisation as timm's default: truncated normal (std 0.02)
  for Linear weights and ``pos_embed``, normal (std 1e-6) for ``cls_token``,
  torch's default for the patch projection.

  Attributes:
    num_classes: number of logits, >= 1.
    dropout: dropout rate in [0, 1) before the head (timm's ``drop_rate``, default 0).
    drop_path: the last block's drop-path rate, in [0, 1).
    in_channels: if given, ``__call__`` checks the input channel count.
    patch_size, embed_dim, depth, num_heads, mlp_ratio: the architecture
      (defaults: ViT-Tiny/16).
  """

  num_classes: int
  dropout: float = 0.0
  drop_path: float = 0.0
  in_channels: int | None = None
  patch_size: int = 16
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: int = 4

  def __post_init__(self):
    check_classifier_args(self.num_classes, self.dropout, self.in_channels)
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"drop_path must be in [0, 1), got drop_path={self.drop_path}")
    if self.embed_dim % self.num_heads:
      raise ValueError(
          f"embed_dim must be a multiple of num_heads, got embed_dim={self.embed_dim},"
          f" num_heads={self.num_heads}"
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """``x``: ``[B, H, W, C]``, ``H`` and ``W`` multiples of ``patch_size`` -> logits ``[B, num_classes]``."""
    check_input("ViTTiny", x, self.in_channels)
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(
          f"ViTTiny needs H and W that are multiples of patch_size={p}, got shape {x.shape} (NHWC)"
      )
    tokens = PatchEmbed(p, self.embed_dim, name="patch_embed")(x)
    b, n, d = tokens.shape
    if self.has_variable("params", "pos_embed"):
      tokens_built = self.get_variable("params", "pos_embed").shape[1]
      if tokens_built != n + 1:
        raise ValueError(
            f"ViTTiny's pos_embed has {tokens_built} tokens (1 + the patches of the input it was"
            f" initialised with); inputs of shape {x.shape} give 1 + {n}"
        )
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
    pos = self.param("pos_embed", _INIT, (1, n + 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(tokens.dtype), (b, 1, d)), tokens], axis=1)
    x = x + pos.astype(tokens.dtype)
    for i in range(self.depth):
      rate = self.drop_path * i / (self.depth - 1) if self.depth > 1 else self.drop_path
      x = Block(self.num_heads, self.mlp_ratio, rate, name=f"blocks_{i}")(x, train)
    x = _layer_norm(name="norm")(x)[:, 0]
    x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
    return _dense(self.num_classes, name="head")(x)
