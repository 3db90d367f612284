"""Seconds and accuracy of nmjax's probes against scikit-learn on the same cached features (JSON).

For every task: nmjax.probe.linear_probe (the reference AdamW protocol, 30 epochs, batch 64),
nmjax.probe.ridge_probe (closed form, lambda from a held-out 20% of train) and scikit-learn's
LogisticRegression (lbfgs, C=1.0, max_iter=1000, on StandardScaler-standardized features; the
time covers standardizing and fitting). The probes' own "seconds" include validation and, on a
first call, compilation; "seconds_compiled" times a second call on the same shapes (ridge_probe
on every task, linear_probe on the synthetic one). The speedup uses the first-call seconds.

Tasks:
  synthetic       N=50,000 train / 10,000 test, D=512, C=10: class means (N(0, 0.1^2) each
                  coordinate) plus Gaussian noise with a random covariance (a random rotation
                  of per-direction scales exp(U(-0.5, 0.5))), seed 0.
  synthetic_powerlaw  the same, with the noise scales also decaying as 1/k over the rotated
                  directions (k = 1..512, rescaled to the same total variance): the power-law
                  spectrum of learned features (class means mixed the same way, so the signal-to-noise
                  ratio per direction is unchanged); lbfgs needs more iterations on it.
  digits, mnist   raw pixels of the embedded sources (28x28 -> 784 values in [0, 1]), their
                  fixed train/test splits.
  fashion_mnist   raw pixels, the first --fashion-train train and --fashion-test test examples.
  mnist_relu512   mnist through a fixed random ReLU layer (512 units over 2x2-pooled pixels,
                  seed 0): the features tests/test_probe.py uses.

BLAS-backed numpy/scipy code (scikit-learn, and the probes' small float64 eigendecompositions)
runs with one thread (threadpoolctl): on a shared 2-core machine OpenBLAS threads spinning
against other processes made both slower by up to 10x. JAX keeps its own threads. The load
average before and after is printed, since the machine may be shared.

The JSON is also written, with the command, commit, date and machine, to
docs/benchmarks/probe-<device>.json (--out to choose the file; benchmarks/provenance.py).

    .venv/bin/python benchmarks/probe.py                  # all tasks, about 2-4 minutes
    .venv/bin/python benchmarks/probe.py --tasks synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import threadpoolctl
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import provenance  # benchmarks/provenance.py
from nmjax import probe
from nmjax.data.sources import get_source

Split = tuple[np.ndarray, np.ndarray]
_SKLEARN_MAX_ITER = 1000


def _synthetic(power: float = 0.0) -> tuple[Split, Split]:
  rng = np.random.default_rng(0)
  dim, classes = 512, 10
  means = rng.standard_normal((classes, dim)) * 0.1
  rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  decay = np.arange(1, dim + 1) ** -power  # power 0: the isotropic case.
  mixing = rotation * (np.exp(rng.uniform(-0.5, 0.5, dim)) * decay / np.sqrt(np.mean(decay ** 2)))
  if power:  # The class means share the noise's spectrum, so every direction keeps its SNR.
    means = means @ mixing.T

  def draw(n: int) -> Split:
    labels = rng.integers(0, classes, n)
    noise = rng.standard_normal((n, dim)) @ mixing.T
    return (means[labels] + noise).astype(np.float32), labels

  return draw(50_000), draw(10_000)


def _pixels(name: str, split: str, limit: int | None = None) -> Split:
  images, labels, _ = get_source(name).load_arrays(split)
  images, labels = images[:limit], labels[:limit]
  return images.reshape(len(images), -1).astype(np.float32) / 255.0, np.asarray(labels)


def _random_relu(split: Split, dim: int = 512) -> Split:
  pixels = split[0].reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(split[0]), -1)
  rng = np.random.default_rng(0)
  weight = rng.standard_normal((pixels.shape[1], dim)).astype(np.float32) * 2.0 / 14.0
  bias = rng.uniform(-1.0, 1.0, dim).astype(np.float32)
  return np.maximum(pixels @ weight + bias, 0.0), split[1]


def _tasks(fashion_train: int, fashion_test: int) -> dict[str, Callable[[], tuple[Split, Split]]]:
  return {
      "synthetic": _synthetic,
      "synthetic_powerlaw": lambda: _synthetic(power=1.0),
      "digits": lambda: (_pixels("digits", "train"), _pixels("digits", "test")),
      "mnist": lambda: (_pixels("mnist", "train"), _pixels("mnist", "test")),
      "fashion_mnist": lambda: (_pixels("fashion_mnist", "train", fashion_train),
                                _pixels("fashion_mnist", "test", fashion_test)),
      "mnist_relu512": lambda: (_random_relu(_pixels("mnist", "train")),
                                _random_relu(_pixels("mnist", "test"))),
  }


def _sklearn(train: Split, test: Split) -> dict[str, Any]:
  start = time.perf_counter()
  scaler = StandardScaler().fit(train[0])
  model = LogisticRegression(solver="lbfgs", max_iter=_SKLEARN_MAX_ITER)
  model.fit(scaler.transform(train[0]), train[1])
  seconds = time.perf_counter() - start
  return {"accuracy": float(model.score(scaler.transform(test[0]), test[1])),
          "seconds": seconds, "iterations": int(np.max(model.n_iter_))}


def _brief(result: dict[str, Any], *keys: str) -> dict[str, Any]:
  return {k: (float(f"{result[k]:.4g}") if isinstance(result[k], float) else result[k])
          for k in ("accuracy", "seconds", *keys) if k in result}


def _run(name: str, load: Callable[[], tuple[Split, Split]]) -> dict[str, Any]:
  train, test = load()
  row: dict[str, Any] = {"num_train": len(train[1]), "num_test": len(test[1]),
                         "feature_dim": int(train[0].shape[1])}
  lp = probe.linear_probe(train, test)
  row["linear_probe"] = _brief(lp, "train_accuracy")
  if name.startswith("synthetic"):
    row["linear_probe"]["seconds_compiled"] = round(probe.linear_probe(train, test)["seconds"], 4)
  row["ridge_probe"] = _brief(probe.ridge_probe(train, test), "lambda", "solver")
  row["ridge_probe"]["seconds_compiled"] = round(probe.ridge_probe(train, test)["seconds"], 4)
  row["sklearn_logistic_regression"] = _brief(_sklearn(train, test), "iterations")
  sk = row["sklearn_logistic_regression"]
  row["ridge_speedup_vs_sklearn"] = round(sk["seconds"] / row["ridge_probe"]["seconds"], 2)
  row["ridge_minus_sklearn_points"] = round(
      100 * (row["ridge_probe"]["accuracy"] - sk["accuracy"]), 2)
  row["lp_minus_sklearn_points"] = round(100 * (row["linear_probe"]["accuracy"] - sk["accuracy"]),
                                         2)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", default="synthetic,synthetic_powerlaw,digits,mnist,fashion_mnist,"
                                         "mnist_relu512")
  parser.add_argument("--fashion-train", type=int, default=20_000)
  parser.add_argument("--fashion-test", type=int, default=10_000)
  provenance.add_out_flag(parser)
  args = parser.parse_args()
  tasks = _tasks(args.fashion_train, args.fashion_test)
  names = [n for n in args.tasks.split(",") if n]
  unknown = sorted(set(names) - set(tasks))
  if unknown:
    parser.error(f"unknown tasks {unknown}; known: {', '.join(tasks)}")
  report: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0],
                            "sklearn": f"LogisticRegression(lbfgs, C=1.0, max_iter="
                                       f"{_SKLEARN_MAX_ITER}) on standardized features",
                            "blas_threads": 1, "tasks": {}}
  with threadpoolctl.threadpool_limits(1):
    for name in names:
      report["tasks"][name] = _run(name, tasks[name])
      provenance.write("probe", report, args.out, complete=False)
  report["targets"] = {}
  for name in ("synthetic", "synthetic_powerlaw"):
    row = report["tasks"].get(name)
    if row:
      report["targets"][name] = {
          "ridge_20x_faster_than_sklearn": row["ridge_speedup_vs_sklearn"] >= 20,
          # "At equal accuracy within 1 point": not more than 1 point below scikit-learn.
          "ridge_at_most_1_point_below_sklearn": row["ridge_minus_sklearn_points"] >= -1,
          "linear_probe_under_15s": row["linear_probe"]["seconds"] < 15,
      }
  report["load_average_after"] = os.getloadavg()[0]
  print(json.dumps(report, indent=1))
  provenance.write("probe", report, args.out)


if __name__ == "__main__":
  main()
