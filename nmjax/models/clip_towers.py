"""The building blocks of CLIP's two towers: a pre-LN transformer, the ModifiedResNet, a ViT.

Each module is named after the open_clip module it mirrors, so that a PyTorch state dict maps onto
these variables by one rule (see nmjax.models.clip_model for the full table): a dotted torch path becomes
a '/'-separated Flax path, an integer index `.N` of a torch list becomes a suffix `_N`, and the leaf
names change as Flax spells them (weight -> kernel, scale or embedding; running_mean/var -> the
`batch_stats` mean/var). Torch Linear weights are transposed, Conv2d weights go OIHW -> HWIO, and
raw nn.Parameter matrices (proj, text_projection, positional embeddings) are taken as they are.

Strided convolutions pad explicitly and symmetrically as PyTorch does, never with "SAME" (which
pads (0, 1) at stride 2), so imported weights give PyTorch's outputs. Parameters are float32 and
`dtype` sets the compute dtype, as in nmjax.models.resnet.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_EPSILON = 1e-5  # PyTorch's LayerNorm and BatchNorm default, which open_clip uses.
# He-normal over fan_out, as for nmjax's other ResNets: ReLU stacks keep their gradient variance.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_PAD_3X3 = ((1, 1), (1, 1))


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=NORM_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


def _normal(std: float) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=std)


class MultiheadAttention(nn.Module):
  """Self-attention with one fused q/k/v projection (`in_proj`, torch's in_proj_weight/bias).

  Attributes:
    num_heads: heads; the width is split evenly between them.
    causal: each position attends only to itself and earlier positions (the text tower).
    depth: blocks in the whole transformer; it scales the output projection's initialization.
    dtype: compute dtype.
  """

  num_heads: int
  causal: bool
  depth: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=_normal(width**-0.5), name="in_proj")(x)
    # torch's in_proj output is [q | k | v], each split into heads in order.
    query, key, value = jnp.moveaxis(
        qkv.reshape(batch, length, 3, self.num_heads, head_dim), 2, 0)
    y = jax.nn.dot_product_attention(query, key, value, is_causal=self.causal)
    y = y.reshape(batch, length, width)
    return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=_normal(width**-0.5 * (2 * self.depth)**-0.5),
                    name="out_proj")(y)


class Mlp(nn.Module):
  """c_fc (width -> mlp_ratio x width), GELU or QuickGELU, c_proj back to the width."""

  mlp_ratio: float
  quick_gelu: bool
  depth: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    y = nn.Dense(int(width * self.mlp_ratio), dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=_normal((2 * width)**-0.5), name="c_fc")(x)
    # Exact GELU (torch nn.GELU's default), not the tanh approximation that flax defaults to.
    y = quick_gelu(y) if self.quick_gelu else nn.gelu(y, approximate=False)
    return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=_normal(width**-0.5 * (2 * self.depth)**-0.5), name="c_proj")(y)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  num_heads: int
  causal: bool
  depth: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + MultiheadAttention(self.num_heads, self.causal, self.depth, self.dtype,
                               name="attn")(layer_norm("ln_1", self.dtype)(x))
    return x + Mlp(self.mlp_ratio, self.quick_gelu, self.depth, self.dtype,
                   name="mlp")(layer_norm("ln_2", self.dtype)(x))


class Transformer(nn.Module):
  """`layers` residual attention blocks named resblocks_0, resblocks_1, ... (torch resblocks.N).

  The initialization follows CLIP's text tower: q/k/v ~ N(0, width^-1/2), output projections
  ~ N(0, width^-1/2 (2 layers)^-1/2), the MLP's input ~ N(0, (2 width)^-1/2), zero biases. The
  vision transformer uses the same scheme (open_clip leaves torch's defaults there).
  """

  layers: int
  num_heads: int
  causal: bool
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.num_heads, self.causal, self.layers, self.mlp_ratio,
                                 self.quick_gelu, self.dtype, name=f"resblocks_{i}")(x)
    return x


class AntialiasedBottleneck(nn.Module):
  """CLIP's bottleneck: every conv has stride 1; a stride is a 2x2 average pool after conv2 and
  before the 1x1 conv of the shortcut (downsample_0 conv, downsample_1 BatchNorm)."""

  planes: int
  stride: int
  norm: Any
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                             kernel_init=_CONV_INIT)
    pool = functools.partial(nn.avg_pool, window_shape=(self.stride, self.stride),
                             strides=(self.stride, self.stride))
    out_width = self.planes * self.expansion
    y = nn.relu(self.norm(name="bn1")(conv(self.planes, (1, 1), name="conv1")(x)))
    y = nn.relu(self.norm(name="bn2")(
        conv(self.planes, (3, 3), padding=_PAD_3X3, name="conv2")(y)))
    if self.stride > 1:
      y = pool(y)
    # A zero last scale starts every block as the identity (open_clip zeroes bn3.weight too).
    y = self.norm(scale_init=nn.initializers.zeros, name="bn3")(
        conv(out_width, (1, 1), name="conv3")(y))
    identity = x
    if self.stride > 1 or x.shape[-1] != out_width:
      identity = pool(x) if self.stride > 1 else x
      identity = self.norm(name="downsample_1")(
          conv(out_width, (1, 1), name="downsample_0")(identity))
    return nn.relu(y + identity)


class AttentionPool2d(nn.Module):
  """Multi-head attention of the mean token over [mean; grid] (learned positions), then c_proj.

  Only the mean token's query is computed: the other rows of torch's output are discarded.
  """

  num_heads: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    head_dim = channels // self.num_heads
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=_normal(channels**-0.5))
    tokens = x.reshape(batch, height * width, channels)
    tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)
    positions = self.param("positional_embedding", _normal(channels**-0.5),
                           (height * width + 1, channels), jnp.float32)
    tokens = tokens + positions.astype(self.dtype)[None]
    query = dense(channels, name="q_proj")(tokens[:, :1])
    key = dense(channels, name="k_proj")(tokens)
    value = dense(channels, name="v_proj")(tokens)
    split = lambda t: t.reshape(batch, t.shape[1], self.num_heads, head_dim)
    pooled = jax.nn.dot_product_attention(split(query), split(key), split(value))
    return dense(self.output_dim, name="c_proj")(pooled.reshape(batch, channels))


class ModifiedResNet(nn.Module):
  """CLIP's ResNet image tower (open_clip `ModifiedResNet`).

  Stem: conv1 3x3/2 (width/2), conv2 3x3 (width/2), conv3 3x3 (width), each with BatchNorm and
  ReLU, then a 2x2 average pool. Stages layer1..layerN of anti-aliased bottlenecks (widths
  width x 2^i, stride 2 from the second stage on), then attention pooling of the final grid to
  `output_dim`. BatchNorm: eps 1e-5, running averages with torch's momentum 0.1.

  Attributes:
    layers: bottlenecks per stage, e.g. (3, 4, 6, 3) for RN50.
    output_dim: the embedding width (CLIP's embed_dim).
    num_heads: attention-pool heads (CLIP: width * 32 / 64).
    width: stem and first-stage width.
    dtype: compute dtype.
  """

  layers: Sequence[int]
  output_dim: int
  num_heads: int
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=_PAD_3X3, use_bias=False,
                             dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_CONV_INIT)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=NORM_EPSILON, dtype=self.dtype,
                             param_dtype=jnp.float32)
    x = jnp.asarray(x, self.dtype)
    x = nn.relu(norm(name="bn1")(conv(self.width // 2, strides=(2, 2), name="conv1")(x)))
    x = nn.relu(norm(name="bn2")(conv(self.width // 2, name="conv2")(x)))
    x = nn.relu(norm(name="bn3")(conv(self.width, name="conv3")(x)))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    for stage, num_blocks in enumerate(self.layers):
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = AntialiasedBottleneck(self.width * 2**stage, stride, norm, self.dtype,
                                  name=f"layer{stage + 1}_{block}")(x)
    return AttentionPool2d(self.num_heads, self.output_dim, self.dtype, name="attnpool")(x)


class VisionTransformer(nn.Module):
  """CLIP's ViT image tower (open_clip `VisionTransformer`, pool_type 'tok').

  conv1 (patch embedding, no bias), a class token (`class_embedding`), learned
  `positional_embedding` over [class; patches], ln_pre, a bidirectional transformer, ln_post on
  the class token, and `proj` (width x output_dim, no bias).

  Attributes:
    patch_size: side of the square patches; the image sides must be multiples of it.
    width: token width.
    layers: transformer blocks.
    num_heads: heads per block.
    output_dim: the embedding width (CLIP's embed_dim).
    mlp_ratio: MLP hidden width over the token width.
    quick_gelu: QuickGELU instead of exact GELU in the MLPs.
    dtype: compute dtype.
  """

  patch_size: int
  width: int
  layers: int
  num_heads: int
  output_dim: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No BatchNorm or dropout: training and inference compute the same function.
    _, height, width, _ = x.shape
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f"image size {height}x{width} is not a multiple of the patch size "
                       f"{self.patch_size}")
    scale = self.width**-0.5
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID", use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, name="conv1")(jnp.asarray(x, self.dtype))
    batch = x.shape[0]
    tokens = x.reshape(batch, -1, self.width)
    cls = self.param("class_embedding", _normal(scale), (self.width,), jnp.float32)
    tokens = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.width)), tokens], axis=1)
    positions = self.param("positional_embedding", _normal(scale),
                           (tokens.shape[1], self.width), jnp.float32)
    tokens = layer_norm("ln_pre", self.dtype)(tokens + positions.astype(self.dtype)[None])
    tokens = Transformer(self.layers, self.num_heads, causal=False, mlp_ratio=self.mlp_ratio,
                         quick_gelu=self.quick_gelu, dtype=self.dtype, name="transformer")(tokens)
    pooled = layer_norm("ln_post", self.dtype)(tokens[:, 0])
    proj = self.param("proj", _normal(scale), (self.width, self.output_dim), jnp.float32)
    return pooled @ proj.astype(self.dtype)
