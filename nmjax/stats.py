"""Paired, seed-level statistics of a sweep: intervals of changes and gains, and verdicts.

Each number a study compares is a difference on one seed: acc(r) - acc(0) (a delta) or
acc(method) - acc(baseline) on the same encoder (a gain). Its estimate is the mean over seeds
(and over a kind's tasks). Its 95% interval (CI_METHOD) is two-level, seeds and test examples,
in the layout the study has: every seed is tested on the same examples (crossed, not nested).

- Seeds: the sample standard deviation s of the n per-seed differences (each over the whole
  test set, so each seed's own example noise is in it) enters as s / sqrt(n) times a t variable
  with n - 1 degrees of freedom. A bootstrap over 3 to 8 seeds would be too narrow: 3 seeds
  have 10 distinct resamples, whose variance is (n - 1)/n of s^2/n, read at normal quantiles.
- Test examples: a paired bootstrap of the per-example difference averaged over seeds (one
  resample of a task's examples for both fits and every seed), scaled by the square root of the
  share of its variance that the seeds have in common (shared_fraction: 1 - MS_residual /
  MS_examples of the seeds x examples layout). That shared part does not average away over
  seeds; the rest is each seed's own noise, already in s, and is not counted twice.

The two deviations are added draw by draw over RESAMPLES draws (the t variable at stratified
quantiles in a fixed shuffled order, each task's resamples seeded by its name and size: an
interval is a pure function of the hits), and the interval is their 2.5 and 97.5 percentiles.
On synthetic studies of 2 to 8 seeds it holds a zero effect about 95% of the time; where seeds
differ by more than the test set can tell, the example bootstrap alone holds it far less often
(tests/test_claims.py: 15 of 50 times, the two-level interval 48 of 50). With one seed the
interval is the example bootstrap alone (EXAMPLES_CI_METHOD): it says nothing of the seeds;
without per-example hits there is none. Spectral metrics have no per-example hits: their change
from r = 0 gets the t interval over seeds alone (SEEDS_CI_METHOD).

A claim's verdict (verdict) reads an interval against the direction the paper states.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from scipy import special

RESAMPLES = 2000
_SEED = 20240116  # Fixed: an interval is a pure function of the hits.
_CHUNK = 100
CI_METHOD = (f"two-level: t over seeds (n-1 df) + paired bootstrap over shared test examples"
             f" ({RESAMPLES} draws)")
EXAMPLES_CI_METHOD = f"one seed: paired bootstrap over test examples only ({RESAMPLES} draws)"
SEEDS_CI_METHOD = "t over seeds (n-1 df)"
NO_HITS = "none: per-example hits not kept"
ONE_SEED = "none: one seed"
VERDICTS = ("reproduced", "contradicted", "undetermined")
GAINS = (("nmtune", "mlp"), ("nmtune", "lp"))  # (method, baseline) pairs that "gain" compares
SPECTRAL = ("sve", "lsvr")

# key (its last part the task) -> {seed: (difference, per-example difference or None)}
Cells = dict[tuple[Any, ...], dict[int, tuple[float, np.ndarray | None]]]


def load_hits(path: str) -> dict[str, np.ndarray]:
  """An npz of Evaluation.correct ("task|method" -> hits), read once; {} if it was not kept."""
  if not os.path.exists(path):
    return {}
  with np.load(path) as saved:
    return {key: saved[key] for key in saved.files}


def task_stream(task: str) -> int:
  """The resample stream of a task: its examples are resampled apart from other tasks'."""
  return zlib.crc32(task.encode())


def _index_chunks(num_examples: int, resamples: int, stream: int) -> Iterator[np.ndarray]:
  """The resamples' example indices, _CHUNK resamples at a time (bounded memory), from a
  generator seeded by the size and the stream."""
  rng = np.random.default_rng([_SEED, num_examples, stream])
  for start in range(0, resamples, _CHUNK):
    yield rng.integers(0, num_examples, size=(min(_CHUNK, resamples - start), num_examples),
                       dtype=np.int32)


def bootstrap_indices(num_examples: int, resamples: int = RESAMPLES,
                      stream: int = 0) -> np.ndarray:
  """(resamples, num_examples) example indices drawn with replacement: the resamples that
  example_deviations draws for this size and stream."""
  return np.concatenate(list(_index_chunks(num_examples, resamples, stream)))


