"""Label and caption noise: exact counts, determinism, distribution, validation."""

import math

import numpy as np
import pytest

from nmjax import noise
from nmjax.errors import ConfigError


def _labels(n=10_000, c=10, seed=0):
  return np.random.default_rng(seed).integers(0, c, size=n)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.999])
def test_symmetric_changes_exactly_round_ratio_n(ratio):
  labels = _labels(n=1_234)
  noisy = noise.symmetric_noise(labels, ratio, 10, seed=3)
  assert noisy.dtype == np.int64 and noisy.shape == labels.shape
  assert int((noisy != labels).sum()) == int(round(ratio * labels.size))
  assert noisy.min() >= 0 and noisy.max() < 10


def test_symmetric_is_pure_function_of_inputs():
  labels = _labels()
  a = noise.symmetric_noise(labels, 0.2, 10, seed=7)
  b = noise.symmetric_noise(labels.copy(), 0.2, 10, seed=7)
  c = noise.symmetric_noise(labels, 0.2, 10, seed=8)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  # The input is never modified.
  np.testing.assert_array_equal(labels, _labels())


def test_symmetric_new_labels_are_uniform_over_other_classes():
  labels = np.zeros(200_000, dtype=np.int64)
  noisy = noise.symmetric_noise(labels, 0.5, 5, seed=0)
  changed = noisy[noisy != 0]
  counts = np.bincount(changed, minlength=5)
  assert counts[0] == 0
  expected = changed.size / 4
  assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


def test_include_true_draws_from_all_classes():
  labels = np.zeros(100_000, dtype=np.int64)
  noisy = noise.symmetric_noise(labels, 0.4, 4, seed=1, include_true=True)
  rate = float((noisy != labels).mean())
  assert abs(rate - 0.4 * (1 - 1 / 4)) < 0.01


def test_pairflip_moves_to_next_class():
  labels = _labels(n=5_000, c=7)
  noisy = noise.pairflip_noise(labels, 0.3, 7, seed=2)
  changed = noisy != labels
  assert int(changed.sum()) == 1_500
  np.testing.assert_array_equal(noisy[changed], (labels[changed] + 1) % 7)
  np.testing.assert_array_equal(
      noise.apply_label_noise(labels, 0.3, 7, 2, "pairflip"), noisy)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_rejects_ratio_out_of_range(ratio):
  with pytest.raises(ConfigError, match="noise_ratio"):
    noise.symmetric_noise(_labels(), ratio, 10, seed=0)


def test_rejects_bad_classes_and_labels():
  with pytest.raises(ConfigError, match="num_classes"):
    noise.symmetric_noise(np.zeros(5, np.int64), 0.1, 1, seed=0)
  with pytest.raises(ConfigError, match=r"labels must lie in \[0, 3\)"):
    noise.symmetric_noise(np.array([0, 1, 3]), 0.1, 3, seed=0)
  with pytest.raises(ConfigError, match=r"labels must lie"):
    noise.symmetric_noise(np.array([-1, 1, 2]), 0.1, 3, seed=0)
  with pytest.raises(ConfigError, match="noise_type"):
    noise.apply_label_noise(np.zeros(5, np.int64), 0.1, 3, 0, "flipflop")


def test_error_messages_are_one_line():
  with pytest.raises(ConfigError) as e:
    noise.symmetric_noise(_labels(), 1.5, 10, seed=0)
  assert "\n" not in str(e.value) and "0 <= noise_ratio < 1" in str(e.value)


def test_shuffle_captions_exact_and_seeded():
  captions = [f"caption {i}" for i in range(1_000)]
  noisy = noise.shuffle_captions(captions, 0.25, seed=4)
  wrong = sum(a != b for a, b in zip(captions, noisy))
  assert wrong == 250
  assert sorted(noisy) == sorted(captions)  # A permutation: no caption lost or duplicated.
  assert noise.shuffle_captions(captions, 0.25, seed=4) == noisy
  assert noise.shuffle_captions(captions, 0.0, seed=4) == captions


def test_memorization_gap_is_zero_without_memorization_and_full_when_noise_is_fitted():
  labels = np.arange(20000) % 10
  noisy = noise.symmetric_noise(labels, 0.3, 10, seed=0)
  r = float(np.mean(noisy != labels))
  rng = np.random.default_rng(1)
  # A model right on 80% of the clean labels, uniformly wrong elsewhere: no memorization.
  predictions = np.where(rng.random(labels.size) < 0.8, labels,
                         (labels + rng.integers(1, 10, labels.size)) % 10)
  record = {"train_acc_noisy": np.mean(predictions == noisy),
            "train_acc_clean": np.mean(predictions == labels), "noise_rate_train": r,
            "num_classes": 10}
  assert abs(noise.memorization_gap(record)) < 0.01
  fitted = {**record, "train_acc_noisy": 1.0, "train_acc_clean": float(np.mean(noisy == labels))}
  assert math.isclose(noise.memorization_gap(fitted), 1 - (1 - r) ** 2 - r ** 2 / 9)
  assert noise.memorization_gap({"train_acc_noisy": 1.0}) is None
