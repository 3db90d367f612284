"""Label and caption noise: pure numpy functions of (labels, ratio, seed) with exact counts.

The same call gives the same noisy labels on every host and after every restart, so a
pre-training run can resume or spread over many processes without storing its noisy labels.

Conventions (see docs/method.md):
- symmetric (default, include_true=False): exactly round(ratio * N) examples are chosen with a
  seeded permutation and each gets a label drawn uniformly from the other C - 1 classes, so the
  realised flip rate is exactly `ratio`.
- symmetric with include_true=True: the chosen examples draw from all C classes (the reference's
  downstream helper); the expected flip rate is ratio * (1 - 1/C).
- pairflip (asymmetric): the chosen examples move to the next class, (y + 1) mod C.
- captions: round(ratio * N) pairs get a caption from another chosen pair (a derangement), so
  exactly that many captions are wrong. `caption_permutation` gives the same noise as an index
  array (pair i takes the caption of pair source[i]), so large sets never materialise strings.
  The reference's swap script differs: int(N * ratio) unseeded swaps of two random rows, with
  replacement, which corrupts about 2 * ratio of the captions (see caption_permutation).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, TypeVar

import numpy as np

from nmjax.errors import ConfigError

__all__ = ["symmetric_noise", "pairflip_noise", "shuffle_captions"]

NOISE_TYPES = ("symmetric", "pairflip")

T = TypeVar("T")


def _check_ratio(ratio: float, field: str = "noise_ratio") -> float:
  try:
    ratio = float(ratio)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={ratio!r} is not a number; allowed: 0 <= {field} < 1") from None
  if not 0.0 <= ratio < 1.0:
    raise ConfigError(f"{field}={ratio} is out of range; allowed: 0 <= {field} < 1")
  return ratio


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  if int(num_classes) != num_classes or num_classes < 2:
    raise ConfigError(f"num_classes={num_classes} is invalid; allowed: an integer >= 2")
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ConfigError(
        f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ConfigError(
        f"labels must lie in [0, {num_classes}); found values in [{labels.min()}, {labels.max()}]")
  return labels.astype(np.int64)


def _chosen(n: int, ratio: float, seed: int) -> tuple[np.random.Generator, np.ndarray]:
  """The seeded generator and exactly round(ratio * n) distinct indices to corrupt."""
  # SeedSequence mixes a fixed tag so noise streams never coincide with other uses of `seed`.
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6E6F697A]))
  count = int(round(ratio * n))
  return rng, np.sort(rng.permutation(n)[:count])


def symmetric_noise(labels: np.ndarray, ratio: float, num_classes: int, seed: int, *,
                    include_true: bool = False) -> np.ndarray:
  """Uniform label noise with exactly round(ratio * N) examples re-labelled.

  Args:
    labels: clean integer labels, shape (N,), values in [0, num_classes).
    ratio: fraction of examples to corrupt, 0 <= ratio < 1.
    num_classes: C >= 2.
    seed: any integer; the result is a pure function of (labels, ratio, num_classes, seed).
    include_true: False (default) draws the new label from the other C - 1 classes, so every
      chosen label really changes; True draws from all C classes, as the reference's helper does.

  Returns:
    Noisy labels, np.int64 array of shape (N,).

  Raises:
    ConfigError: a ratio outside [0, 1), num_classes < 2, or labels that are not a 1-D integer
      array in [0, num_classes).

  Examples:
    >>> import numpy as np
    >>> from nmjax import noise
    >>> labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    >>> noisy = noise.symmetric_noise(labels, 0.25, num_classes=4, seed=0)
    >>> int((noisy != labels).sum())  # Exactly round(0.25 * 8) labels change.
    2
  """
  ratio = _check_ratio(ratio)
  labels = _check_labels(labels, num_classes)
  rng, idx = _chosen(labels.size, ratio, seed)
  noisy = labels.copy()
  if include_true:
    noisy[idx] = rng.integers(0, num_classes, size=idx.size)
  else:
    # An offset in [1, C) added modulo C is uniform over the C - 1 other classes.
    noisy[idx] = (labels[idx] + rng.integers(1, num_classes, size=idx.size)) % num_classes
  return noisy


def pairflip_noise(labels: np.ndarray, ratio: float, num_classes: int, seed: int) -> np.ndarray:
  """Asymmetric noise: exactly round(ratio * N) examples move from class y to (y + 1) mod C.

  Args:
    labels: clean integer labels, shape (N,), values in [0, num_classes).
    ratio: fraction of examples to move, 0 <= ratio < 1.
    num_classes: C >= 2.
    seed: any integer; the same examples are chosen as by symmetric_noise with this seed.

  Returns:
    Noisy labels, np.int64 array of shape (N,).

  Raises:
    ConfigError: a ratio outside [0, 1), num_classes < 2, or labels that are not a 1-D integer
      array in [0, num_classes).

  Examples:
    >>> import numpy as np
    >>> from nmjax import noise
    >>> labels = np.array([0, 1, 2, 3])
    >>> noisy = noise.pairflip_noise(labels, 0.5, num_classes=4, seed=0)
    >>> bool(np.all((noisy == labels) | (noisy == (labels + 1) % 4)))
    True
  """
  ratio = _check_ratio(ratio)
  labels = _check_labels(labels, num_classes)
  _, idx = _chosen(labels.size, ratio, seed)
  noisy = labels.copy()
  noisy[idx] = (labels[idx] + 1) % num_classes
  return noisy


def apply_label_noise(labels: np.ndarray, ratio: float, num_classes: int, seed: int,
                      noise_type: str = "symmetric") -> np.ndarray:
  """Dispatches on the config's noise_type ('symmetric' or 'pairflip')."""
  if noise_type == "symmetric":
    return symmetric_noise(labels, ratio, num_classes, seed)
  if noise_type == "pairflip":
    return pairflip_noise(labels, ratio, num_classes, seed)
  raise ConfigError(
      f"config.noise_type={noise_type!r} is unknown; allowed: {', '.join(NOISE_TYPES)}")


