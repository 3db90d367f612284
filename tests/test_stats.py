"""Paired statistics (nmjax.stats) and the per-example hits every method returns for them."""

import numpy as np
import pytest

from nmjax import nmtune, probe, stats


def _blobs(rows, seed, dim=16, classes=4):
  centers = np.random.default_rng(0).standard_normal((classes, dim)).astype(np.float32)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, rows)
  return (centers[labels] + 1.5 * rng.standard_normal((rows, dim))).astype(np.float32), labels


@pytest.mark.parametrize("fit, config", [
    (probe.linear_probe, {"num_epochs": 2}), (probe.ridge_probe, None),
    (nmtune.fit, {"epochs": 1, "batch_size": 32})])
def test_every_method_returns_hits_whose_mean_is_its_accuracy(fit, config):
  result = fit(_blobs(256, 0), _blobs(200, 1), config)
  hits = result["correct"]
  assert hits.dtype == bool and hits.shape == (200,)
  assert abs(hits.mean() - result["accuracy"]) < 1e-6


def test_one_seed_paired_interval_is_seeded_and_covers_the_effect():
  rng = np.random.default_rng(3)
  zero = rng.random(5000) < 0.8
  worse = zero & (rng.random(5000) > 0.05)  # About 4 points lost, paired example by example.
  delta = worse.mean() - zero.mean()
  deviations = stats.example_deviations((worse.astype(float) - zero)[None], stream=1)[:, 0]
  (low, high), method = stats.two_level_interval([delta], deviations)
  assert method == stats.EXAMPLES_CI_METHOD and "one seed" in method
  assert low < delta < high < 0
  assert high - low < 0.015  # Paired: far narrower than two independent 5,000-image tests.
  again = stats.example_deviations((worse.astype(float) - zero)[None], stream=1)[:, 0]
  assert stats.two_level_interval([delta], again)[0] == [low, high]
  same = stats.example_deviations(np.zeros((1, 5000)), stream=1)[:, 0]
  assert stats.two_level_interval([0.0], same)[0] == [0.0, 0.0]


def test_add_deltas_pairs_each_seed_with_its_own_clean_run():
  rng = np.random.default_rng(4)
  hits = {}
  records = []
  for seed in (0, 1):
    for r in (0.0, 0.3):
      h = rng.random(400) < (0.9 - r / 3)
      hits[(seed, r)] = h
      records.append({"record": "task", "seed": seed, "noise_ratio": r, "task": "t",
                      "kind": "id", "method": "lp", "accuracy": float(h.mean())})
  records.append({"record": "task", "seed": 0, "noise_ratio": 0.3, "task": "u", "kind": "id",
                  "method": "lp", "accuracy": 0.5})  # No r = 0 record of its own: no delta.
  records.append({"record": "pretrain", "seed": 0, "noise_ratio": 0.3})
  stats.add_deltas(records, lambda rec: hits.get((rec["seed"], rec["noise_ratio"])))
  noisy = [r for r in records if r["record"] == "task" and r["task"] == "t" and r["noise_ratio"]]
  for rec in noisy:
    want = hits[(rec["seed"], 0.3)].mean() - hits[(rec["seed"], 0.0)].mean()
    assert abs(rec["delta"] - want) < 1e-12
    assert rec["ci_method"] == stats.CI_METHOD
  assert noisy[0]["delta_ci95"] == noisy[1]["delta_ci95"]  # One interval per task, over seeds.
  low, high = noisy[0]["delta_ci95"]
  assert low < np.mean([r["delta"] for r in noisy]) < high
  assert "delta" not in records[4] and "delta" not in records[5]
  assert all("delta" not in r for r in records if r["noise_ratio"] == 0)
  # One "delta" record per (r, method, kind): here one task, so its numbers are that task's.
  (average,) = [r for r in records if r["record"] == "delta"]
  assert (average["noise_ratio"], average["method"], average["kind"], average["tasks"],
          average["seeds"], average["ci_method"]) == (0.3, "lp", "id", 1, 2, stats.CI_METHOD)
  assert abs(average["delta"] - np.mean([r["delta"] for r in noisy])) < 1e-12
  assert np.allclose(average["delta_ci95"], noisy[0]["delta_ci95"])
  # Without hits the delta stays and the interval is None, and says why.
  bare = [dict(r) for r in records[:4]]
  stats.add_deltas(bare, lambda rec: None)
  assert bare[1]["delta_ci95"] is None and "delta" in bare[1]
  assert bare[-1]["record"] == "delta" and bare[-1]["delta_ci95"] is None
  assert bare[-1]["ci_method"] == stats.NO_HITS


