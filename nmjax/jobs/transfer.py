"""The transfer job: frozen encoder -> cached features per task view -> probes + spectral metrics.

For each task (nmjax.tasks) the encoder's features of the train view and of the test views are
extracted once (cached in the workdir under the checkpoint's identity and step, so a second run
reuses them), then every requested probe is fit on the train features and scored on the test
features, and SVE/LSVR are computed on the test features. One JSON line per (task, method) goes
to DIR/results.jsonl, a markdown summary with ID and OOD averages to DIR/results.md, and the
test features' singular value spectra of every task to DIR/spectra.png.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from nmjax import features as features_lib
from nmjax import parallel, plots, probe, spectral, tasks as tasks_lib
from nmjax.config import check_choice, check_range
from nmjax.data import pipeline, sources
from nmjax.errors import ConfigError, DataError
from nmjax.jobs import encoder as encoder_lib
from nmjax.jobs import prepare_workdir
from nmjax.progress import format_seconds

METHODS = ("lp", "ridge")
CENTERS = ("row", "feature", "none")
_PROBES = {"lp": probe.linear_probe, "ridge": probe.ridge_probe}
_SPECTRUM_TOP_K = 64  # Singular values per task in spectra.png.


def parse_list(config: ml_collections.ConfigDict, field: str, allowed: Sequence[str]) -> list[str]:
  """A comma-separated config field as a list, each entry one of `allowed`."""
  names = [n.strip() for n in str(config[field]).split(",") if n.strip()]
  if not names:
    raise ConfigError(f"config.{field} is empty; allowed: {', '.join(allowed)}")
  for name in names:
    if name not in allowed:
      raise ConfigError(f"config.{field} entry {name!r} is unknown; allowed: {', '.join(allowed)}")
  return list(dict.fromkeys(names))


def validate(config: ml_collections.ConfigDict) -> list[tasks_lib.Task]:
  """Checks the config before any work; returns the resolved tasks."""
  chosen = tasks_lib.resolve(config.tasks)
  parse_list(config, "methods", METHODS)
  check_choice(config, "spectral_center", CENTERS)
  check_range(config, "batch_size", low=1, integer=True)
  check_range(config, "max_examples", integer=True)
  check_range(config, "step", integer=True)
  return chosen


def evenly_spaced(records: Sequence[Any], limit: int) -> Sequence[Any]:
  """At most `limit` records spread evenly over the view (every class of a sorted set shows)."""
  if limit <= 0 or len(records) <= limit:
    return records
  positions = np.linspace(0, len(records) - 1, limit).round().astype(np.int64)
  return sources.SubsetRecords(records, positions)


class FeatureCache:
  """Features of task views for one encoder, extracted on demand and kept as features files."""

  def __init__(self, encoder: encoder_lib.Encoder, workdir: str, *, batch_size: int,
               max_examples: int, data_dir: str | None, mesh: jax.sharding.Mesh):
    self.encoder = encoder
    self.root = os.path.join(workdir, "features", f"{encoder.identity}", f"step_{encoder.step}")
    self.batch_size = batch_size
    self.max_examples = max_examples
    self.data_dir = data_dir
    self.mesh = mesh
    self.extracted = 0  # Views extracted (not read from the cache) by this process.
    self.infos: dict[str, Any] = {}

  def path(self, view: tasks_lib.View) -> str:
    suffix = f"-max{self.max_examples}" if self.max_examples > 0 else ""
    return os.path.join(self.root, f"{view.key}{suffix}.npz")

  def get(self, view: tasks_lib.View) -> features_lib.FeatureSet:
    records, info = tasks_lib.view_records(view, image_shape=self.encoder.image_shape,
                                           data_dir=self.data_dir)
    self.infos[view.dataset] = info
    path = self.path(view)
    if os.path.exists(path):
      try:
        return features_lib.load(path, num_classes=info.num_classes,
                                 feature_dim=self.encoder.feature_dim)
      except DataError as e:
        print(f"[transfer] ignoring a bad cached features file ({e}); extracting again",
              flush=True)
    records = evenly_spaced(records, self.max_examples)
    batches = pipeline.eval_batches(records, batch_size=self.batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    values, labels = features_lib.extract(self.encoder.features, self.encoder.variables, batches,
                                          mesh=self.mesh)
    self.extracted += 1
    if jax.process_index() == 0:
      features_lib.save(path, values, labels, domain=str(view), extra={
          "checkpoint": self.encoder.workdir, "step": self.encoder.step})
    return features_lib.FeatureSet(values, labels, domain=str(view), path=path)


def test_features(cache: FeatureCache, task: tasks_lib.Task
              ) -> tuple[features_lib.FeatureSet, np.ndarray | None]:
  """The task's test views' features, concatenated, with labels in the train set's classes;
  and the train class of each test class for a logit-subset task (tasks.label_map)."""
  parts = [cache.get(v) for v in task.test]
  labels = np.concatenate([p.labels for p in parts])
  label_map = tasks_lib.label_map(cache.infos[task.train.dataset],
                                  cache.infos[task.test[0].dataset], task)
  if label_map is not None:
    labels = label_map[labels]
  test_set = features_lib.FeatureSet(np.concatenate([p.features for p in parts]), labels,
                                     domain="+".join(str(v) for v in task.test))
  return test_set, label_map


def format_md(rows: list[dict[str, Any]], methods: list[str], header: str) -> str:
  """results.md: averages by kind and method, then one row per task."""
  lines = [f"# Transfer results\n\n{header}\n", "| method | ID avg | OOD avg |", "|---|---|---|"]
  for method in methods:
    cells = []
    for kind in tasks_lib.KINDS:
      accs = [r["accuracy"] for r in rows if r["method"] == method and r["kind"] == kind]
      cells.append(f"{100 * np.mean(accs):.2f}" if accs else "-")
    lines.append(f"| {method} | {' | '.join(cells)} |")
  lines += ["", "| task | kind | " + " | ".join(methods) + " | SVE | LSVR | train | test |",
            "|---|---|" + "---|" * (len(methods) + 4)]
  for name in dict.fromkeys(r["task"] for r in rows):
    task_rows = {r["method"]: r for r in rows if r["task"] == name}
    first = next(iter(task_rows.values()))
    accs = [f"{100 * task_rows[m]['accuracy']:.2f}" if m in task_rows else "-" for m in methods]
    lines.append(f"| {name} | {first['kind']} | {' | '.join(accs)} | {first['sve']:.4f} |"
                 f" {first['lsvr']:.4f} | {first['num_train']} | {first['num_test']} |")
  return "\n".join(lines) + "\n"


def _plot_spectra(spectra: dict[str, dict[str, Any]], kinds: dict[str, str], path: str,
                  title: str) -> None:
  """spectra.png: sigma_k / sum(sigma) of every task's test features (ID solid, OOD dashed)."""
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  for name, values in spectra.items():
    # Row centering removes one direction exactly: its ~0 value would flatten the plot.
    p = values["spectrum"][values["spectrum"] > 1e-6 * values["spectrum"][0]]
    ax.semilogy(np.arange(1, len(p) + 1), p, "-" if kinds[name] == "id" else "--",
                label=f"{name} (SVE {values['sve']:.2f}, LSVR {values['lsvr']:.3f})")
  ax.set_xlabel("k")
  ax.set_ylabel("sigma_k / sum(sigma)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  plots.save(fig, path)


def write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  chosen = validate(config)
  methods = parse_list(config, "methods", METHODS)
  parallel.maybe_initialize_distributed(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  data_dir = config.data_dir or None
  enc = encoder_lib.load(config.checkpoint, step=config.step, mesh=mesh, data_dir=data_dir)
  workdir = prepare_workdir(workdir)
  cache = FeatureCache(enc, workdir, batch_size=config.batch_size,
                       max_examples=config.max_examples, data_dir=data_dir, mesh=mesh)
  center = None if config.spectral_center == "none" else config.spectral_center
  pre = enc.config
  print(f"[transfer] {pre.model} from {enc.workdir} (step {enc.step}; pre-trained on"
        f" {pre.dataset} with {pre.get('noise_type', 'symmetric')} noise"
        f" {pre.get('noise_ratio')}): {len(chosen)} task(s) x {', '.join(methods)}", flush=True)

  rows: list[dict[str, Any]] = []
  spectra: dict[str, dict[str, Any]] = {}
  start = time.perf_counter()
  for done, task in enumerate(chosen):
    task_start = time.perf_counter()
    train_set = cache.get(task.train)
    test_set, label_map = test_features(cache, task)
    num_classes = cache.infos[task.train.dataset].num_classes
    spectra[task.name] = spectral.metrics(test_set.features, center=center,
                                          top_k=_SPECTRUM_TOP_K)
    sve, lsvr = spectra[task.name]["sve"], spectra[task.name]["lsvr"]
    for method in methods:
      probe_config = ml_collections.ConfigDict(config.probe.to_dict())
      probe_config.num_classes = num_classes
      if label_map is not None:
        probe_config.logit_subset = tuple(int(c) for c in label_map)
      result = _PROBES[method](train_set, test_set, probe_config)
      rows.append({
          "task": task.name, "kind": task.kind, "method": method,
          "accuracy": float(result["accuracy"]), "sve": float(sve), "lsvr": float(lsvr),
          "num_train": train_set.num_examples, "num_test": test_set.num_examples,
          "feature_dim": train_set.feature_dim, "num_classes": num_classes,
          "train": str(task.train), "test": test_set.domain,
          "checkpoint": enc.workdir, "step": enc.step, "model": pre.model,
          "pretrain_dataset": pre.dataset, "noise_ratio": pre.get("noise_ratio"),
          "noise_type": pre.get("noise_type"), "seconds": float(result["seconds"]),
          **({"lambda": float(result["lambda"])} if "lambda" in result else {}),
      })
    elapsed = time.perf_counter() - start
    eta = elapsed / (done + 1) * (len(chosen) - done - 1)
    scores = " ".join(f"{r['method']} {r['accuracy']:.4f}" for r in rows[-len(methods):])
    print(f"[transfer] task {done + 1}/{len(chosen)} {task.name} ({task.kind}): {scores} |"
          f" SVE {sve:.4f} LSVR {lsvr:.4f} | {train_set.num_examples}/{test_set.num_examples}"
          f" examples | {format_seconds(time.perf_counter() - task_start)} | elapsed"
          f" {format_seconds(elapsed)} | ETA {format_seconds(eta)}", flush=True)

  if jax.process_index() == 0:
    write_atomic(os.path.join(workdir, "results.jsonl"),
                  "".join(json.dumps(r) + "\n" for r in rows))
    header = (f"Encoder: {pre.model} pre-trained on {pre.dataset}, noise"
              f" {pre.get('noise_type', 'symmetric')} {pre.get('noise_ratio')}, checkpoint"
              f" {enc.workdir} step {enc.step}. Accuracy in %, SVE/LSVR of the test features"
              f" (centering: {config.spectral_center}).")
    table = format_md(rows, methods, header)
    write_atomic(os.path.join(workdir, "results.md"), table)
    _plot_spectra(spectra, {t.name: t.kind for t in chosen}, os.path.join(workdir, "spectra.png"),
                  f"{pre.model}, {pre.dataset}, noise {pre.get('noise_ratio')}, step {enc.step}")
    print(table, flush=True)
  print(f"[transfer] done in {format_seconds(time.perf_counter() - start)}; results in"
        f" {os.path.join(workdir, 'results.jsonl')}, results.md and spectra.png", flush=True)
  return {"rows": rows, "features_extracted": cache.extracted}
