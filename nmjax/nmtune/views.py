"""Augmented views of train images for NMTune's two-view data flow, and each epoch's numpy draws.

OnlineViews (images + a frozen encoder): every step takes n/2 images, augments each twice and
encodes both views inside the jitted step. CachedViews: K augmented views per image encoded once
(cache_views); each step picks two distinct cached views of each of its n/2 images, the same
two-view data flow over a fixed pool of augmentations. Plain features (a FeatureSet) give one
row per example.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmjax.errors import ConfigError, DataError
from nmjax.features import FeatureSet

# Uniforms per augmented view: area scale, log aspect ratio, row offset, column offset, flip.
AUGMENT_DRAWS = 5
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_flip(images: jax.Array, draws: jax.Array) -> jax.Array:
  """The reference's train augmentation at the input size: (B, H, W, C) -> float32 (B, H, W, C).

  draws (B, AUGMENT_DRAWS) uniforms in [0, 1): a crop of area scale in CROP_SCALE and aspect ratio
  log-uniform in CROP_RATIO (its sides clipped to the image instead of re-drawn), at a uniform
  position, resized back to H x W bilinearly, then mirrored left-right when the last draw < 0.5.
  Pixel values keep their units (uint8 in, 0..255 floats out).
  """
  _check_images("random_resized_crop_flip images", images)
  _, height, width, channels = images.shape
  area = height * width * (CROP_SCALE[0] + draws[:, 0] * (CROP_SCALE[1] - CROP_SCALE[0]))
  log_low, log_high = np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])
  ratio = jnp.exp(log_low + draws[:, 1] * (log_high - log_low))
  crop_w = jnp.clip(jnp.round(jnp.sqrt(area * ratio)), 1, width)
  crop_h = jnp.clip(jnp.round(jnp.sqrt(area / ratio)), 1, height)
  top = jnp.floor(draws[:, 2] * (height - crop_h + 1))
  left = jnp.floor(draws[:, 3] * (width - crop_w + 1))

  def crop_resize(image, crop_h, crop_w, top, left):
    scale = jnp.stack([height / crop_h, width / crop_w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(image.astype(jnp.float32), (height, width, channels),
                                         (0, 1), scale, translation, method="linear",
                                         antialias=False)

  out = jax.vmap(crop_resize)(images, crop_h, crop_w, top, left)
  return jnp.where((draws[:, 4] < 0.5)[:, None, None, None], out[:, :, ::-1], out)


Encode = Callable[[Any, jax.Array], jax.Array]  # (variables, images) -> (n, D) features


def _check_images(name: str, images: Any) -> int:
  """The number of images of a (N, H, W, C) array, or a DataError naming its shape."""
  shape = tuple(np.shape(images))
  if len(shape) != 4:
    raise DataError(f"{name}: images must be 4-D (N, H, W, C), got shape {shape}")
  return shape[0]


def _check_label_shape(name: str, labels: Any, num_examples: int) -> None:
  """A DataError naming the shape unless labels are 1-D with num_examples entries (their values
  are checked where they size the head: nmjax.features.check_labels)."""
  shape = tuple(np.shape(labels))
  if shape != (num_examples,):
    raise DataError(f"{name}: labels must be 1-D with {num_examples} entries (one per image),"
                    f" got shape {shape}")


def _check_plain(name: str, plain: Any, num_examples: int, feature_dim: int) -> None:
  """A DataError naming the shape unless plain_features is None or (num_examples, feature_dim)."""
  if plain is not None and tuple(np.shape(plain)) != (num_examples, feature_dim):
    raise DataError(f"{name}: plain_features must have shape ({num_examples}, {feature_dim}),"
                    f" got {tuple(np.shape(plain))}")


@dataclasses.dataclass(frozen=True, eq=False)
class OnlineViews:
  """Train images through a frozen encoder, augmented twice per image inside every step.

  Pass it as the `train` of nmjax.nmtune.fit / fit_multi: every step augments n/2 images twice
  (random_resized_crop_flip) and encodes both views inside the jitted step.

  Attributes:
    encode: encode(variables, images) -> (n, D) features, the frozen encoder in inference mode.
    variables: the encoder's variables.
    images: uint8 (N, H, W, C) train images.
    labels: int64 (N,) their labels.
    feature_dim: D, the width encode returns.
    plain_features: optional (N, D) unaugmented features of the same images, which a
      validation split (config.val_fraction) is scored on.
  """
  encode: Encode
  variables: Any
  images: np.ndarray  # uint8 (N, H, W, C)
  labels: np.ndarray  # int64 (N,)
  feature_dim: int
  # Optional (N, D) unaugmented features of the same images: what a validation split
  # (config.val_fraction) is scored on.
  plain_features: np.ndarray | None = None

  def __post_init__(self) -> None:
    num_images = _check_images("NMTune online views", self.images)
    _check_label_shape("NMTune online views", self.labels, num_images)
    if isinstance(self.feature_dim, bool) or not isinstance(self.feature_dim, (int, np.integer)) \
        or self.feature_dim < 1:
      raise DataError(f"NMTune online views: feature_dim must be a positive int, got"
                      f" {self.feature_dim!r}")
    _check_plain("NMTune online views", self.plain_features, num_images, int(self.feature_dim))


@dataclasses.dataclass(frozen=True, eq=False)
class CachedViews:
  """K augmented views of every train image, encoded once (made by cache_views).

  Pass it as the `train` of nmjax.nmtune.fit / fit_multi: each step pairs two distinct cached
  views of each of its n/2 images.

  Attributes:
    features: float32 (K, N, D), view k of image i at [k, i].
    labels: int64 (N,).
    plain_features: optional (N, D) unaugmented features, as OnlineViews.plain_features.
  """
  features: np.ndarray
  labels: np.ndarray
  plain_features: np.ndarray | None = None  # as OnlineViews.plain_features

  def __post_init__(self) -> None:
    shape = tuple(np.shape(self.features))
    if len(shape) != 3:
      raise DataError(f"NMTune cached views: features must be 3-D (K, N, D), got shape {shape}")
    _check_label_shape("NMTune cached views", self.labels, shape[1])
    _check_plain("NMTune cached views", self.plain_features, shape[1], shape[2])

  @property
  def feature_dim(self) -> int:
    return int(self.features.shape[2])


@functools.partial(jax.jit, static_argnames=("encode",))
def encode_augmented(encode: Encode, variables: Any, images: jax.Array, draws: jax.Array
                     ) -> jax.Array:
  """encode(variables, random_resized_crop_flip(images, draws)) in float32, jitted once per
  encoder and shape (every call of cache_views with the same encoder shares it)."""
  return encode(variables, random_resized_crop_flip(images, draws)).astype(jnp.float32)


def cache_views(encode: Encode, variables: Any, images: np.ndarray, labels: np.ndarray, *,
                num_views: int, seed: int = 0, batch_size: int = 512,
                flip: bool = True) -> CachedViews:
  """Encodes num_views augmented copies of every image: the view pool of CachedViews.

  Args:
    encode: encode(variables, images) -> (n, D) features, the frozen encoder in inference mode
      (hashable: it keys the jitted program, one per encoder and shape).
    variables: the encoder's variables.
    images: uint8 (N, H, W, C) train images.
    labels: (N,) integer labels.
    num_views: K >= 2 augmented views per image (random_resized_crop_flip).
    seed: seeds numpy's draws of the crops and flips.
    batch_size: images per encoder call (the last call is padded to it).
    flip: False: never mirrored, for data such as digits.

  Returns:
    CachedViews with features (K, N, D) float32 and labels int64 (N,).

  Raises:
    ConfigError: num_views < 2.
    DataError: images that are not (N, H, W, C), or labels that are not (N,).

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from nmjax import nmtune
    >>> images, labels = np.zeros((6, 8, 8, 1), np.uint8), np.arange(6) % 2
    >>> encode = lambda variables, x: x.reshape(len(x), -1) @ variables
    >>> views = nmtune.cache_views(encode, jnp.ones((64, 4)), images, labels, num_views=2)
    >>> views.features.shape
    (2, 6, 4)
  """
  if num_views < 2:
    raise ConfigError(f"num_views={num_views} (config.cached_views) is not allowed; allowed: >= 2"
                      " (each step pairs two distinct views of an image)")
  images = np.asarray(images)
  num_images = _check_images("cache_views", images)
  _check_label_shape("cache_views", labels, num_images)
  rng = np.random.default_rng([seed, 7])
  draws = rng.random((num_views, num_images, AUGMENT_DRAWS), dtype=np.float32)
  if not flip:
    draws[..., 4] = 1.0  # The flip draw: mirrored only below 0.5.
  chunks = []
  for view in range(num_views):
    parts = []
    for start in range(0, num_images, batch_size):
      stop = min(start + batch_size, num_images)
      # Pad the last chunk to a full batch: one compiled shape for every call.
      idx = np.minimum(np.arange(start, start + batch_size), num_images - 1)
      parts.append(np.asarray(encode_augmented(encode, variables, images[idx], draws[view, idx]))
                   [:stop - start])
    chunks.append(np.concatenate(parts))
  return CachedViews(np.stack(chunks), np.asarray(labels, np.int64))


def epoch_inputs(train: FeatureSet | CachedViews | OnlineViews, labels: np.ndarray,
                 rows_per_step: int, rng: np.random.Generator,
                 examples: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
  """One epoch's numpy-drawn inputs: (rows, row labels) for a FeatureSet or CachedViews, rows
  (S, n) indexing the feature table; (image ids (S, n/2), draws (S, 2, n/2, AUGMENT_DRAWS)) for
  OnlineViews. Every epoch uses floor(E / per-step examples) full steps of a fresh permutation
  of the E training examples (`examples`, ids into labels; None: all of them): BatchNorm and the
  batch-level regularizers need n rows."""
  num_examples = len(labels)
  if examples is None:
    examples = np.arange(num_examples)
  if isinstance(train, FeatureSet):
    steps = len(examples) // rows_per_step
    rows = examples[rng.permutation(len(examples))[:steps * rows_per_step]].reshape(
        steps, rows_per_step)
    return rows.astype(np.int32), labels[rows].astype(np.int32)
  images_per_step = rows_per_step // 2
  steps = len(examples) // images_per_step
  ids = examples[rng.permutation(len(examples))[:steps * images_per_step]].reshape(
      steps, images_per_step)
  if isinstance(train, CachedViews):
    num_views = train.features.shape[0]
    first = rng.integers(0, num_views, ids.shape)
    second = (first + rng.integers(1, num_views, ids.shape)) % num_views  # Never the same view.
    rows = np.concatenate([first * num_examples + ids, second * num_examples + ids], axis=1)
    return rows.astype(np.int32), labels[np.concatenate([ids, ids], axis=1)].astype(np.int32)
  draws = rng.random((steps, 2, images_per_step, AUGMENT_DRAWS), dtype=np.float32)
  return ids.astype(np.int32), draws
