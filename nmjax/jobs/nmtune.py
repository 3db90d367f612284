"""The NMTune job: lp / mlp / nmtune (and the lp_aug control) over frozen features.

Two modes, chosen by the config:
  * features files (config.train_features and config.test_features set): the black-box mode.
    Every method in config.method is fit on the train file and scored on the test file; one JSON
    line per method is appended to DIR/results.jsonl (earlier runs' lines are kept).
  * a pre-training checkpoint (config.checkpoint) and tasks from nmjax.tasks: the encoder's plain
    features of every view are extracted once and cached (as by the transfer job); then for
    each train view, every method is fit once and scored on the test sets of every task that
    trains on that view (fashion_mnist and fashion_mnist_c share one fit). config.views picks
    the rows the MLP methods train on: "features" (plain features, one view per image),
    "online" (the reference data flow: two augmented views per image through the frozen encoder
    inside every step) or "cached" (config.cached_views augmented views per image, encoded once
    and cached). Writes DIR/results.jsonl (one line per task and method, rewritten),
    DIR/results.md (ID and OOD averages per method and a per-task table) and DIR/curves.png
    (test accuracy per epoch of every method, one panel per task).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from nmjax import features as features_lib
from nmjax import nmtune, parallel, plots, spectral, tasks as tasks_lib
from nmjax.config import check_choice, check_range
from nmjax.data import pipeline
from nmjax.errors import ConfigError, DataError
from nmjax.jobs import encoder as encoder_lib
from nmjax.jobs import prepare_workdir
from nmjax.jobs import transfer
from nmjax.progress import format_seconds

VIEWS = ("features", "online", "cached")


def fit_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """The nmjax.nmtune config of one method, from the job config's NMTune fields."""
  fields = {k: config[k] for k in nmtune.default_config().keys() if k in config}
  fields["lp"] = config.lp.to_dict()
  fields["method"] = method
  return nmtune.resolve_config(ml_collections.ConfigDict(fields))


def validate(config: ml_collections.ConfigDict) -> tuple[list[str], list[tasks_lib.Task]]:
  """Checks the whole config before any work; returns (methods, tasks) (tasks empty in the
  features-file mode)."""
  methods = transfer.parse_list(config, "method", nmtune.METHODS)
  for method in methods:
    fit_config(config, method)
  by_files = bool(config.train_features or config.test_features)
  if by_files:
    if not (config.train_features and config.test_features):
      raise ConfigError("config.train_features and config.test_features go together; pass both"
                        " features files (.npz)")
    if config.checkpoint:
      raise ConfigError("pass either features files (config.train_features/test_features) or"
                        " config.checkpoint, not both")
    return methods, []
  if not config.checkpoint:
    raise ConfigError("nothing to tune: pass --config.train_features=TRAIN.npz"
                      " --config.test_features=TEST.npz, or --config.checkpoint=PRETRAIN_DIR")
  check_choice(config, "views", VIEWS)
  check_range(config, "cached_views", low=2, integer=True)
  check_range(config, "extract_batch_size", low=1, integer=True)
  check_range(config, "max_examples", integer=True)
  check_range(config, "step", integer=True)
  return methods, tasks_lib.resolve(config.tasks)


def _row_settings(result: dict[str, Any]) -> dict[str, Any]:
  keep = ("method", "accuracy", "mse_weight", "cov_weight", "svd_weight", "svd_topk", "epochs",
          "batch_size", "lr", "weight_decay", "seconds", "num_train", "num_test", "feature_dim",
          "num_classes", "train_accuracy", "views", "mlp_ratio", "mlp_layers",
          "residual_scale_init", "seed", "residual_scale_mean", "test_accuracy_per_epoch")
  row = {k: result[k] for k in keep if k in result}
  if "loss_means" in result:
    row["loss_means"] = result["loss_means"]
  if "sve" in result and result.get("method") != "lp":
    row["z_sve"], row["z_lsvr"] = result["sve"], result["lsvr"]
  return row


def _run_files(config: ml_collections.ConfigDict, methods: list[str], workdir: str) -> dict:
  """Features-file mode: one appended JSON line per method."""
  path = os.path.join(workdir, "results.jsonl")
  train = features_lib.load(config.train_features)
  test = features_lib.load(config.test_features)
  rows = []
  for method in methods:
    result = nmtune.fit(train, test, fit_config(config, method))
    row = {**_row_settings(result), "train_features": os.path.abspath(config.train_features),
           "test_features": os.path.abspath(config.test_features)}
    rows.append(row)
    if jax.process_index() == 0:
      with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"[nmtune] {method}: accuracy {row['accuracy']:.4f} | {row['num_train']} train,"
          f" {row['num_test']} test, D={row['feature_dim']}, C={row['num_classes']} |"
          f" {format_seconds(row['seconds'])}", flush=True)
  print(f"[nmtune] appended {len(rows)} line(s) to {path}", flush=True)
  return {"rows": rows}


