"""CLIP: an image tower and a causal text transformer projected into one embedding space.

`CLIP.__call__(images, tokens, train=False)` returns `(image_embed, text_embed, logit_scale)`: the
two projections, unnormalized and float32, and the learned temperature exp(logit_scale) clipped at
100; nmjax.clip.contrastive_loss normalizes them. `encode_image` alone gives the frozen features
that probes and NMTune consume (the image tower's unnormalized embedding, `feature_dim` wide:
1024 for RN50, as the reference's probes use). With `siglip=True` there is also a `logit_bias`
parameter (init -10, logit_scale init log 10) that the step reads as `params["logit_bias"]` and
passes to nmjax.clip.siglip_loss.

Configurations (CLIP_MODELS, built by `get_clip_model`):
  clip_rn50     open_clip `RN50`: ModifiedResNet (3, 4, 6, 3) width 64, 32 attention-pool heads,
                224x224x3, embed 1024; text width 512, 12 layers, 8 heads, context 77, vocab
                49,408, plain GELU (quick_gelu=True for OpenAI's released `RN50-quickgelu`
                weights). 102,007,137 parameters (image 38,316,896, text 63,690,240, plus
                logit_scale): open_clip's docs/model_profile.csv lists RN50 at 102.01 M (image
                38.32 M, text 63.69 M).
  clip_vit_b16  open_clip `ViT-B-16`: patch 16, width 768, 12 layers, 12 heads, embed 512, same
                text tower (model_profile.csv: 149.62 M; image 86.19 M, text 63.43 M).
  clip_small    for the embedded 28x28x1 pairs on a CPU: a ViT of 7x7 patches (16 + 1 tokens),
                width 64, 2 layers, 2 heads; text width 64, 2 layers, 2 heads, context 32; embed 64.
                3,376,961 parameters, 3,162,112 of them the 49,408 x 64 token embedding (the
                tokenizer's full vocabulary); 7x7 patches keep its train step quick on a CPU.

Variable names follow open_clip's CLIP module so a state dict maps 1:1 (torch -> Flax):
  visual.conv1/bn1/conv2/bn2/conv3/bn3           visual/conv1 .. visual/bn3
  visual.layer{S}.{B}.conv{1,2,3} / bn{1,2,3}    visual/layer{S}_{B}/conv{1,2,3} / bn{1,2,3}
  visual.layer{S}.{B}.downsample.{0,1}           visual/layer{S}_{B}/downsample_{0,1}
  visual.attnpool.positional_embedding, .{q,k,v,c}_proj   visual/attnpool/...
  visual.conv1, class_embedding, positional_embedding, ln_pre, ln_post, proj   (ViT) same names
  [visual.]transformer.resblocks.{N}.ln_1, .attn.in_proj_{weight,bias}, .attn.out_proj,
    .ln_2, .mlp.c_fc, .mlp.c_proj                [visual/]transformer/resblocks_{N}/ln_1,
                                                 attn/in_proj, attn/out_proj, ln_2, mlp/c_fc, ...
  token_embedding.weight                         token_embedding/embedding
  positional_embedding, ln_final, text_projection, logit_scale[, logit_bias]   same names
Leaves: Linear weight -> kernel (transposed), Conv2d weight -> kernel (OIHW -> HWIO), norm weight
-> scale, BatchNorm running_mean/var -> batch_stats mean/var (num_batches_tracked dropped); raw
nn.Parameter matrices (proj, text_projection, positional embeddings) are not transposed.
"""

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nmjax.errors import ConfigError
from nmjax.models.clip_towers import ModifiedResNet, Transformer, VisionTransformer, layer_norm

MAX_LOGIT_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class ResNetVisionConfig:
  """A ModifiedResNet image tower: bottlenecks per stage, base width; the attention pool has
  (final width) / head_width heads, width * 32 / 64 = 32 for RN50."""
  layers: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  head_width: int = 64
  image_size: int = 224
  channels: int = 3


@dataclasses.dataclass(frozen=True)
class ViTVisionConfig:
  """A ViT image tower: heads = width / head_width."""
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  head_width: int = 64
  mlp_ratio: float = 4.0
  channels: int = 3


def build_image_tower(vision: ResNetVisionConfig | ViTVisionConfig, embed_dim: int,
                      quick_gelu: bool, dtype: Any) -> nn.Module:
  """The image tower module that `vision` describes, projecting to `embed_dim`."""
  if isinstance(vision, ResNetVisionConfig):
    # The attention pool's width: the last stage's bottleneck output (width * 32 for 4 stages).
    pool_width = vision.width * 2**(len(vision.layers) - 1) * 4
    return ModifiedResNet(layers=vision.layers, output_dim=embed_dim,
                          num_heads=pool_width // vision.head_width, width=vision.width,
                          dtype=dtype)
  return VisionTransformer(patch_size=vision.patch_size, width=vision.width,
                           layers=vision.layers, num_heads=vision.width // vision.head_width,
                           output_dim=embed_dim, mlp_ratio=vision.mlp_ratio,
                           quick_gelu=quick_gelu, dtype=dtype)


