"""The evaluation jobs, configs/transfer.py and configs/nmtune.py: the one evaluation path
(nmjax.evaluate) over a checkpoint, written out as results.jsonl, results.md and a plot; and the
NMTune config's features-file (black-box) mode."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from nmjax import evaluate, features as features_lib, nmtune, report
from nmjax.errors import DataError
from nmjax.jobs import prepare_workdir
from nmjax.progress import format_seconds


def run_transfer(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """configs/transfer.py: the probes and SVE/LSVR; writes results.* and spectra.png."""
  start = time.perf_counter()
  methods, chosen = evaluate.check_transfer(config)
  workdir = prepare_workdir(workdir)
  cache = evaluate.open_cache(config, workdir, batch_size=config.batch_size,
                              batch_field="batch_size")
  center = None if config.spectral_center == "none" else config.spectral_center
  request = evaluate.Request(
      chosen, methods, lambda m, c: evaluate.method_config(config, m, c), evaluate.probe_row,
      spectral_center=center, spectrum_top_k=evaluate.SPECTRUM_TOP_K, prefix="[transfer]")
  result = evaluate.run(cache, request)
  enc = cache.encoder
  if jax.process_index() == 0:
    header = report.encoder_header(enc, "Accuracy in %, SVE/LSVR of the test features"
                                        f" (centering: {config.spectral_center}).")
    table = report.write_evaluation(result.rows, methods, workdir, title="Transfer results",
                                    header=header)
    report.plot_task_spectra(
        result.spectra, {t.name: t.kind for t in chosen}, os.path.join(workdir, "spectra.png"),
        f"{enc.config.model}, {enc.config.dataset}, noise {enc.config.get('noise_ratio')}, step"
        f" {enc.step}")
    print(table, flush=True)
  print(f"[transfer] done in {format_seconds(time.perf_counter() - start)}; results in {os.path.join(workdir, 'results.jsonl')}, results.md and"
        " spectra.png", flush=True)
  return {"rows": result.rows, "features_extracted": result.features_extracted}


def _load_files(config: ml_collections.ConfigDict) -> tuple[features_lib.FeatureSet,
                                                            features_lib.FeatureSet]:
  """The train and test features files, checked against each other before any method runs: the
  same D, and every test label a class the train file holds."""
  given = config.num_classes
  train = features_lib.load(config.train_features, num_classes=given)
  top = given or int(train.labels.max()) + 1
  test = features_lib.load(config.test_features, num_classes=top,
                           note="" if given else features_lib.inferred_classes_note(top))
  where = f"test features file {test.path}"
  if test.feature_dim != train.feature_dim:
    raise DataError(f"{where}: feature dimension {test.feature_dim} differs from the train"
                    f" features' ({train.feature_dim}, {train.path})")
  unseen = ~np.isin(test.labels, train.labels)
  if unseen.any():
    row = int(np.flatnonzero(unseen)[0])
    raise DataError(f"{where}: label {test.labels[row]} in row {row} never occurs in the train"
                    f" features file {train.path} ({int(unseen.sum())} test rows of"
                    f" {len(np.unique(test.labels[unseen]))} such classes), so no method trained"
                    " there could predict it; drop those rows or add the class to train")
  return train, test


def _append_line(path: str, row: dict[str, Any]) -> None:
  """Appends one JSON line whole or not at all (a full disk never leaves a torn line)."""
  existing = ""
  if os.path.exists(path):
    with open(path) as f:
      existing = f.read()
  report.write_text(path, existing + json.dumps(row) + "\n")


def _run_files(config: ml_collections.ConfigDict, methods: list[str], workdir: str) -> dict:
  """Features-file mode: one appended JSON line per method."""
  path = os.path.join(workdir, "results.jsonl")
  train, test = _load_files(config)
  rows = []
  for method in methods:
    result = evaluate.METHODS[method](
        train, {"test": test}, evaluate.method_config(config, method, config.num_classes))["test"]
    row = {**evaluate.tuning_fields(result),
           "train_features": os.path.abspath(config.train_features),
           "test_features": os.path.abspath(config.test_features)}
    rows.append(row)
    if jax.process_index() == 0:
      _append_line(path, row)
    for line in nmtune.report_lines({"test": result}):
      print(f"[nmtune] {method} {line}", flush=True)
    print(f"[nmtune] {method}: accuracy {row['accuracy']:.4f} | {row['num_train']} train,"
          f" {row['num_test']} test, D={row['feature_dim']}, C={row['num_classes']} |"
          f" {format_seconds(row['seconds'])}", flush=True)
  print(f"[nmtune] appended {len(rows)} line(s) to {path}", flush=True)
  return {"rows": rows}


def run_nmtune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """configs/nmtune.py: features files, or a checkpoint over tasks with plain or augmented
  train views; writes results.* and curves.png."""
  start = time.perf_counter()
  methods, chosen = evaluate.check_tuning(config)
  workdir = prepare_workdir(workdir)
  if not chosen:
    return _run_files(config, methods, workdir)
  cache = evaluate.open_cache(config, workdir, batch_size=config.extract_batch_size,
                              batch_field="extract_batch_size")
  result = evaluate.run(cache, evaluate.tuning_request(config, methods, chosen))
  if jax.process_index() == 0:
    print(report.write_tuning(result.rows, cache.encoder, config, methods, workdir), flush=True)
  print(f"[nmtune] done in {format_seconds(time.perf_counter() - start)}; results in {os.path.join(workdir, 'results.jsonl')}, results.md and"
        " curves.png", flush=True)
  return {"rows": result.rows, "spectra": result.spectra,
          "features_extracted": result.features_extracted}
