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


def test_paired_interval_is_seeded_and_covers_the_effect():
  rng = np.random.default_rng(3)
  zero = rng.random(5000) < 0.8
  worse = zero & (rng.random(5000) > 0.05)  # About 4 points lost, paired example by example.
  indices = stats.bootstrap_indices(5000)
  low, high = stats.paired_interval([(worse, zero)], indices)
  delta = worse.mean() - zero.mean()
  assert low < delta < high < 0
  assert high - low < 0.015  # Paired: far narrower than two independent 5,000-image tests.
  assert [low, high] == stats.paired_interval([(worse, zero)], stats.bootstrap_indices(5000))
  same = stats.paired_interval([(zero, zero)], indices)
  assert same == [0.0, 0.0]


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
  assert noisy[0]["delta_ci95"] == noisy[1]["delta_ci95"]  # One interval, pooled over seeds.
  low, high = noisy[0]["delta_ci95"]
  assert low < np.mean([r["delta"] for r in noisy]) < high
  assert "delta" not in records[4] and "delta" not in records[5]
  assert all("delta" not in r for r in records if r["noise_ratio"] == 0)
  # One "delta" record per (r, method, kind): here one task, so its numbers are that task's.
  (average,) = [r for r in records if r["record"] == "delta"]
  assert (average["noise_ratio"], average["method"], average["kind"], average["tasks"]) == (
      0.3, "lp", "id", 1)
  assert abs(average["delta"] - np.mean([r["delta"] for r in noisy])) < 1e-12
  assert np.allclose(average["delta_ci95"], noisy[0]["delta_ci95"])
  # Without hits the delta stays and the interval is None.
  bare = [dict(r) for r in records[:4]]
  stats.add_deltas(bare, lambda rec: None)
  assert bare[1]["delta_ci95"] is None and "delta" in bare[1]
  assert bare[-1]["record"] == "delta" and bare[-1]["delta_ci95"] is None


def test_add_gains_compares_methods_on_the_same_encoder_and_examples():
  """nmtune - mlp per (r, kind): the mean over seeds and tasks of the accuracy difference, its
  interval from the same resample for both methods; a missing baseline gives no record."""
  rng = np.random.default_rng(0)
  records, hits = [], {}
  for seed in (0, 1):
    for method, p in (("mlp", 0.6), ("nmtune", 0.7)):
      correct = rng.random(2000) < p
      record = {"record": "task", "seed": seed, "noise_ratio": 0.0, "task": "t", "kind": "id",
                "method": method, "accuracy": float(correct.mean())}
      records.append(record)
      hits[(seed, method)] = correct
  stats.add_gains(records, lambda r: hits[(r["seed"], r["method"])])
  gains = [r for r in records if r["record"] == "gain"]
  assert [(g["method"], g["baseline"], g["kind"]) for g in gains] == [("nmtune", "mlp", "id")]
  expected = np.mean([hits[(s, "nmtune")].mean() - hits[(s, "mlp")].mean() for s in (0, 1)])
  low, high = gains[0]["delta_ci95"]
  assert np.isclose(gains[0]["delta"], expected) and low < expected < high and low > 0.05


def test_resample_counts_give_the_gathered_means():
  """paired_stats through counts equals the mean of the gathered differences, resample by
  resample (the direct definition)."""
  rng = np.random.default_rng(1)
  pairs = [(rng.random(300) < 0.6, rng.random(300) < 0.5) for _ in range(3)]
  indices = stats.bootstrap_indices(300, resamples=50)
  direct = np.mean([(r.astype(float) - z.astype(float))[indices].mean(axis=1)
                    for r, z in pairs], axis=0)
  np.testing.assert_allclose(stats.paired_stats(pairs, indices), direct, rtol=0, atol=1e-12)
  counts = stats.bootstrap_counts(300, 50)
  assert counts.sum() == 50 * 300 and np.array_equal(counts, stats.resample_counts(indices))
