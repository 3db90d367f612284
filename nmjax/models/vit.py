"""Vision Transformers with the same contract as the ResNets: images -> (logits, pooled features).

The "plain ViT" layout that big_vision uses for ImageNet-1k from scratch: non-overlapping patch
embedding, fixed 2-D sine-cosine position embedding, pre-LayerNorm encoder blocks, a final
LayerNorm, global average pooling over the patch tokens (no class token), and a zero-initialized
Dense head. The pooled vector is the `features` that probes and NMTune consume.

The position embedding is computed from the input's patch grid, so one set of parameters runs at
any image size divisible by the patch size (224 for training, small sizes in CPU tests). There is
no BatchNorm and no dropout, so `train` changes nothing and the model has no `batch_stats`;
the argument exists so every model in the zoo is called the same way.

Options give timm's VisionTransformer layout, so imported timm weights (nmjax.convert) compute
what they computed in PyTorch: a class token whose final state is pooled (pooling="class_token"),
learned positions for a fixed image_size including the class token's
(position_embedding="learned"), the exact erf GELU (gelu_approximate=False) and LayerNorm eps
1e-6. The defaults are the plain layout above, unchanged.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

_DENSE_INIT = nn.initializers.xavier_uniform()
POOLINGS = ("mean", "class_token")
POSITION_EMBEDDINGS = ("sincos", "learned")


def sincos_2d_position_embedding(grid_h: int, grid_w: int, width: int,
                                 temperature: float = 10_000.0) -> np.ndarray:
  """(grid_h * grid_w, width) float32: sin and cos of column and row at width/4 frequencies."""
  if width % 4:
    raise ValueError(f"width={width} must be divisible by 4 for a 2-D sine-cosine embedding")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  omega = 1.0 / temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1))
  angles_r = rows.reshape(-1, 1) * omega[None]
  angles_c = cols.reshape(-1, 1) * omega[None]
  return np.concatenate([np.sin(angles_c), np.cos(angles_c), np.sin(angles_r), np.cos(angles_r)],
                        axis=1).astype(np.float32)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)), then x + MLP(LN(x)) with a GELU hidden layer (tanh
  approximation by default, exact with gelu_approximate=False)."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  gelu_approximate: bool = True
  layernorm_epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype, param_dtype=jnp.float32,
                     name="ln_attention")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_DENSE_INIT, name="attention")(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype, param_dtype=jnp.float32,
                     name="ln_mlp")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=_DENSE_INIT, bias_init=nn.initializers.normal(1e-6),
                 name="mlp_in")(y)
    y = nn.gelu(y, approximate=self.gelu_approximate)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=_DENSE_INIT, bias_init=nn.initializers.normal(1e-6),
                 name="mlp_out")(y)
    return x + y


class ViT(nn.Module):
  """A plain ViT classifier.

  Attributes:
    num_classes: width of the logits.
    patch_size: side of the square patches (the input's height and width must be multiples).
    width: token width (the feature dimension).
    depth: number of encoder blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden width of each block's MLP.
    dtype: compute dtype; parameters stay float32 and outputs are returned as float32.
    pooling: "mean" (average of the patch tokens) or "class_token" (a learned token prepended
      to the patches; its final state is the features).
    position_embedding: "sincos" (fixed, any grid) or "learned" (one vector per token of an
      image_size x image_size input, the class token's included).
    image_size: the input side a learned position embedding is laid out for; other sizes are
      refused.
    gelu_approximate: the MLP's GELU: tanh approximation (True) or exact erf (timm's).
    layernorm_epsilon: every LayerNorm's epsilon.
  """

  num_classes: int
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  dtype: Any = jnp.float32
  pooling: str = "mean"
  position_embedding: str = "sincos"
  image_size: int = 224
  gelu_approximate: bool = True
  layernorm_epsilon: float = 1e-6

  @property
  def feature_dim(self) -> int:
    """Width of the pooled features."""
    return self.width

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Returns (logits (B, num_classes), features (B, width)), both float32."""
    del train  # No BatchNorm or dropout: training and inference compute the same function.
    _, height, width, _ = x.shape
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f"image size {height}x{width} is not a multiple of the patch size "
                       f"{self.patch_size}")
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="patch_embedding")(x)
    tokens = self._embed_positions(x)
    for i in range(self.depth):
      tokens = EncoderBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                            gelu_approximate=self.gelu_approximate,
                            layernorm_epsilon=self.layernorm_epsilon,
                            name=f"block{i + 1}")(tokens)
    tokens = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype,
                          param_dtype=jnp.float32, name="ln_final")(tokens)
    # Pool in float32 so bf16 features handed to probes keep their precision.
    if self.pooling == "class_token":
      features = tokens[:, 0].astype(jnp.float32)
    else:
      features = jnp.mean(tokens.astype(jnp.float32), axis=1)
    # A zero head starts every class at the same logit (big_vision's choice for ImageNet).
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=nn.initializers.zeros, name="head")(features)
    return logits.astype(jnp.float32), features

  def _embed_positions(self, patches: jnp.ndarray) -> jnp.ndarray:
    """(B, h, w, width) patch embeddings -> (B, T, width) tokens with positions (and the class
    token first when pooling="class_token")."""
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r} is unknown; allowed: {', '.join(POOLINGS)}")
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(f"position_embedding={self.position_embedding!r} is unknown; allowed:"
                       f" {', '.join(POSITION_EMBEDDINGS)}")
    batch, grid_h, grid_w, _ = patches.shape
    tokens = patches.reshape(batch, grid_h * grid_w, self.width)
    if self.pooling == "class_token":
      cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width),
                             jnp.float32)
      tokens = jnp.concatenate(
          [jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, self.width)), tokens], 1)
    if self.position_embedding == "sincos":
      sincos = jnp.asarray(sincos_2d_position_embedding(grid_h, grid_w, self.width), self.dtype)
      if self.pooling == "class_token":  # The class token carries no position.
        sincos = jnp.concatenate([jnp.zeros((1, self.width), self.dtype), sincos])
      return tokens + sincos[None]
    grid = self.image_size // self.patch_size
    if (grid_h, grid_w) != (grid, grid):
      raise ValueError(f"this ViT's learned positions are for {self.image_size}x"
                       f"{self.image_size} images; got {grid_h * self.patch_size}x"
                       f"{grid_w * self.patch_size}")
    positions = self.param("pos_embedding", nn.initializers.normal(0.02),
                           (1, tokens.shape[1], self.width), jnp.float32)
    return tokens + positions.astype(self.dtype)


def vit_s16(num_classes: int, dtype: Any = jnp.float32, **options: Any) -> ViT:
  """ViT-S/16: patches 16x16, width 384, 12 blocks of 6 heads, MLP 1536; 384-d features.
  `options`: the ViT's layout fields (pooling, position_embedding, ...)."""
  return ViT(num_classes=num_classes, patch_size=16, width=384, depth=12, num_heads=6,
             mlp_dim=1536, dtype=dtype, **options)


def vit_b16(num_classes: int, dtype: Any = jnp.float32, **options: Any) -> ViT:
  """ViT-B/16: patches 16x16, width 768, 12 blocks of 12 heads, MLP 3072; 768-d features.
  `options`: the ViT's layout fields (pooling, position_embedding, ...)."""
  return ViT(num_classes=num_classes, patch_size=16, width=768, depth=12, num_heads=12,
             mlp_dim=3072, dtype=dtype, **options)