def resample_counts(indices: np.ndarray) -> np.ndarray:
  """(resamples, N) float64: how many times each example is drawn in each row of `indices`."""
  resamples, num_examples = indices.shape
  offsets = (np.arange(resamples, dtype=np.int64) * num_examples)[:, None]
  counts = np.bincount((indices + offsets).ravel(), minlength=resamples * num_examples)
  return counts.reshape(resamples, num_examples).astype(np.float64)


def example_deviations(contrasts: np.ndarray, stream: int = 0,
                       resamples: int = RESAMPLES) -> np.ndarray:
  """(resamples, k): each bootstrap resample's mean of each contrast minus the contrast's mean.

  Args:
    contrasts: (k, N) per-example differences over the same N test examples; every contrast
      takes the same resamples (paired).
    stream: the resamples' stream (task_stream of the task), with N their seed.
    resamples: how many.

  Returns:
    The deviations, one column per contrast. A resample's mean is counts @ contrast / N
    (resample_counts of bootstrap_indices(N, resamples, stream)): one matrix product per chunk.
  """
  contrasts = np.asarray(contrasts, np.float64)
  out = np.empty((resamples, len(contrasts)))
  start = 0
  for indices in _index_chunks(contrasts.shape[1], resamples, stream):
    out[start:start + len(indices)] = resample_counts(indices) @ contrasts.T
    start += len(indices)
  return out / contrasts.shape[1] - contrasts.mean(axis=1)


def shared_fraction(differences: np.ndarray) -> float:
  """The share of the examples' spread that the seeds have in common.

  Args:
    differences: (n seeds, N examples) per-example differences, the seeds tested on the same
      examples.

  Returns:
    1 - MS_residual / MS_examples of the two-way (seeds x examples) layout, at least 0: the
    estimated fraction of the variance over examples of the mean over seeds that is shared by
    the seeds (the rest is each seed's own noise, already in the spread of the per-seed
    values); 1 for one seed.
  """
  d = np.asarray(differences, np.float64)
  n, size = d.shape
  if n < 2 or size < 2:
    return 1.0
  by_example = d.mean(axis=0)
  ms_examples = n * np.var(by_example, ddof=1)
  residual = d - by_example - d.mean(axis=1, keepdims=True) + d.mean()
  ms_residual = np.sum(residual * residual) / ((n - 1) * (size - 1))
  return float(max(0.0, 1.0 - ms_residual / ms_examples)) if ms_examples > 0 else 0.0


@functools.lru_cache(maxsize=16)
def _t_draws(df: int, draws: int) -> np.ndarray:
  """t(df) at the stratified quantiles (i + 0.5) / draws, in a fixed shuffled order."""
  values = special.stdtrit(df, (np.arange(draws) + 0.5) / draws)
  values = np.random.default_rng([_SEED, draws]).permutation(values)
  values.setflags(write=False)
  return values


def seed_deviations(per_seed: Sequence[float], draws: int = RESAMPLES) -> np.ndarray:
  """(draws,) deviations of the mean over seeds: s / sqrt(n) * t(n - 1); zeros for one seed."""
  values = np.asarray(per_seed, np.float64)
  if len(values) < 2:
    return np.zeros(draws)
  return values.std(ddof=1) / np.sqrt(len(values)) * _t_draws(len(values) - 1, draws)


def interval(draws: np.ndarray) -> list[float]:
  """[low, high]: the 2.5 and 97.5 percentiles of a distribution's draws."""
  low, high = np.percentile(draws, [2.5, 97.5])
  return [float(low), float(high)]


def two_level_interval(per_seed: Sequence[float], deviations: np.ndarray | None
                       ) -> tuple[list[float] | None, str]:
  """The 95% interval of the mean of `per_seed` (module docstring) and its ci_method.

  Args:
    per_seed: the difference on each seed (its whole test set).
    deviations: the example level's deviations of the mean over seeds (example_deviations,
      scaled to the seeds' shared part where there are several), or None without per-example
      hits.

  Returns:
    ([low, high] or None, the method's words: CI_METHOD, EXAMPLES_CI_METHOD or NO_HITS).
  """
  if deviations is None:
    return None, NO_HITS
  draws = float(np.mean(per_seed)) + deviations
  if len(per_seed) < 2:
    return interval(draws), EXAMPLES_CI_METHOD
  return interval(draws + seed_deviations(per_seed, len(deviations))), CI_METHOD


