"""Paired statistics of a sweep: each task record's accuracy change from the same seed's r = 0
record (delta), with a 95% interval from a paired bootstrap over test examples pooled over seeds.

The bootstrap resamples the test examples (the same resample for the r = 0 and the r > 0 fit, and
for every seed, whose test sets are the same examples), computes the mean over seeds of
acc(r) - acc(0) on each resample, and takes the 2.5 and 97.5 percentiles. It needs each fit's
per-example hits (Evaluation.correct); records without them get delta_ci95 None.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RESAMPLES = 1000
_SEED = 20240116  # Fixed: the interval is a pure function of the hits.


def load_hits(path: str) -> dict[str, np.ndarray]:
  """An npz of Evaluation.correct ("task|method" -> hits), read once; {} if it was not kept."""
  if not os.path.exists(path):
    return {}
  with np.load(path) as saved:
    return {key: saved[key] for key in saved.files}


def bootstrap_indices(num_examples: int, resamples: int = RESAMPLES) -> np.ndarray:
  """(resamples, num_examples) example indices drawn with replacement, seeded by the size."""
  rng = np.random.default_rng([_SEED, num_examples])
  return rng.integers(0, num_examples, size=(resamples, num_examples), dtype=np.int32)


def resample_counts(indices: np.ndarray) -> np.ndarray:
  """(resamples, N) uint8: how many times each example is drawn in each row of `indices`."""
  resamples, num_examples = indices.shape
  offsets = (np.arange(resamples, dtype=np.int64) * num_examples)[:, None]
  counts = np.bincount((indices + offsets).ravel(), minlength=resamples * num_examples)
  return counts.reshape(resamples, num_examples).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def bootstrap_counts(num_examples: int, resamples: int = RESAMPLES) -> np.ndarray:
  """resample_counts(bootstrap_indices(num_examples)), kept for the sizes last used."""
  counts = resample_counts(bootstrap_indices(num_examples, resamples))
  counts.setflags(write=False)
  return counts


def paired_stats(pairs: Sequence[tuple[np.ndarray, np.ndarray]], indices: np.ndarray | None,
                 *, counts: np.ndarray | None = None) -> np.ndarray:
  """The bootstrap distribution (one value per resample) of the mean over pairs of
  acc(hits_r) - acc(hits_0); pairs: (hits at r, hits at 0), boolean arrays over the same
  examples, resampled by the rows of `indices` (or their resample_counts, `counts`). A
  resample's mean is (counts @ mean-over-pairs difference) / N: one matrix product."""
  diffs = np.mean([np.asarray(r, np.float64) - np.asarray(z, np.float64) for r, z in pairs],
                  axis=0)
  counts = resample_counts(indices) if counts is None else counts
  out = np.empty(len(counts))
  for start in range(0, len(counts), 100):  # 100 resamples at a time: bounded memory.
    out[start:start + 100] = counts[start:start + 100].astype(np.float64) @ diffs
  return out / counts.shape[1]


def interval(bootstrap: np.ndarray) -> list[float]:
  """[low, high]: the 2.5 and 97.5 percentiles of a bootstrap distribution."""
  low, high = np.percentile(bootstrap, [2.5, 97.5])
  return [float(low), float(high)]


def paired_interval(pairs: Sequence[tuple[np.ndarray, np.ndarray]],
                    indices: np.ndarray) -> list[float]:
  """The 95% paired-bootstrap interval of the mean over pairs of acc(r) - acc(0)."""
  return interval(paired_stats(pairs, indices))


