"""Vision Transformers with the same contract as the ResNets: images -> (logits, pooled features).

The "plain ViT" layout that big_vision uses for ImageNet-1k from scratch: non-overlapping patch
embedding, fixed 2-D sine-cosine position embedding, pre-LayerNorm encoder blocks, a final
LayerNorm, global average pooling over the patch tokens (no class token), and a zero-initialized
Dense head. The pooled vector is the `features` that probes and NMTune consume.

The position embedding is computed from the input's patch grid, so one set of parameters runs at
any image size divisible by the patch size (224 for training, small sizes in CPU tests). There is
no BatchNorm and no dropout, so `train` changes nothing and the model has no `batch_stats`;
the argument exists so every model in the zoo is called the same way.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

_DENSE_INIT = nn.initializers.xavier_uniform()


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
  """Pre-LN block: x + MHSA(LN(x)), then x + MLP(LN(x)) with a GELU hidden layer."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_attention")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_DENSE_INIT, name="attention")(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_mlp")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=_DENSE_INIT, bias_init=nn.initializers.normal(1e-6),
                 name="mlp_in")(y)
    y = nn.gelu(y)
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
  """

  num_classes: int
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  dtype: Any = jnp.float32

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
    batch, grid_h, grid_w, _ = x.shape
    tokens = x.reshape(batch, grid_h * grid_w, self.width)
    tokens = tokens + jnp.asarray(
        sincos_2d_position_embedding(grid_h, grid_w, self.width), self.dtype)[None]
    for i in range(self.depth):
      tokens = EncoderBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                            name=f"block{i + 1}")(tokens)
    tokens = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="ln_final")(tokens)
    # Pool in float32 so bf16 features handed to probes keep their precision.
    features = jnp.mean(tokens.astype(jnp.float32), axis=1)
    # A zero head starts every class at the same logit (big_vision's choice for ImageNet).
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=nn.initializers.zeros, name="head")(features)
    return logits.astype(jnp.float32), features


def vit_s16(num_classes: int, dtype: Any = jnp.float32) -> ViT:
  """ViT-S/16: patches 16x16, width 384, 12 blocks of 6 heads, MLP 1536; 384-d features."""
  return ViT(num_classes=num_classes, patch_size=16, width=384, depth=12, num_heads=6,
             mlp_dim=1536, dtype=dtype)