def _images(records) -> tuple[np.ndarray, np.ndarray]:
  """Every image (uint8 (N, H, W, C)) and label of a view, in order."""
  images, labels = [], []
  for batch in pipeline.eval_batches(records, batch_size=1024):
    images.append(batch["image"][batch["mask"]])
    labels.append(batch["label"][batch["mask"]].astype(np.int64))
  return np.concatenate(images), np.concatenate(labels)


def _train_views(config: ml_collections.ConfigDict, cache: transfer.FeatureCache,
                 view: tasks_lib.View, plain: features_lib.FeatureSet) -> Any:
  """What the MLP methods train on for config.views (plain features, or augmented views)."""
  if config.views == "features":
    return plain
  enc = cache.encoder
  records, _ = tasks_lib.view_records(view, image_shape=enc.image_shape, data_dir=cache.data_dir)
  records = transfer.evenly_spaced(records, config.max_examples)
  images, labels = _images(records)
  if config.views == "online":
    return nmtune.OnlineViews(encode=enc.features, variables=enc.variables, images=images,
                              labels=labels, feature_dim=enc.feature_dim)
  path = cache.path(view).replace(".npz", f"-aug{config.cached_views}-seed{config.seed}.npz")
  if os.path.exists(path):
    try:
      stored = features_lib.load(path, feature_dim=enc.feature_dim)
      features = stored.features.reshape(config.cached_views, len(labels), -1)
      return nmtune.CachedViews(features, labels)
    except (DataError, ValueError) as e:
      print(f"[nmtune] ignoring a bad cached views file ({e}); encoding again", flush=True)
  views = nmtune.cache_views(enc.features, enc.variables, images, labels,
                             num_views=config.cached_views, seed=config.seed,
                             batch_size=config.extract_batch_size)
  cache.extracted += 1
  if jax.process_index() == 0:
    features_lib.save(path, views.features.reshape(-1, enc.feature_dim),
                      np.tile(labels, config.cached_views), domain=f"{view} x{config.cached_views}"
                      " augmented views")
  return views