class CLIP(nn.Module):
  """Two towers and a learned temperature (see the module docstring for names and configs).

  Attributes:
    embed_dim: width of both projections (the shared embedding space).
    vision: the image tower (ResNetVisionConfig or ViTVisionConfig).
    context_length: text positions (token sequences may be shorter, never longer).
    vocab_size: token ids are in [0, vocab_size); the end-of-text id must be the largest.
    text_width, text_heads, text_layers: the causal text transformer.
    quick_gelu: QuickGELU instead of exact GELU in every transformer MLP.
    siglip: add the `logit_bias` parameter and start logit_scale at log 10 (SigLIP's init).
    dtype: compute dtype; parameters stay float32 and outputs are float32.
  """

  embed_dim: int
  vision: ResNetVisionConfig | ViTVisionConfig
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_heads: int = 8
  text_layers: int = 12
  quick_gelu: bool = False
  siglip: bool = False
  dtype: Any = jnp.float32

  @property
  def feature_dim(self) -> int:
    """Width of the image features that probes use: the unnormalized image embedding."""
    return self.embed_dim

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(height, width, channels) of the images the tower was configured for."""
    return (self.vision.image_size, self.vision.image_size, self.vision.channels)

  def setup(self) -> None:
    self.visual = build_image_tower(self.vision, self.embed_dim, self.quick_gelu, self.dtype)
    self.token_embedding = nn.Embed(
        self.vocab_size, self.text_width, embedding_init=nn.initializers.normal(0.02),
        dtype=self.dtype, param_dtype=jnp.float32)
    self.positional_embedding = self.param(
        "positional_embedding", nn.initializers.normal(0.01),
        (self.context_length, self.text_width), jnp.float32)
    self.transformer = Transformer(self.text_layers, self.text_heads, causal=True,
                                   quick_gelu=self.quick_gelu, dtype=self.dtype)
    self.ln_final = layer_norm("ln_final", self.dtype)
    self.text_projection = self.param(
        "text_projection", nn.initializers.normal(self.text_width**-0.5),
        (self.text_width, self.embed_dim), jnp.float32)
    # CLIP's temperature 0.07; SigLIP starts at t' = log 10 with bias -10 (its paper's choice).
    init_scale = math.log(10.0) if self.siglip else math.log(1 / 0.07)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(init_scale), (),
                                  jnp.float32)
    if self.siglip:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), (), jnp.float32)

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    """NHWC images (normalized) -> (B, embed_dim) float32 unnormalized image embeddings."""
    return self.visual(images, train=train).astype(jnp.float32)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """(B, T) int token ids, T <= context_length -> (B, embed_dim) float32 text embeddings.

    The state at the end-of-text token is projected; that token is found as the argmax of the
    ids (CLIP's EOT 49407 is the largest id), as open_clip does. With a causal mask, positions
    after it do not change the result, so sequences may be shorter than context_length.
    """
    states = self.text_states(tokens)
    eot = states[jnp.arange(states.shape[0]), jnp.argmax(tokens, axis=-1)]
    return (eot @ self.text_projection.astype(self.dtype)).astype(jnp.float32)

  def text_states(self, tokens: jax.Array) -> jax.Array:
    """(B, T) token ids -> (B, T, text_width) states after ln_final, in the compute dtype."""
    length = tokens.shape[1]
    if length > self.context_length:
      raise ValueError(f"token sequences of length {length} exceed context_length="
                       f"{self.context_length}")
    x = self.token_embedding(tokens)
    x = x + self.positional_embedding[:length].astype(self.dtype)[None]
    return self.ln_final(self.transformer(x))

  def __call__(self, images: jax.Array, tokens: jax.Array,
               train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (image_embed (B, D), text_embed (B, D), logit_scale ()), all float32."""
    logit_scale = jnp.minimum(jnp.exp(self.logit_scale), MAX_LOGIT_SCALE)
    return self.encode_image(images, train=train), self.encode_text(tokens), logit_scale


def clip_rn50(dtype: Any = jnp.float32) -> CLIP:
  """open_clip `RN50` (plain GELU): 102.01 M parameters, 1024-d image features."""
  return CLIP(embed_dim=1024, vision=ResNetVisionConfig(), dtype=dtype)


def clip_vit_b16(dtype: Any = jnp.float32) -> CLIP:
  """open_clip `ViT-B-16`: 149.62 M parameters, 512-d image features."""
  return CLIP(embed_dim=512, vision=ViTVisionConfig(), dtype=dtype)


def clip_small(dtype: Any = jnp.float32) -> CLIP:
  """Two small towers for 28x28x1 image-caption pairs on a 2-core CPU; 64-d image features."""
  return CLIP(embed_dim=64,
              vision=ViTVisionConfig(image_size=28, patch_size=7, width=64, layers=2,
                                     head_width=32, channels=1),
              context_length=32, text_width=64, text_heads=2, text_layers=2, dtype=dtype)


CLIP_MODELS: dict[str, Callable[..., CLIP]] = {
    "clip_rn50": clip_rn50,
    "clip_vit_b16": clip_vit_b16,
    "clip_small": clip_small,
}
_FIELDS = tuple(f.name for f in dataclasses.fields(CLIP) if f.name not in ("parent", "name"))


def get_clip_model(name: str, dtype: Any = jnp.float32, **overrides: Any) -> CLIP:
  """Builds the registered CLIP `name` with compute `dtype`; `overrides` replace CLIP fields
  (e.g. quick_gelu=True, siglip=True, context_length=64)."""
  if name not in CLIP_MODELS:
    raise ConfigError(
        f"config.model={name!r} is unknown; known CLIP models: {', '.join(sorted(CLIP_MODELS))}")
  unknown = sorted(set(overrides) - set(_FIELDS))
  if unknown:
    raise ConfigError(
        f"CLIP override(s) {', '.join(unknown)} unknown; allowed: {', '.join(_FIELDS)}")
  return CLIP_MODELS[name](dtype=dtype).clone(**overrides)
