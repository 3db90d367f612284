"""Deterministic image corruptions for OOD tests (a Fashion-MNIST-C style distribution shift).

Each corruption is named with its severity, NAME_S (S in 1..5), e.g. "gaussian_noise_3":

  gaussian_noise  additive N(0, sigma^2) pixel noise, sigma = 8, 16, 24, 32, 48 grey levels; the
                  noise of example i is drawn from a generator seeded by (seed, i), so an image
                  is corrupted the same way in every batch, process and run
  blur            Gaussian blur, sigma = 0.5, 0.75, 1.0, 1.25, 1.5 pixels
  contrast        (x - mean(x)) * c + mean(x), c = 0.6, 0.45, 0.3, 0.2, 0.1
  rotation        rotation by 10, 20, 30, 45, 60 degrees, clockwise for even i, counter-clockwise
                  for odd i (bilinear, zero fill)

Images are uint8 (H, W, C) in and out (rounded and clipped to 0..255).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from nmjax.data.records import MappedRecords
from nmjax.errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)
_NOISE_SIGMA = (8.0, 16.0, 24.0, 32.0, 48.0)
_BLUR_SIGMA = (0.5, 0.75, 1.0, 1.25, 1.5)
_CONTRAST = (0.6, 0.45, 0.3, 0.2, 0.1)
_ANGLE = (10.0, 20.0, 30.0, 45.0, 60.0)
_SEED = 20240117  # Fixed: a corruption is part of a task's definition, not of a run.


def _gaussian_noise(image: np.ndarray, level: int, index: int) -> np.ndarray:
  rng = np.random.default_rng((_SEED, index))
  return image + rng.normal(0.0, _NOISE_SIGMA[level], size=image.shape)


def _blur(image: np.ndarray, level: int, index: int) -> np.ndarray:
  del index
  sigma = _BLUR_SIGMA[level]
  return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="constant")


def _contrast(image: np.ndarray, level: int, index: int) -> np.ndarray:
  del index
  mean = image.mean(axis=(0, 1), keepdims=True)
  return (image - mean) * _CONTRAST[level] + mean


def _rotation(image: np.ndarray, level: int, index: int) -> np.ndarray:
  angle = _ANGLE[level] * (1.0 if index % 2 == 0 else -1.0)
  return ndimage.rotate(image, angle, axes=(1, 0), reshape=False, order=1, mode="constant")


CORRUPTIONS: Mapping[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "blur": _blur,
    "contrast": _contrast,
    "rotation": _rotation,
}


def names(severities: Sequence[int] = SEVERITIES) -> tuple[str, ...]:
  """Every corruption name with a severity, e.g. ('gaussian_noise_1', ..., 'rotation_5')."""
  return tuple(f"{c}_{s}" for c in CORRUPTIONS for s in severities)


def parse(name: str) -> tuple[str, int]:
  """'blur_3' -> ('blur', 3); anything else is a ConfigError listing the allowed names."""
  kind, _, severity = str(name).rpartition("_")
  if kind not in CORRUPTIONS or severity not in {str(s) for s in SEVERITIES}:
    raise ConfigError(f"corruption {name!r} is unknown; allowed: <kind>_<severity> with kind in"
                      f" {', '.join(CORRUPTIONS)} and severity in 1..5 (e.g. blur_3)")
  return kind, int(severity)


def corrupt(image: np.ndarray, name: str, index: int) -> np.ndarray:
  """The corrupted copy of a uint8 (H, W, C) image; `index` keys the random parts."""
  kind, severity = parse(name)
  out = CORRUPTIONS[kind](np.asarray(image, np.float64), severity - 1, int(index))
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def corrupted_records(records: Sequence[Mapping[str, Any]], name: str) -> Sequence[dict[str, Any]]:
  """Random-access examples with corruption `name` applied to every image (label, index kept)."""
  parse(name)
  return MappedRecords(
      records, lambda e: {**e, "image": corrupt(e["image"], name, int(e["index"]))})