def _plot_curves(rows: list[dict[str, Any]], path: str, title: str) -> None:
  """curves.png: test accuracy per epoch of every method, one panel per task."""
  plt = plots.pyplot()
  names = list(dict.fromkeys(r["task"] for r in rows))
  columns = min(3, len(names))
  lines = -(-len(names) // columns)
  fig, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 2.6 * lines), dpi=100,
                           squeeze=False)
  for ax, name in zip(axes.flat, names):
    for row in rows:
      if row["task"] == name and row.get("test_accuracy_per_epoch"):
        curve = 100 * np.asarray(row["test_accuracy_per_epoch"])
        ax.plot(np.arange(1, len(curve) + 1), curve, label=row["method"],
                linestyle="--" if row["method"].startswith("lp") else "-")
    kind = next(r["kind"] for r in rows if r["task"] == name)
    plots.label_axes(ax, title=f"{name} ({kind.upper()})", xlabel="epoch",
                     ylabel="test accuracy (%)", legend_fontsize=None)
  for ax in axes.flat[len(names):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  plots.save(fig, path)


def run_checkpoint(config: ml_collections.ConfigDict, methods: list[str],
                   chosen: list[tasks_lib.Task], workdir: str, *, echo: bool = True) -> dict:
  """Checkpoint mode (the module docstring); returns {"rows", "spectra" (task -> SVE, LSVR and
  the spectrum of its frozen test features), "features_extracted"}. `echo=False` keeps the
  results table off the terminal (the study prints its own)."""
  parallel.maybe_initialize_distributed(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.extract_batch_size, mesh)
  data_dir = config.data_dir or None
  enc = encoder_lib.load(config.checkpoint, step=config.step, mesh=mesh, data_dir=data_dir)
  cache = transfer.FeatureCache(enc, workdir, batch_size=config.extract_batch_size,
                                max_examples=config.max_examples, data_dir=data_dir, mesh=mesh)
  pre = enc.config
  groups: dict[tasks_lib.View, list[tasks_lib.Task]] = {}
  for task in chosen:
    groups.setdefault(task.train, []).append(task)
  print(f"[nmtune] {pre.model} from {enc.workdir} (step {enc.step}; pre-trained on {pre.dataset}"
        f" with {pre.get('noise_type', 'symmetric')} noise {pre.get('noise_ratio')}):"
        f" {len(chosen)} task(s) on {len(groups)} train view(s) x {', '.join(methods)}"
        f" (views: {config.views})", flush=True)

  rows: list[dict[str, Any]] = []
  spectra: dict[str, dict[str, Any]] = {}  # Task -> SVE, LSVR, spectrum of its test features.
  start = time.perf_counter()
  fits_done, num_fits = 0, len(groups) * len(methods)
  for view, group in groups.items():
    plain = cache.get(view)
    tests, subsets = {}, {}
    for task in group:
      tests[task.name], label_map = transfer.test_features(cache, task)
      subsets[task.name] = None if label_map is None else tuple(int(c) for c in label_map)
      metrics = spectral.metrics(tests[task.name].features)
      spectra[task.name] = {**metrics, "spectrum": [float(v) for v in metrics["spectrum"]]}
    num_classes = cache.infos[view.dataset].num_classes
    train_views = None
    for method in methods:
      fit_start = time.perf_counter()
      cfg = fit_config(config, method)
      cfg.num_classes = num_classes
      if method == "lp":
        train = plain
      else:
        if train_views is None:
          train_views = _train_views(config, cache, view, plain)
        train = train_views
      log = (lambda line, m=method: print(f"[nmtune]   {m} {line}", flush=True)
             ) if config.views == "online" else None
      results = nmtune.fit_multi(train, tests, cfg, logit_subsets=subsets, log=log)
      for task in group:
        result = results[task.name]
        rows.append({
            "task": task.name, "kind": task.kind, **_row_settings(result),
            "sve": spectra[task.name]["sve"], "lsvr": spectra[task.name]["lsvr"],
            "train": str(task.train), "test": tests[task.name].domain,
            "checkpoint": enc.workdir, "step": enc.step, "model": pre.model,
            "pretrain_dataset": pre.dataset, "noise_ratio": pre.get("noise_ratio"),
            "noise_type": pre.get("noise_type"),
            "views": "features" if method == "lp" else config.views,
        })
      fits_done += 1
      elapsed = time.perf_counter() - start
      eta = elapsed / fits_done * (num_fits - fits_done)
      scores = " ".join(f"{t.name} {results[t.name]['accuracy']:.4f}" for t in group)
      print(f"[nmtune] fit {fits_done}/{num_fits} {method} on {view}: {scores} |"
            f" {format_seconds(time.perf_counter() - fit_start)} | elapsed"
            f" {format_seconds(elapsed)} | ETA {format_seconds(eta)}", flush=True)

  order = {t.name: i for i, t in enumerate(chosen)}
  rows.sort(key=lambda r: (order[r["task"]], methods.index(r["method"])))
  if jax.process_index() == 0:
    transfer.write_atomic(os.path.join(workdir, "results.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in rows))
    header = (f"Encoder: {pre.model} pre-trained on {pre.dataset}, noise"
              f" {pre.get('noise_type', 'symmetric')} {pre.get('noise_ratio')}, checkpoint"
              f" {enc.workdir} step {enc.step}. Accuracy in %; MLP methods trained on"
              f" {config.views} views, {config.epochs} epochs; SVE/LSVR of the frozen test"
              " features (row centering).")
    table = transfer.format_md(rows, methods, header).replace("# Transfer results",
                                                               "# NMTune results")
    transfer.write_atomic(os.path.join(workdir, "results.md"), table)
    _plot_curves(rows, os.path.join(workdir, "curves.png"),
                 f"{pre.model}, {pre.dataset}, noise {pre.get('noise_ratio')}, {config.views}"
                 " views")
    if echo:
      print(table, flush=True)
  print(f"[nmtune] done in {format_seconds(time.perf_counter() - start)}; results in"
        f" {os.path.join(workdir, 'results.jsonl')}, results.md and curves.png", flush=True)
  return {"rows": rows, "spectra": {t.name: spectra[t.name] for t in chosen},
          "features_extracted": cache.extracted}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  methods, chosen = validate(config)
  workdir = prepare_workdir(workdir)
  if not chosen:
    return _run_files(config, methods, workdir)
  return run_checkpoint(config, methods, chosen, workdir)