def test_add_gains_compares_methods_on_the_same_encoder_and_examples():
  """nmtune - mlp per (r, kind): the mean over seeds and tasks of the accuracy difference, its
  interval from the same resample for both methods; a missing baseline gives no record."""
  rng = np.random.default_rng(0)
  records, hits = [], {}
  for seed in (0, 1, 2):
    for method, p in (("mlp", 0.6), ("nmtune", 0.7)):
      correct = rng.random(2000) < p
      record = {"record": "task", "seed": seed, "noise_ratio": 0.0, "task": "t", "kind": "id",
                "method": method, "accuracy": float(correct.mean())}
      records.append(record)
      hits[(seed, method)] = correct
  stats.add_gains(records, lambda r: hits[(r["seed"], r["method"])])
  gains = [r for r in records if r["record"] == "gain"]
  assert [(g["method"], g["baseline"], g["kind"]) for g in gains] == [("nmtune", "mlp", "id")]
  expected = np.mean([hits[(s, "nmtune")].mean() - hits[(s, "mlp")].mean() for s in (0, 1, 2)])
  low, high = gains[0]["delta_ci95"]
  assert np.isclose(gains[0]["delta"], expected) and low < expected < high and low > 0.05
  assert gains[0]["ci_method"] == stats.CI_METHOD and gains[0]["seeds"] == 3


def test_example_deviations_are_the_gathered_means():
  """example_deviations through counts equals the mean of the gathered differences, resample by
  resample (the direct definition), minus the full mean."""
  rng = np.random.default_rng(1)
  contrasts = np.stack([(rng.random(300) < 0.6).astype(float) - (rng.random(300) < 0.5)
                        for _ in range(3)])
  indices = stats.bootstrap_indices(300, resamples=250, stream=5)
  direct = contrasts[:, indices].mean(axis=2).T - contrasts.mean(axis=1)
  got = stats.example_deviations(contrasts, stream=5, resamples=250)
  np.testing.assert_allclose(got, direct, rtol=0, atol=1e-12)
  counts = stats.resample_counts(indices)
  assert counts.sum() == 250 * 300
  assert np.array_equal(counts[0], np.bincount(indices[0], minlength=300))
  # Another task (stream) draws other resamples.
  assert not np.array_equal(stats.bootstrap_indices(300, 250, 6), indices)


def test_shared_fraction_separates_what_seeds_share_from_their_own_noise():
  rng = np.random.default_rng(2)
  shared = rng.choice([-1.0, 0.0, 1.0], size=4000)
  assert stats.shared_fraction(np.stack([shared] * 3)) == 1.0  # The seeds agree everywhere.
  own = rng.choice([-1.0, 0.0, 1.0], size=(3, 4000))
  assert stats.shared_fraction(own) < 0.05  # Independent per seed: nothing shared.
  half = np.where(rng.random((3, 4000)) < 0.5, shared, own)
  assert 0.2 < stats.shared_fraction(half) < 0.6
  assert stats.shared_fraction(own[:1]) == 1.0  # One seed: all of it counts.


def test_seed_interval_is_the_t_interval():
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  values = [0.10, 0.14, 0.07, 0.12]
  (low, high), method = stats.seed_interval(values)
  want = scipy_stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy_stats.sem(values))
  assert np.allclose([low, high], want) and method == stats.SEEDS_CI_METHOD
  assert stats.seed_interval([0.1]) == (None, stats.ONE_SEED)
