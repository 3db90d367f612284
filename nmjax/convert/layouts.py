"""The architectures nmjax imports: whose parameter names they carry, which nmjax model they
become (with which layout options), and their evaluation input.

  resnet18, resnet50   torchvision's and timm's ResNet names (conv1, bn1, layer1..4.N.conv1..3 /
                       bn1..3, downsample.0/1, fc) -> nmjax.models.resnet (same padding, BN eps
                       1e-5, v1.5 stride on the 3x3); evaluated like timm's RSB recipe (the
                       reference's noisy models): crop 0.95, bicubic, ImageNet mean and std.
  vit_s16, vit_b16     timm's VisionTransformer names (patch_embed.proj, cls_token, pos_embed,
                       blocks.N.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm,
                       head) -> nmjax.models.vit with a class token, learned positions for the
                       file's grid, exact GELU, LayerNorm eps 1e-6; evaluated like timm's augreg
                       weights: crop 0.9, bicubic, mean and std 0.5.

The number of classes (and a ViT's image size) is read from the file; every other size is the
architecture's, so a file of another architecture is refused by nmjax.convert.mapping.assign.
CLIP's two towers (OpenAI, open_clip) have their own table: nmjax.convert.clip_layouts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from nmjax.convert import mapping
from nmjax.convert.mapping import Layout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a file says about its model: the head's classes, the input side the model is laid out
  for, and the nmjax model's layout options (nmjax.models.get_model's **options)."""
  num_classes: int
  image_size: int
  options: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Arch:
  """One importable architecture.

  model: the nmjax.models registry name it becomes. names: whose parameter names it reads.
  spec: the file's Spec from its tensors. layout: the name map for a Spec (nmjax.convert.mapping).
  input: the default evaluation input (crop_pct, interpolation, mean, std in 0..1 units).
  """
  model: str
  names: str
  spec: Callable[[dict[str, np.ndarray]], Spec]
  layout: Callable[[Spec], Layout]
  input: dict[str, Any]


def head_classes(tensors: dict[str, np.ndarray], name: str) -> int:
  """Rows of the classifier `name` (1 when the file has none: assign then names it missing)."""
  weight = tensors.get(name)
  return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else 1


# ----------------------------------------------------------------------------------- ResNets

def resnet_layout(stage_sizes: tuple[int, ...], bottleneck: bool) -> Layout:
  """torchvision/timm ResNet names -> nmjax.models.resnet variables."""
  layout: Layout = {**mapping.conv("conv1", ("stem_conv",)),
                    **mapping.batch_norm("bn1", ("stem_bn",))}
  convs = 3 if bottleneck else 2
  for stage, num_blocks in enumerate(stage_sizes):
    for block in range(num_blocks):
      torch_name, flax_name = f"layer{stage + 1}.{block}", f"stage{stage + 1}_block{block + 1}"
      for k in range(convs):
        layout.update(mapping.conv(f"{torch_name}.conv{k + 1}", (flax_name, f"Conv_{k}")))
        layout.update(mapping.batch_norm(f"{torch_name}.bn{k + 1}",
                                         (flax_name, f"BatchNorm_{k}")))
      # A projection where the shape changes: every stage's first block but a BasicBlock
      # ResNet's first stage (64 -> 64 channels at stride 1).
      if block == 0 and (stage > 0 or bottleneck):
        layout.update(mapping.conv(f"{torch_name}.downsample.0", (flax_name, "proj_conv")))
        layout.update(mapping.batch_norm(f"{torch_name}.downsample.1", (flax_name, "proj_bn")))
  layout.update(mapping.linear("fc", ("head",)))
  return layout


def resnet_spec(tensors: dict[str, np.ndarray]) -> Spec:
  return Spec(num_classes=head_classes(tensors, "fc.weight"), image_size=224, options={})


RESNET_INPUT = {"crop_pct": 0.95, "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD}


# --------------------------------------------------------------------------------------- ViTs

def vit_layout(depth: int, num_heads: int, width: int) -> Layout:
  """timm VisionTransformer names -> nmjax.models.vit variables (class token, learned
  positions); the fused qkv projection fills query, key and value."""
  layout: Layout = {
      **mapping.conv("patch_embed.proj", ("patch_embedding",), bias=True),
      "cls_token": [(("params", "cls_token"), mapping.same)],
      "pos_embed": [(("params", "pos_embedding"), mapping.same)],
      **mapping.layer_norm("norm", ("ln_final",)),
      **mapping.linear("head", ("head",)),
  }
  to_heads = mapping.heads_in(num_heads)
  for i in range(depth):
    torch_name, block = f"blocks.{i}", f"block{i + 1}"
    attention = ("params", block, "attention")
    for part in ("weight", "bias"):
      flax_part = "kernel" if part == "weight" else "bias"
      layout[f"{torch_name}.attn.qkv.{part}"] = [
          ((*attention, role, flax_part), mapping.rows(j * width, (j + 1) * width, to_heads))
          for j, role in enumerate(("query", "key", "value"))]
    layout[f"{torch_name}.attn.proj.weight"] = [((*attention, "out", "kernel"),
                                                 mapping.heads_out(num_heads))]
    layout[f"{torch_name}.attn.proj.bias"] = [((*attention, "out", "bias"), mapping.same)]
    layout.update(mapping.layer_norm(f"{torch_name}.norm1", (block, "ln_attention")))
    layout.update(mapping.layer_norm(f"{torch_name}.norm2", (block, "ln_mlp")))
    layout.update(mapping.linear(f"{torch_name}.mlp.fc1", (block, "mlp_in")))
    layout.update(mapping.linear(f"{torch_name}.mlp.fc2", (block, "mlp_out")))
  return layout


def vit_spec(patch_size: int) -> Callable[[dict[str, np.ndarray]], Spec]:
  """A timm ViT's Spec: classes from `head`, the image side from `pos_embed`'s square grid."""
  def spec(tensors: dict[str, np.ndarray]) -> Spec:
    positions = tensors.get("pos_embed")
    grid = 14
    if positions is not None and positions.ndim == 3:
      side = math.isqrt(max(positions.shape[1] - 1, 0))
      grid = side if side * side == positions.shape[1] - 1 and side > 0 else grid
    options = {"pooling": "class_token", "position_embedding": "learned",
               "image_size": grid * patch_size, "gelu_approximate": False,
               "layernorm_epsilon": 1e-6}
    return Spec(num_classes=head_classes(tensors, "head.weight"), image_size=grid * patch_size,
                options=options)
  return spec


VIT_INPUT = {"crop_pct": 0.9, "interpolation": "bicubic", "mean": HALF, "std": HALF}


ARCHS: dict[str, Arch] = {
    "resnet18": Arch("resnet18", "torchvision/timm ResNet-18", resnet_spec,
                     lambda spec: resnet_layout((2, 2, 2, 2), bottleneck=False), RESNET_INPUT),
    "resnet50": Arch("resnet50", "torchvision/timm ResNet-50", resnet_spec,
                     lambda spec: resnet_layout((3, 4, 6, 3), bottleneck=True), RESNET_INPUT),
    "vit_s16": Arch("vit_s16", "timm ViT-S/16 (vit_small_patch16_*)", vit_spec(16),
                    lambda spec: vit_layout(depth=12, num_heads=6, width=384), VIT_INPUT),
    "vit_b16": Arch("vit_b16", "timm ViT-B/16 (vit_base_patch16_*)", vit_spec(16),
                    lambda spec: vit_layout(depth=12, num_heads=12, width=768), VIT_INPUT),
}