def seed_interval(per_seed: Sequence[float]) -> tuple[list[float] | None, str]:
  """The 95% t interval over seeds of the mean of `per_seed`, and its ci_method (None, ONE_SEED
  for one seed)."""
  values = np.asarray(per_seed, np.float64)
  if len(values) < 2:
    return None, ONE_SEED
  half = special.stdtrit(len(values) - 1, 0.975) * values.std(ddof=1) / np.sqrt(len(values))
  return [float(values.mean() - half), float(values.mean() + half)], SEEDS_CI_METHOD


def verdict(ci95: Sequence[float] | None, direction: int) -> str:
  """A claim's verdict: "reproduced" where the interval excludes 0 in the claim's direction
  (+1: above 0, -1: below), "contradicted" where it excludes 0 the other way, else (it holds 0,
  or there is none) "undetermined"."""
  if ci95 is None or ci95[0] <= 0 <= ci95[1]:
    return "undetermined"
  return "reproduced" if (1 if ci95[0] > 0 else -1) == direction else "contradicted"


# ------------------------------------------------------------------------- records of a sweep


def _difference(hits: np.ndarray | None, other: np.ndarray | None) -> np.ndarray | None:
  if hits is None or other is None or len(hits) != len(other):
    return None
  return np.asarray(hits, np.float64) - np.asarray(other, np.float64)


def _deviations(cells: Cells) -> dict[tuple[Any, ...], np.ndarray | None]:
  """Each key's example-level deviations (module docstring): the bootstrap deviations of its
  per-example difference averaged over seeds, scaled by sqrt(shared_fraction); the keys of one
  task share its resamples (one matrix product per task). None where a seed's hits are missing
  or differ in size."""
  out: dict[tuple[Any, ...], np.ndarray | None] = {}
  by_task: dict[tuple[str, int], list[tuple[tuple[Any, ...], np.ndarray]]] = {}
  for key, seeds in cells.items():
    diffs = [d for _, d in seeds.values()]
    sizes = {-1 if d is None else len(d) for d in diffs}
    if len(sizes) != 1 or -1 in sizes:
      out[key] = None
      continue
    by_task.setdefault((key[-1], sizes.pop()), []).append((key, np.stack(diffs)))
  for (task, size), members in by_task.items():
    deviations = example_deviations(np.stack([d.mean(axis=0) for _, d in members]),
                                    task_stream(task))
    for column, (key, diffs) in enumerate(members):
      out[key] = deviations[:, column] * np.sqrt(shared_fraction(diffs))
  return out


def _summary(per_seed: list[float], tasks: int, ci: tuple[list[float] | None, str]
             ) -> dict[str, Any]:
  return {"tasks": tasks, "seeds": len(per_seed), "delta": float(np.mean(per_seed)),
          "delta_ci95": ci[0], "ci_method": ci[1]}


def _kinds(cells: Cells) -> dict[tuple[Any, ...], tuple[list[tuple[Any, ...]], list[float]]]:
  """Per key without its task (a kind's average): its keys, and on each seed that every one of
  them has, the mean over the tasks."""
  groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
  for key in cells:
    groups.setdefault(key[:-1], []).append(key)
  out = {}
  for group, keys in groups.items():
    seeds = [s for s in cells[keys[0]] if all(s in cells[k] for k in keys)]
    out[group] = keys, [float(np.mean([cells[k][s][0] for k in keys])) for s in seeds]
  return out


def _kind_summaries(cells: Cells, deviations: dict[tuple[Any, ...], np.ndarray | None]
                    ) -> dict[tuple[Any, ...], dict[str, Any]]:
  """Each kind's average (_kinds) with its interval: the per-seed averages, and the tasks'
  example deviations averaged (each task's examples resampled on their own)."""
  out = {}
  for group, (keys, per_seed) in _kinds(cells).items():
    parts = [deviations[k] for k in keys]
    mean = None if any(p is None for p in parts) else np.mean(parts, axis=0)
    out[group] = _summary(per_seed, len(keys), two_level_interval(per_seed, mean))
  return out


