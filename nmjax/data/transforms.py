"""Host-side augmentations on uint8 image batches (numpy), driven by per-example random draws.

The draws come from the pipeline (grain's per-element RNG), so these functions are pure: the
same images and draws give the same output, which keeps a training stream a function of its seed.
"""

from __future__ import annotations

import numpy as np

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