def shuffle_captions(captions: Sequence[T], ratio: float, seed: int) -> list[T]:
  """Caption noise: exactly round(ratio * N) pairs receive another chosen pair's caption.

  The chosen positions are permuted by a seeded derangement (no fixed point), so each of them
  holds a caption that came from a different pair.

  Args:
    captions: the N captions, in pair order (any item type).
    ratio: fraction of pairs whose caption becomes wrong, 0 <= ratio < 1.
    seed: any integer; the result is a pure function of (captions, ratio, seed).

  Returns:
    A new list of the N captions, the chosen ones moved (caption_permutation's order).

  Raises:
    ConfigError: a ratio outside [0, 1), or one that chooses a single pair (no derangement of
      one pair exists, so nothing could be swapped).

  Examples:
    >>> from nmjax import noise
    >>> captions = ["a cat", "a dog", "a car", "a cup"]
    >>> noisy = noise.shuffle_captions(captions, 0.5, seed=0)
    >>> sum(a != b for a, b in zip(noisy, captions))  # Exactly round(0.5 * 4) are wrong.
    2
  """
  ratio = _check_ratio(ratio)
  captions = list(captions)
  rng, idx = _chosen(len(captions), ratio, seed)
  if idx.size == 1:
    raise ConfigError(
        f"noise_ratio={ratio} selects one caption of {len(captions)}; at least two are needed to"
        " swap captions")
  if idx.size == 0:
    return captions
  # A random cyclic shift of a random order is a derangement of the chosen set.
  order = rng.permutation(idx)
  shift = int(rng.integers(1, idx.size))
  noisy = list(captions)
  for src, dst in zip(order, np.roll(order, shift)):
    noisy[dst] = captions[src]
  return noisy


def caption_permutation(num_pairs: int, ratio: float, seed: int, *,
                        field: str = "noise_ratio") -> np.ndarray:
  """Caption noise as indices: pair i takes the caption of pair source[i] (int64 (num_pairs,)).

  Exactly round(ratio * num_pairs) positions are chosen with a seeded permutation and permuted
  by a seeded derangement among themselves, so each of them holds the caption of a different
  pair (source[i] != i) and every other position keeps its own (source[i] == i). It is the same
  noise as shuffle_captions, draw for draw: shuffle_captions(c, r, s)[i] == c[source[i]], for
  datasets of millions of pairs whose captions are read by index (nmjax.data.image_text).

  Convention, against the reference implementation: its caption-noise script made
  int(N * ratio) swaps of two rows drawn at random with replacement and no seed, so a swap can
  hit a row already swapped, or swap a row with itself, and about 2 * ratio of the captions end
  up wrong (its "noise_2.5" set, ratio 0.025, has about 5% wrong captions). Here the ratio is
  the exact fraction of wrong captions: to match a reference run at ratio r, use about 2r.

  Corner case: when round(ratio * num_pairs) == 1 no derangement of one pair exists; that is
  refused with a ConfigError (one line naming `field`) rather than silently corrupting 0 or 2.

  Args:
    num_pairs: N >= 0.
    ratio: fraction of pairs whose caption is wrong, 0 <= ratio < 1.
    seed: any integer; the result is a pure function of (num_pairs, ratio, seed).
    field: the config field `ratio` came from, for the error message.

  Returns:
    source, int64 (num_pairs,): pair i takes the caption of pair source[i].

  Raises:
    ConfigError: a ratio outside [0, 1) or one choosing a single pair (naming `field`), or a
      num_pairs that is not an integer >= 0.
  """
  ratio = _check_ratio(ratio, field)
  if isinstance(num_pairs, bool) or int(num_pairs) != num_pairs or num_pairs < 0:
    raise ConfigError(f"num_pairs={num_pairs!r} is invalid; allowed: an integer >= 0")
  num_pairs = int(num_pairs)
  rng, idx = _chosen(num_pairs, ratio, seed)
  if idx.size == 1:
    raise ConfigError(
        f"{field}={ratio} selects one caption of {num_pairs}; at least two are needed to swap"
        f" captions (use {field}=0 or a ratio that selects two or more)")
  source = np.arange(num_pairs, dtype=np.int64)
  if idx.size:
    # The draws of shuffle_captions: a random order, rolled by a random non-zero shift.
    order = rng.permutation(idx)
    shift = int(rng.integers(1, idx.size))
    source[np.roll(order, shift)] = order
  return source


def memorization_gap(result: Mapping[str, Any]) -> float | None:
  """How much of the label noise a pre-training run memorized, from its record (result):
  train_acc_noisy (train accuracy against the noisy labels) minus what a model that memorized
  none of it scores, (1 - r) c + r (1 - c) / (C - 1), with c = train_acc_clean (against the
  clean labels), r = noise_rate_train (the rate on the train labels used) and C = num_classes
  (symmetric noise over the other C - 1 classes). About 0: nothing memorized; 1 - (1 - r)^2 -
  r^2 / (C - 1) when every noisy label is fitted. None when the record lacks those fields (a
  CLIP run's record has none)."""
  if not all(k in result for k in ("train_acc_noisy", "train_acc_clean", "noise_rate_train",
                                   "num_classes")):
    return None
  r, c = float(result["noise_rate_train"]), float(result["train_acc_clean"])
  return float(result["train_acc_noisy"]) - ((1 - r) * c
                                             + r * (1 - c) / (int(result["num_classes"]) - 1))