def add_deltas(records: list[dict[str, Any]],
               hits_of: Callable[[dict[str, Any]], np.ndarray | None]) -> None:
  """Sets delta (accuracy minus the same seed's r = 0 accuracy on that task and method),
  delta_ci95 and ci_method on every "task" record with noise_ratio > 0 whose seed has an r = 0
  record, and appends one "delta" record per (r, method, kind): the mean over seeds of the mean
  over the kind's tasks, with its interval (module docstring).

  Args:
    records: results.jsonl's records; changed in place.
    hits_of: a task record's per-example hits (None when not kept: no interval then).
  """
  tasks = [r for r in records if r["record"] == "task"]
  base = {(r["seed"], r["task"], r["method"]): r for r in tasks if r["noise_ratio"] == 0}
  cells: Cells = {}
  members: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
  for record in tasks:
    zero = base.get((record["seed"], record["task"], record["method"]))
    if record["noise_ratio"] > 0 and zero is not None:
      record["delta"] = float(record["accuracy"] - zero["accuracy"])
      key = (record["noise_ratio"], record["method"], record["kind"], record["task"])
      cells.setdefault(key, {})[record["seed"]] = (
          record["delta"], _difference(hits_of(record), hits_of(zero)))
      members.setdefault(key, []).append(record)
  deviations = _deviations(cells)
  for key, group in members.items():
    ci = two_level_interval([v for v, _ in cells[key].values()], deviations[key])
    for record in group:
      record["delta_ci95"], record["ci_method"] = ci
  for (ratio, method, kind), summary in _kind_summaries(cells, deviations).items():
    records.append({"record": "delta", "seed": None, "noise_ratio": ratio, "method": method,
                    "kind": kind, **summary})


def add_gains(records: list[dict[str, Any]],
              hits_of: Callable[[dict[str, Any]], np.ndarray | None],
              pairs: Sequence[tuple[str, str]] = GAINS) -> None:
  """Appends one "gain" record per (r, kind, method, baseline) of `pairs` present: the mean over
  seeds of the mean over the kind's tasks of acc(method) - acc(baseline) on the same encoder
  and test set, with its interval (module docstring; the same resample for both methods).

  Args:
    records: results.jsonl's records; the gains are appended.
    hits_of: a task record's per-example hits (None when not kept: no interval then).
    pairs: the (method, baseline) pairs to compare.
  """
  by = {(r["seed"], r["noise_ratio"], r["task"], r["method"]): r for r in records
        if r["record"] == "task"}
  cells: Cells = {}
  for method, baseline in pairs:
    for (seed, ratio, task, name), record in by.items():
      other = by.get((seed, ratio, task, baseline))
      if name == method and other is not None:
        cells.setdefault((method, baseline, ratio, record["kind"], task), {})[seed] = (
            float(record["accuracy"] - other["accuracy"]),
            _difference(hits_of(record), hits_of(other)))
  for (method, baseline, ratio, kind), summary in _kind_summaries(
      cells, _deviations(cells)).items():
    records.append({"record": "gain", "seed": None, "noise_ratio": ratio, "kind": kind,
                    "method": method, "baseline": baseline, **summary})


def add_spectral_deltas(records: list[dict[str, Any]],
                        metrics: Sequence[str] = SPECTRAL) -> None:
  """Appends "spectral_delta" records: each metric's change from the same seed's r = 0 value,
  per (r, task) and per (r, kind) (task None: the mean over the kind's tasks), the mean over
  seeds with its t interval over seeds (SEEDS_CI_METHOD).

  Args:
    records: results.jsonl's records, with their "spectrum" records; changed in place.
    metrics: the "spectrum" records' fields to compare.
  """
  spectra = [r for r in records if r["record"] == "spectrum"]
  base = {(r["seed"], r["task"]): r for r in spectra if r["noise_ratio"] == 0}
  cells: Cells = {}
  for record in spectra:
    zero = base.get((record["seed"], record["task"]))
    if record["noise_ratio"] > 0 and zero is not None:
      for metric in metrics:
        key = (record["noise_ratio"], metric, record["kind"], record["task"])
        cells.setdefault(key, {})[record["seed"]] = (float(record[metric] - zero[metric]), None)
  rows = []
  for key, seeds in cells.items():
    per_seed = [d for d, _ in seeds.values()]
    rows.append((key, _summary(per_seed, 1, seed_interval(per_seed))))
  for group, (keys, per_seed) in _kinds(cells).items():
    rows.append((group + (None,), _summary(per_seed, len(keys), seed_interval(per_seed))))
  for (ratio, metric, kind, task), summary in rows:
    records.append({"record": "spectral_delta", "seed": None, "noise_ratio": ratio,
                    "metric": metric, "kind": kind, "task": task, **summary})