def add_deltas(records: list[dict[str, Any]],
               hits_of: Callable[[dict[str, Any]], np.ndarray | None]) -> None:
  """Sets delta (accuracy minus the same seed's r = 0 accuracy on that task and method) and
  delta_ci95 on every "task" record with noise_ratio > 0 whose seed has an r = 0 record, and
  appends one "delta" record per (r, method, kind): the mean over the kind's tasks of the mean
  delta over seeds, its interval from the tasks' bootstrap distributions averaged (each task's
  examples resampled on their own). hits_of gives a record's per-example hits (None when not
  kept: the intervals are then None)."""
  tasks = [r for r in records if r["record"] == "task"]
  base = {(r["seed"], r["task"], r["method"]): r for r in tasks if r["noise_ratio"] == 0}
  groups: dict[tuple[Any, ...], list[tuple[dict, dict]]] = {}
  for record in tasks:
    zero = base.get((record["seed"], record["task"], record["method"]))
    if record["noise_ratio"] > 0 and zero is not None:
      record["delta"] = float(record["accuracy"] - zero["accuracy"])
      groups.setdefault((record["noise_ratio"], record["method"], record["kind"],
                         record["task"]), []).append((record, zero))
  kinds: dict[tuple[Any, ...], list[tuple[float, np.ndarray | None]]] = {}
  for key, members in groups.items():
    pairs = [(hits_of(r), hits_of(z)) for r, z in members]
    sizes = {len(h) if h is not None else -1 for pair in pairs for h in pair}
    bootstrap = None
    if len(sizes) == 1 and -1 not in sizes:
      size = sizes.pop()
      bootstrap = paired_stats(pairs, None, counts=bootstrap_counts(size))
    for record, _ in members:
      record["delta_ci95"] = None if bootstrap is None else interval(bootstrap)
    kinds.setdefault(key[:3], []).append(
        (float(np.mean([r["delta"] for r, _ in members])), bootstrap))
  for (ratio, method, kind), parts in kinds.items():
    complete = all(b is not None for _, b in parts)
    records.append({"record": "delta", "seed": None, "noise_ratio": ratio, "method": method,
                    "kind": kind, "tasks": len(parts),
                    "delta": float(np.mean([d for d, _ in parts])),
                    "delta_ci95": interval(np.mean([b for _, b in parts], axis=0))
                    if complete else None})


GAINS = (("nmtune", "mlp"), ("nmtune", "lp"))  # (method, baseline) pairs that "gain" compares


def add_gains(records: list[dict[str, Any]],
              hits_of: Callable[[dict[str, Any]], np.ndarray | None],
              pairs: Sequence[tuple[str, str]] = GAINS) -> None:
  """Appends one "gain" record per (r, kind, method, baseline) of `pairs` present: the mean over
  the kind's tasks of the mean over seeds of acc(method) - acc(baseline) on the same encoder and
  test set, with its 95% paired-bootstrap interval (the same resample for both methods and every
  seed; each task's examples resampled on their own; None without hits)."""
  tasks = [r for r in records if r["record"] == "task"]
  by = {(r["seed"], r["noise_ratio"], r["task"], r["method"]): r for r in tasks}
  for method, baseline in pairs:
    kinds: dict[tuple[float, str], list[tuple[float, np.ndarray | None]]] = {}
    for ratio, kind, task in dict.fromkeys((r["noise_ratio"], r["kind"], r["task"])
                                           for r in tasks):
      members = [(by[key], by[key[:3] + (baseline,)]) for key in
                 ((s, ratio, task, method) for s in sorted({r["seed"] for r in tasks}))
                 if key in by and key[:3] + (baseline,) in by]
      if not members:
        continue
      pairs_hits = [(hits_of(a), hits_of(b)) for a, b in members]
      sizes = {-1 if h is None else len(h) for pair in pairs_hits for h in pair}
      bootstrap = (paired_stats(pairs_hits, None, counts=bootstrap_counts(sizes.pop()))
                   if len(sizes) == 1 and -1 not in sizes else None)
      kinds.setdefault((ratio, kind), []).append(
          (float(np.mean([a["accuracy"] - b["accuracy"] for a, b in members])), bootstrap))
    for (ratio, kind), parts in kinds.items():
      complete = all(b is not None for _, b in parts)
      records.append({"record": "gain", "seed": None, "noise_ratio": ratio, "kind": kind,
                      "method": method, "baseline": baseline, "tasks": len(parts),
                      "delta": float(np.mean([d for d, _ in parts])),
                      "delta_ci95": interval(np.mean([b for _, b in parts], axis=0))
                      if complete else None})
