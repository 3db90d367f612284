"""ResNets with BatchNorm for pre-training encoders whose pooled features are probed and tuned.

Every model maps NHWC images (already normalized) to `(logits, features)`, where `features` is the
global-average-pooled pre-logit vector that probes and NMTune consume, and `logits` is one Dense
layer on top of it. BatchNorm statistics live in the `batch_stats` collection, so a train step
calls `apply(..., train=True, mutable=["batch_stats"])` and evaluation uses the running averages.

Parameters are always float32 (`param_dtype`); `dtype` only sets the compute dtype, so bfloat16
training keeps float32 master weights without a separate copy.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from nmjax.models import batching

# He-normal over fan_out, the usual ResNet convolution init: it keeps the variance of gradients
# steady through deep ReLU stacks, so no stage starts out learning much faster than another.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Symmetric padding for 3x3 convolutions: "SAME" pads (0, 1) at stride 2, which shifts every
# downsampled feature map by half a pixel relative to the usual (1, 1).
_PAD_3X3 = ((1, 1), (1, 1))


def _last_scale_init(zero_init_residual: bool) -> Callable[..., Any]:
  return nn.initializers.zeros if zero_init_residual else nn.initializers.ones


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; output width `features`."""

  features: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool

  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    residual = x
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=_PAD_3X3)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3), padding=_PAD_3X3)(y)
    # A zero last scale makes each block start as the identity, which stabilizes early training.
    y = self.norm(scale_init=_last_scale_init(self.zero_init_residual))(y)
    if residual.shape != y.shape:
      residual = self.conv(self.features, (1, 1), (self.strides, self.strides), name="proj_conv")(x)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a projection shortcut when shapes differ."""

  features: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool

  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    residual = x
    y = self.conv(self.features, (1, 1))(x)
    y = nn.relu(self.norm()(y))
    # Stride on the 3x3 conv (ResNet v1.5): a strided 1x1 would skip three quarters of the input.
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=_PAD_3X3)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features * self.expansion, (1, 1))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_residual))(y)
    if residual.shape != y.shape:
      residual = self.conv(
          self.features * self.expansion, (1, 1), (self.strides, self.strides), name="proj_conv")(x)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A ResNet: stem, stages of residual blocks, global average pool, Dense classifier.

  Attributes:
    num_classes: width of the logits.
    stage_sizes: number of blocks in each stage.
    stage_widths: base width of each stage (a Bottleneck outputs 4x this).
    stage_strides: stride of the first block of each stage.
    block_cls: BasicBlock or Bottleneck.
    imagenet_stem: True for the 7x7/2 conv plus 3x3/2 max pool of ImageNet ResNets; False for a
      3x3 stride-1 conv at the full resolution of small (e.g. 28x28) images, then a 2x2/2 average
      pool.
    stem_width: channels of the stem convolution.
    zero_init_residual: start the last BatchNorm scale of every block at zero.
    dtype: compute dtype; parameters stay float32 and outputs are returned as float32.
  """

  num_classes: int
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  stage_strides: Sequence[int]
  block_cls: type[nn.Module]
  imagenet_stem: bool = True
  stem_width: int = 64
  zero_init_residual: bool = True
  dtype: Any = jnp.float32

  @property
  def feature_dim(self) -> int:
    """Width of the pooled features: the last stage's output channels."""
    return self.stage_widths[-1] * self.block_cls.expansion

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Returns (logits (B, num_classes), features (B, feature_dim)), both float32."""
    # The convolution's own vmap rule: seeds trained side by side run one plain convolution each
    # on the CPU, where a grouped one is slow (nmjax/models/batching.py); the same op otherwise.
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_CONV_INIT, conv_general_dilated=batching.conv_general_dilated)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
        dtype=self.dtype, param_dtype=jnp.float32)

    x = jnp.asarray(x, self.dtype)
    if self.imagenet_stem:
      x = conv(self.stem_width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD_3X3)
    else:
      x = conv(self.stem_width, (3, 3), padding=_PAD_3X3, name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      # Average rather than max pooling: on XLA:CPU the max pool's gradient (select-and-scatter)
      # costs far more than the average pool's, and it would dominate the small model's step.
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))

    for stage, (num_blocks, width, stride) in enumerate(
        zip(self.stage_sizes, self.stage_widths, self.stage_strides)):
      for block in range(num_blocks):
        x = self.block_cls(
            features=width, strides=stride if block == 0 else 1, conv=conv, norm=norm,
            zero_init_residual=self.zero_init_residual,
            name=f"stage{stage + 1}_block{block + 1}")(x)

    # Pool in float32 so bf16 features handed to probes keep their precision.
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(features)
    return logits.astype(jnp.float32), features


def resnet18(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """ResNet-18 (ImageNet stem, BasicBlocks [2, 2, 2, 2], widths 64..512); 512-d features."""
  return ResNet(
      num_classes=num_classes, stage_sizes=(2, 2, 2, 2), stage_widths=(64, 128, 256, 512),
      stage_strides=(1, 2, 2, 2), block_cls=BasicBlock, dtype=dtype)


def resnet50(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """ResNet-50 (ImageNet stem, Bottlenecks [3, 4, 6, 3], widths 64..512 x4); 2048-d features."""
  return ResNet(
      num_classes=num_classes, stage_sizes=(3, 4, 6, 3), stage_widths=(64, 128, 256, 512),
      stage_strides=(1, 2, 2, 2), block_cls=Bottleneck, dtype=dtype)


def resnet_small(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """A narrow ResNet for 28x28 grayscale images; 64-d features.

  Stem: 3x3/1 conv (8 channels) at 28x28, BN, ReLU, 2x2 average pool. Then one BasicBlock per
  stage: 16 channels at 14x14, 32 at 7x7, 64 at 4x4. Sized for the embedded study on a 2-core
  CPU: wider stages or a second block per stage cost more time than the accuracy they add is
  worth; benchmarks/pretrain.py measures its train step.
  """
  return ResNet(
      num_classes=num_classes, stage_sizes=(1, 1, 1), stage_widths=(16, 32, 64),
      stage_strides=(1, 2, 2), block_cls=BasicBlock, imagenet_stem=False, stem_width=8,
      dtype=dtype)
