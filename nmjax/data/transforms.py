"""Host-side image transforms (numpy): augmentations on uint8 batches, driven by per-example
random draws, and the evaluation transform that brings an image of any size to an encoder's input.

The draws come from the pipeline (grain's per-element RNG), so these functions are pure: the
same images and draws give the same output, which keeps a training stream a function of its seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")

# Per example: uniforms for the crop's row offset, column offset and the flip decision.
DRAWS_PER_EXAMPLE = 3


def random_crop_flip(images: np.ndarray, uniforms: np.ndarray, crop_padding: int,
                     flip: bool) -> np.ndarray:
  """Zero-pads each (B, H, W, C) image by crop_padding, crops H x W, and maybe mirrors it.

  uniforms is (B, 3) in [0, 1): the crop offsets are floor(u * (2 * crop_padding + 1)) and the
  image is mirrored left-right when flip and u < 0.5. Drawing floats (one RNG call per example)
  and turning them into integers here, vectorised, keeps the per-example cost low.
  """
  batch, height, width, channels = images.shape
  p = crop_padding
  offsets = np.floor(uniforms[:, :2] * (2 * p + 1)).astype(np.int64)
  flipped = (uniforms[:, 2] < 0.5) & flip
  padded = np.zeros((batch, height + 2 * p, width + 2 * p, channels), dtype=images.dtype)
  padded[:, p:p + height, p:p + width] = images
  out = np.empty_like(images)
  for i in range(batch):
    dy, dx = offsets[i]
    window = padded[i, dy:dy + height, dx:dx + width]
    out[i] = window[:, ::-1] if flipped[i] else window
  return out


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """The evaluation transform of an encoder: resize the shorter side to floor(size / crop_pct)
  with `interpolation` (PIL's filter), then take the centre size x size crop, as timm's and
  torchvision's evaluation transforms do. The default (0.875, bilinear: 256 -> 224) is what
  nmjax's own encoders are evaluated with; an imported encoder carries its own (timm's RSB
  ResNets: 0.95 bicubic)."""
  crop_pct: float = 0.875
  interpolation: str = "bilinear"

  def __post_init__(self):
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"interpolation={self.interpolation!r} is unknown; allowed:"
                       f" {', '.join(INTERPOLATIONS)}")
    if not 0 < self.crop_pct <= 1:
      raise ValueError(f"crop_pct={self.crop_pct} is out of range; allowed: 0 < crop_pct <= 1")

  @classmethod
  def from_config(cls, fields: Mapping[str, Any] | None) -> EvalTransform:
    """From a config's input fields (crop_pct, interpolation); the default when there are none."""
    if not fields:
      return cls()
    return cls(crop_pct=float(fields["crop_pct"]), interpolation=str(fields["interpolation"]))


def resize_center_crop(image: np.ndarray, height: int, width: int,
                       transform: EvalTransform = EvalTransform()) -> np.ndarray:
  """uint8 (h, w, c) -> uint8 (height, width, c) by `transform` (c is 1 or 3)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, channels = image.shape
  # The shorter side becomes `short`, the longer one keeps the aspect ratio (truncated), and
  # the crop's offset is rounded, exactly as torchvision's Resize(int) and CenterCrop are.
  short = math.floor(max(height, width) / transform.crop_pct)
  if h <= w:
    size = (max(width, int(short * w / h)), max(height, short))
  else:
    size = (max(width, short), max(height, int(short * h / w)))
  filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "lanczos": Image.LANCZOS}
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize(size, filters[transform.interpolation]))
  top = int(round((resized.shape[0] - height) / 2.0))
  left = int(round((resized.shape[1] - width) / 2.0))
  return resized[top:top + height, left:left + width].reshape(height, width, channels)
