"""The one evaluation path: checkpoint -> frozen encoder -> cached features per dataset split ->
methods -> one row per (task, method).

Methods are plug-ins in METHODS, each `fit(train, tests, config, *, logit_subsets, log)` ->
{test name: result}: "lp" and "ridge" (nmjax.probe) train on plain features; "mlp", "nmtune" and
"lp_aug" (nmjax.nmtune) train on plain features or augmented views; "zeroshot" (nmjax.clip) trains
nothing: a CLIP encoder's text tower scores class prompts. A task's methods are fit once
per train split and scored on the test sets of every task that trains on it (fashion_mnist and
fashion_mnist_c share one fit). The transfer and NMTune jobs (nmjax.jobs.transfer, .tuning) are
both served here: each turns its plan into a Request (tasks, methods, each method's config, the
row it writes) over an encoder's FeatureCache (nmjax.encoder); nothing here reads a job's config.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from nmjax import encoder as encoder_lib
from nmjax import features as features_lib
from nmjax import heads as heads_lib
from nmjax import io as nmjax_io
from nmjax import probe, spectral, tasks as tasks_lib
from nmjax.clip import encode as clip_encode, zeroshot
from nmjax.data import image_text, pipeline
from nmjax.errors import ConfigError, DataError
from nmjax.nmtune.fit import fit_multi, loss_weights
from nmjax.nmtune.grid import report_lines
from nmjax.nmtune.views import CachedViews, OnlineViews, cache_views
from nmjax.progress import Countdown, format_seconds

TRAIN_VIEWS = ("features", "online", "cached")
TRANSFER_METHODS = ("lp", "ridge", "zeroshot")
TUNING_METHODS = ("nmtune", "mlp", "lp_aug", "lp", "zeroshot")
CENTERS = ("row", "feature", "none")
SPECTRUM_TOP_K = 64  # Singular values per task kept by the transfer config (spectra.png).


def _with_probe_settings(result: dict[str, Any], method: str,
                         config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {**result, "method": method, "epochs": config.num_epochs,
          "batch_size": config.batch_size, "lr": config.learning_rate,
          "weight_decay": config.weight_decay, **loss_weights(0.0, 0.0, 0.0, None)}


def _probe_plugin(name: str, probe_fn: Callable[..., dict[str, Any]]) -> Callable[..., dict]:
  """A probe as a method: one probe per test set (training does not depend on the test set)."""

  def fit(train: Any, tests: Mapping[str, Any], config: ml_collections.ConfigDict, *,
          logit_subsets: Mapping[str, Any] | None = None,
          log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    del log  # The probes are one compiled program each: nothing to report per epoch.
    if isinstance(train, (OnlineViews, CachedViews)):
      raise ConfigError(f"config.method={name!r} trains on plain features; pass train features"
                        " (the 'lp_aug' method is the linear head on augmented views)")
    results = {}
    for test_name, test in tests.items():
      cfg = ml_collections.ConfigDict(config.to_dict())
      if logit_subsets and logit_subsets.get(test_name) is not None:
        cfg.logit_subset = tuple(int(c) for c in logit_subsets[test_name])
      results[test_name] = _with_probe_settings(probe_fn(train, test, cfg), name, cfg)
    return results

  return fit


def _fit_nmtune(train: Any, tests: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                logit_subsets: Mapping[str, Any] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
  return fit_multi(train, tests, config, logit_subsets=logit_subsets, log=log)


def class_names(cache: encoder_lib.FeatureCache, dataset: str) -> tuple[str, ...]:
  """What zero-shot prompts call a dataset's classes: the words of nmjax's own captions for the
  embedded sets (digits as "zero".."nine"), else the dataset's label names (TFDS's)."""
  return tuple(image_text.CLASS_NAMES.get(dataset, cache.info(dataset).class_names))


def _fit_zeroshot(train: Any, tests: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                  logit_subsets: Mapping[str, Any] | None = None,
                  log: Callable[[str], None] | None = None,
                  encoder: encoder_lib.Encoder | None = None,
                  class_names: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
  """Zero-shot: the encoder's text tower embeds class names x prompts; nothing is trained
  (`train` is unused). Needs a CLIP encoder."""
  del train, log  # Nothing is trained.
  if encoder is None or encoder.encode_text is None:
    model = "none" if encoder is None else encoder.pretraining.model
    raise ConfigError(f"method 'zeroshot' needs a CLIP encoder (a pretrain_clip workdir);"
                      f" config.checkpoint holds {model}")
  start = time.perf_counter()
  templates = zeroshot.templates_named(config.templates)
  weights = zeroshot.class_weights(
      lambda prompts: clip_encode.embed_texts(encoder, prompts), class_names, templates)
  seconds = time.perf_counter() - start
  results = {}
  for name, test in tests.items():
    subset = (logit_subsets or {}).get(name)
    result = zeroshot.accuracy(test.features, test.labels, weights, subset)
    head = heads_lib.make_head("zeroshot", {"weights": weights},
                               {"feature_dim": int(test.feature_dim), "logit_subset": subset},
                               len(class_names))
    results[name] = {**result, "method": "zeroshot", "head": head, "templates": config.templates,
                     "num_templates": len(templates), "seconds": seconds, "num_train": 0,
                     "feature_dim": int(test.feature_dim), "num_classes": len(class_names)}
  return results


_fit_zeroshot.needs_encoder = True  # _fit_split passes the encoder and the class names.

# The method registry: name -> fit(train, tests, config, *, logit_subsets, log). A fit with
# `needs_encoder` set also gets encoder= and class_names= (the train split's dataset's).
METHODS: dict[str, Callable[..., dict[str, dict[str, Any]]]] = {
    "lp": _probe_plugin("lp", probe.linear_probe),
    "ridge": _probe_plugin("ridge", probe.ridge_probe),
    "mlp": _fit_nmtune,
    "nmtune": _fit_nmtune,
    "lp_aug": _fit_nmtune,
    "zeroshot": _fit_zeroshot,
}
PROBE_METHODS = ("lp", "ridge")
PLAIN_METHODS = (*PROBE_METHODS, "zeroshot")  # Never trained on augmented views.


def _images(records: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
  """Every image (uint8 (N, H, W, C)) and label of a split, in order."""
  images, labels = [], []
  for batch in pipeline.eval_batches(records, batch_size=1024):
    images.append(batch["image"][batch["mask"]])
    labels.append(batch["label"][batch["mask"]].astype(np.int64))
  return np.concatenate(images), np.concatenate(labels)


def augmented_views(cache: encoder_lib.FeatureCache, split: tasks_lib.Split, kind: str, *,
                    num_views: int, seed: int, plain: np.ndarray | None = None
                    ) -> OnlineViews | CachedViews:
  """The train split as two-view rows: "online" (encoded inside every step) or "cached"
  (num_views augmented views per image encoded once, kept beside the split's features; never
  mirrored where the dataset's flip_ok is False).
  plain: the split's plain features, in the same order (a validation split is scored on them)."""
  enc = cache.encoder
  images, labels = _images(cache.records(split))
  if kind == "online":
    return OnlineViews(encode=enc.encode, variables=enc.variables, images=images,
                              labels=labels, feature_dim=enc.feature_dim, plain_features=plain)
  flip = bool(cache.info(split.dataset).flip_ok)  # Never mirror what a mirror changes (digits).
  path = cache.path(split, suffix=f"-aug{num_views}-seed{seed}" + ("" if flip else "-noflip"))
  if nmjax_io.exists(path):
    try:
      stored = features_lib.load(path, feature_dim=enc.feature_dim)
      return CachedViews(stored.features.reshape(num_views, len(labels), -1), labels,
                                plain_features=plain)
    except (DataError, ValueError) as e:
      print(f"[features] ignoring a bad cached views file ({e}); encoding again", flush=True)
  views = cache_views(enc.encode, enc.variables, images, labels, num_views=num_views,
                             seed=seed, batch_size=cache.batch_size, flip=flip)
  cache.extracted += 1
  if jax.process_index() == 0:
    features_lib.save(path, views.features.reshape(-1, enc.feature_dim),
                      np.tile(labels, num_views), domain=f"{split} x{num_views} augmented views")
  return CachedViews(views.features, views.labels, plain_features=plain)


def provenance(enc: encoder_lib.Encoder) -> dict[str, Any]:
  """The encoder's fields every row carries (a CLIP's noise: the caption noise)."""
  pre = enc.pretraining
  return {"checkpoint": enc.workdir, "step": enc.step, "model": pre.model,
          "pretrain_dataset": pre.dataset, "noise_ratio": pre.noise_ratio,
          "noise_type": pre.noise_type}


@dataclasses.dataclass(frozen=True)
class Fit:
  """One method's result on one task, with what its row needs."""
  task: tasks_lib.Task
  method: str
  result: dict[str, Any]
  train: features_lib.FeatureSet   # the plain train features
  test: features_lib.FeatureSet
  spectrum: dict[str, Any]         # of the frozen test features
  num_classes: int
  views: str


def probe_row(fit: Fit, enc: encoder_lib.Encoder) -> dict[str, Any]:
  """A transfer config's row."""
  result = fit.result
  return {"task": fit.task.name, "kind": fit.task.kind, "method": fit.method,
          "accuracy": float(result["accuracy"]), "sve": float(fit.spectrum["sve"]),
          "lsvr": float(fit.spectrum["lsvr"]), "num_train": fit.train.num_examples,
          "num_test": fit.test.num_examples, "feature_dim": fit.train.feature_dim,
          "num_classes": fit.num_classes, "train": str(fit.task.train), "test": fit.test.domain,
          **provenance(enc), "seconds": float(result["seconds"]),
          **({"lambda": float(result["lambda"])} if "lambda" in result else {}),
          **{k: result[k] for k in ("templates", "num_templates") if k in result}}


_TUNING_FIELDS = ("method", "accuracy", "mse_weight", "cov_weight", "svd_weight", "svd_topk",
                  "epochs", "batch_size", "lr", "weight_decay", "seconds", "num_train",
                  "num_test", "feature_dim", "num_classes", "train_accuracy", "views",
                  "mlp_ratio", "mlp_layers", "residual_scale_init", "seed",
                  "residual_scale_mean", "test_accuracy_per_epoch", "templates", "num_templates",
                  "sv_route", "val_fraction", "num_val", "val_accuracy", "grid", "grid_chosen", "grid_refit",
                  "grid_val_accuracy",
                  "grid_results", "configs_in_program")


def tuning_fields(result: dict[str, Any]) -> dict[str, Any]:
  """The settings and numbers of one fit's result that an NMTune row keeps."""
  row = {k: result[k] for k in _TUNING_FIELDS if k in result}
  if "loss_means" in result:
    row["loss_means"] = result["loss_means"]
  if "sve" in result and result.get("method") not in PROBE_METHODS:
    row["z_sve"], row["z_lsvr"] = result["sve"], result["lsvr"]
  return row


def tuning_row(fit: Fit, enc: encoder_lib.Encoder) -> dict[str, Any]:
  """An NMTune config's row (SVE/LSVR of the frozen test features; z_sve/z_lsvr of z)."""
  return {"task": fit.task.name, "kind": fit.task.kind, **tuning_fields(fit.result),
          "sve": fit.spectrum["sve"], "lsvr": fit.spectrum["lsvr"], "train": str(fit.task.train),
          "test": fit.test.domain, **provenance(enc), "views": fit.views}


@dataclasses.dataclass
class Request:
  """What to evaluate: tasks x methods, each method's config, the train rows, the spectra."""
  tasks: list[tasks_lib.Task]
  methods: list[str]
  config_of: Callable[[str, int], ml_collections.ConfigDict]   # (method, num_classes) -> config
  row: Callable[[Fit, encoder_lib.Encoder], dict[str, Any]]
  views: str = "features"           # the NMTune methods' train rows (TRAIN_VIEWS)
  num_views: int = 4                # views="cached"
  seed: int = 0                     # views="cached": the augmentation draws
  spectral_center: str | None = "row"
  spectrum_top_k: int | None = None
  prefix: str = "[evaluate]"


def _spectrum(request: Request, test: features_lib.FeatureSet) -> dict[str, Any]:
  kwargs = {} if request.spectrum_top_k is None else {"top_k": request.spectrum_top_k}
  metrics = spectral.metrics(test.features, center=request.spectral_center, **kwargs)
  return {**metrics, "spectrum": [float(v) for v in metrics["spectrum"]]}


@dataclasses.dataclass
class Evaluation:
  rows: list[dict[str, Any]]
  spectra: dict[str, dict[str, Any]]   # task -> SVE, LSVR, spectrum of its frozen test features
  features_extracted: int
  # "task|method" -> that fit's per-example hits on the task's test set (paired statistics)
  correct: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # "task|method" -> that fit's fitted nmjax.heads.Head (what a job saves)
  heads: dict[str, heads_lib.Head] = dataclasses.field(default_factory=dict)


def _fit_split(cache: encoder_lib.FeatureCache, request: Request, split: tasks_lib.Split,
               group: list[tasks_lib.Task], spectra: dict[str, dict[str, Any]],
               countdown: Countdown, correct: dict[str, np.ndarray],
               heads: dict[str, heads_lib.Head]) -> list[dict[str, Any]]:
  """Every method fit once on `split`, scored on the test sets of the tasks in `group`."""
  plain = cache.get(split)
  tests, subsets = {}, {}
  for task in group:
    tests[task.name], label_map = cache.test_set(task)
    subsets[task.name] = None if label_map is None else tuple(int(c) for c in label_map)
    spectra[task.name] = _spectrum(request, tests[task.name])
  num_classes = cache.info(split.dataset).num_classes
  rows, augmented = [], None
  for method in request.methods:
    start = time.perf_counter()
    train, views = plain, "features"
    if method not in PLAIN_METHODS and request.views != "features":
      if augmented is None:
        augmented = augmented_views(cache, split, request.views, num_views=request.num_views,
                                    seed=request.seed, plain=plain.features)
      train, views = augmented, request.views
    log = (lambda line, m=method: print(f"{request.prefix}   {m} {line}", flush=True)
           ) if views == "online" else None
    fit = METHODS[method]
    context = ({"encoder": cache.encoder, "class_names": class_names(cache, split.dataset)}
               if getattr(fit, "needs_encoder", False) else {})
    results = fit(train, tests, request.config_of(method, num_classes), logit_subsets=subsets,
                  log=log, **context)
    for task in group:
      if results[task.name].get("correct") is not None:
        correct[f"{task.name}|{method}"] = np.asarray(results[task.name]["correct"], bool)
      if results[task.name].get("head") is not None:
        heads[f"{task.name}|{method}"] = results[task.name]["head"]
      rows.append(request.row(Fit(task, method, results[task.name], plain, tests[task.name],
                                  spectra[task.name], num_classes, views), cache.encoder))
    countdown.done()
    for line in report_lines({t.name: results[t.name] for t in group}):
      print(f"{request.prefix}   {method} {line}", flush=True)
    scores = " ".join(f"{t.name} {results[t.name]['accuracy']:.4f}" for t in group)
    print(f"{request.prefix} fit {countdown.finished}/{countdown.total} {method} on {split}:"
          f" {scores} | {format_seconds(time.perf_counter() - start)} | {countdown.line()}",
          flush=True)
  return rows


def check_tasks(cache: encoder_lib.FeatureCache, tasks: Sequence[tasks_lib.Task],
                views: str = "features") -> None:
  """Before any features are extracted: that the encoder reads the tasks' examples (a text
  encoder text tasks, an image encoder image tasks) and that a text encoder's features train on
  one view (views "features"); then every text split is read, so a bad line of a text file
  fails here.

  Raises:
    ConfigError, DataError: one line naming the task, the field or the file.
  """
  enc = cache.encoder
  modality = "image" if enc.text is None else "text"
  for task in tasks:
    if task.modality != modality:
      raise ConfigError(f"task {task.name} is a {task.modality} task but config.checkpoint="
                        f"{enc.workdir} holds {enc.pretraining.model}, a {modality} encoder;"
                        f" pass {modality} tasks (docs/text.md lists the text tasks)")
  if enc.text is None:
    return
  if views != "features":
    raise ConfigError(f"config.views={views!r} is for image encoders (augmented views); a text"
                      " encoder's features train on one view: allowed: features")
  for task in tasks:
    for split in (task.train, *task.test):
      cache.text_split(split)


def run(cache: encoder_lib.FeatureCache, request: Request) -> Evaluation:
  """Every method of the request on every task: one fit per (train split, method)."""
  check_tasks(cache, request.tasks, request.views)
  groups: dict[tasks_lib.Split, list[tasks_lib.Task]] = {}
  for task in request.tasks:
    groups.setdefault(task.train, []).append(task)
  print(f"{request.prefix} {cache.encoder.describe()}: {len(request.tasks)} task(s) on"
        f" {len(groups)} train split(s) x {', '.join(request.methods)} (views: {request.views})",
        flush=True)
  rows: list[dict[str, Any]] = []
  spectra: dict[str, dict[str, Any]] = {}
  correct: dict[str, np.ndarray] = {}
  heads: dict[str, heads_lib.Head] = {}
  countdown = Countdown(len(groups) * len(request.methods))
  for split, group in groups.items():
    rows += _fit_split(cache, request, split, group, spectra, countdown, correct, heads)
  order = {t.name: i for i, t in enumerate(request.tasks)}
  rows.sort(key=lambda r: (order[r["task"]], request.methods.index(r["method"])))
  return Evaluation(rows, {t.name: spectra[t.name] for t in request.tasks}, cache.extracted,
                    correct, heads)


def kind_averages(rows: list[dict[str, Any]], method: str) -> dict[str, float]:
  """{kind: mean accuracy of `method` over the rows' tasks of that kind (nmjax.tasks.KINDS)}."""
  return {kind: float(np.mean(a)) for kind in tasks_lib.KINDS
          if (a := [r["accuracy"] for r in rows if r["method"] == method and r["kind"] == kind])}


def averages_line(rows: list[dict[str, Any]], methods: list[str]) -> str:
  """'ID lp 82.74 mlp 91.57 | OOD ...': each method's average accuracy (%) per kind."""
  parts = []
  for kind in tasks_lib.KINDS:
    cells = [(m, kind_averages(rows, m).get(kind)) for m in methods]
    if any(v is not None for _, v in cells):
      parts.append(f"{tasks_lib.KIND_LABELS[kind]} " + " ".join(
          f"{m} {100 * v:.2f}" for m, v in cells if v is not None))
  return " | ".join(parts)
