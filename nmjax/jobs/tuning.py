"""The NMTune job, configs/nmtune.py: lp, mlp, nmtune, lp_aug and zero-shot over frozen features,
from features files (black-box mode: one results.jsonl line per method, heads/<method>/) or over a
checkpoint's tasks with plain or augmented train views (results.jsonl, results.md, curves.png,
heads/<task>/<method>/). Each fitted head is saved with head.save (nmjax.heads.load reads it).
A text encoder's checkpoint (configs/text_transfer.py) runs on text tasks, on one view.

The plan keeps the NMTune fit's fields (epochs, the loss weights, seed, ...) and the checkpoint as
its own top-level fields, and each method's fit config is built from them at run time
(method_config), so a sweep validates one config and runs many plans made with
dataclasses.replace(plan, checkpoint=..., seed=..., svd_weight=...).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np

from nmjax import encoder as encoder_lib, evaluate, features as features_lib, parallel
from nmjax import io as nmjax_io, tasks as tasks_lib
from nmjax.config import check_choice, check_range, parse_names
from nmjax.errors import ConfigError, DataError
from nmjax.jobs import fit_checks, plans, tables
from nmjax.jobs.pretrain_fields import check_distributed
from nmjax.jobs.text_fields import check_text_fields
from nmjax.jobs.workdir import prepare_workdir, process_index
from nmjax.nmtune.fit import default_config, probe_config, resolve_config
from nmjax.nmtune.grid import report_lines
from nmjax.progress import format_seconds

NAME = "nmtune"
"""The job's name: config.job's value and its key in nmjax.jobs.JOBS."""
MODES = ("files", "checkpoint")  # features files (black-box) | a checkpoint's tasks


@dataclasses.dataclass(frozen=True)
class TuningPlan:
  """An NMTune evaluation, resolved (configs/nmtune.py; the study's evaluation and tune stages).

  mode "files" reads train_features and test_features; mode "checkpoint" reads checkpoint, step
  and tasks (registry names, and those text_files declares); a text encoder's checkpoint (a
  Hugging Face folder or an import workdir of one) also pooling and max_length. The NMTune fit's
  fields default to nmjax.nmtune.default_config's (lp: the linear probe's, a plain dict); the
  other fields are the config's, one for one.
  """
  methods: tuple[str, ...]
  mode: str                          # MODES
  train_features: str = ""
  test_features: str = ""
  checkpoint: str = ""
  step: int = -1
  tasks: tuple[str, ...] = ()
  data_dir: str = ""
  views: str = "features"            # evaluate.TRAIN_VIEWS: the NMTune methods' train rows
  cached_views: int = 4              # views="cached": augmented views per train image
  extract_batch_size: int = 512
  max_examples: int = -1
  zeroshot_templates: str = "imagenet"
  pooling: str = ""                  # text encoders: "" (the model's) | cls | mean | last
  max_length: int = 128              # text encoders: tokens per example
  text_files: tuple[tasks_lib.FileTask, ...] = ()   # text sets given as files (config.text_files)
  epochs: int = 30
  batch_size: int = 128
  lr: float = 1e-3
  weight_decay: float = 1e-4
  mse_weight: float = 1.0
  cov_weight: float = 0.04
  svd_weight: float = 0.001
  svd_topk: int = 5
  mlp_ratio: float = 4.0
  mlp_layers: int = 1
  residual_scale_init: float = 1.0
  val_fraction: float = 0.0
  grid: str = ""
  grid_refit: bool = True
  seed: int = 0
  num_classes: int | None = None
  logit_subset: tuple[int, ...] | None = None
  lp: dict[str, Any] = dataclasses.field(default_factory=dict)
  distributed: str = "none"
  coordinator_address: str = ""
  num_processes: int = 1
  process_id: int = 0


def _methods(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.methods, or the older config.method (an alias, with a one-line note) when set."""
  field = "methods"
  if config.method:
    given = str(config.method).replace("+", ",")
    print(f"note: config.method is deprecated; read as config.methods={given} (use methods)",
          file=sys.stderr, flush=True)
    field = "method"
  return tuple(parse_names(config, field, evaluate.TUNING_METHODS))


def _check_mode(config: ml_collections.ConfigDict) -> str:
  """Features files or a checkpoint, with the checkpoint mode's fields checked."""
  if config.train_features or config.test_features:
    if not (config.train_features and config.test_features):
      raise ConfigError("config.train_features and config.test_features go together; pass both"
                        " features files (.npz)")
    if config.checkpoint:
      raise ConfigError("pass either features files (config.train_features/test_features) or"
                        " config.checkpoint, not both")
    return "files"
  if not config.checkpoint:
    raise ConfigError("nothing to tune: pass --config.train_features=TRAIN.npz"
                      " --config.test_features=TEST.npz, or --config.checkpoint=PRETRAIN_DIR")
  check_choice(config, "views", evaluate.TRAIN_VIEWS)
  check_range(config, "cached_views", low=2, integer=True)
  check_range(config, "extract_batch_size", low=1, integer=True)
  check_range(config, "max_examples", integer=True)
  check_range(config, "step", integer=True)
  check_distributed(config)
  return "checkpoint"


def validate(config: ml_collections.ConfigDict) -> TuningPlan:
  """Checks every field of an NMTune config once, every method's fit config included.

  Args:
    config: a complete NMTune config (configs/nmtune.py).

  Returns:
    The run's TuningPlan.

  Raises:
    ConfigError: with one line naming the field and the allowed values.
  """
  methods = _methods(config)
  text = check_text_fields(config)
  plan = plans.from_config(TuningPlan, config, job=NAME, ignore=("method",), methods=methods,
                           mode="files", tasks=(), **text)
  for method in methods:
    method_config(plan, method)
  mode = _check_mode(config)
  if mode == "checkpoint":
    plan = dataclasses.replace(plan, mode=mode,
                               tasks=tasks_lib.names(config.tasks, text["text_files"]))
  check_fits(plan)
  return plan


def check_fits(plan: TuningPlan) -> None:
  """What the plan alone decides about its fits (nmjax.jobs.fit_checks.check_batches), and
  zero-shot's prompt set and encoder, before any work.

  Args:
    plan: an nmtune plan.

  Raises:
    ConfigError: one line naming the field.
  """
  if "zeroshot" in plan.methods:
    if plan.mode == "files":
      raise ConfigError("config.methods entry 'zeroshot' needs a CLIP checkpoint's text tower"
                        " (config.checkpoint of a pretrain_clip workdir); features files have"
                        " none")
    fit_checks.check_templates(plan.zeroshot_templates)
  fit_checks.check_batches(nmtune_configs(plan), two_view=two_view(plan))


def two_view(plan: TuningPlan) -> bool:
  """Whether the plan's NMTune methods train on two augmented views per image."""
  return plan.mode == "checkpoint" and plan.views != "features"


def nmtune_configs(plan: TuningPlan, num_classes: int | None = None
                   ) -> dict[str, ml_collections.ConfigDict]:
  """The fit config of each of the plan's methods that nmjax.nmtune trains."""
  return {m: method_config(plan, m, num_classes) for m in plan.methods
          if m in fit_checks.NMTUNE_METHODS}


def check_tasks(plan: TuningPlan, cache: encoder_lib.FeatureCache) -> None:
  """The checkpoint mode's checks that need the encoder and the tasks' train labels (read
  without encoding), before the first fit.

  Raises:
    ConfigError, DataError: one line naming the field and the task.
  """
  tasks = tasks_lib.resolve(plan.tasks, plan.text_files)
  text_splits = {t.train for t in tasks if t.modality == "text"}
  # Text tasks: the encoder must read text, and every text file is read now (evaluate.run checks
  # the tasks of an image encoder too).
  if text_splits:
    evaluate.check_tasks(cache, tasks, plan.views)
  if "zeroshot" in plan.methods and cache.encoder.encode_text is None:
    raise ConfigError(f"config.methods entry 'zeroshot' needs a CLIP encoder (a pretrain_clip"
                      f" workdir); config.checkpoint holds {cache.encoder.pretraining.model}")
  for split, where in fit_checks.train_splits(tasks).items():
    labels = _cached_labels(cache.path(split))
    if labels is None and split in text_splits:  # A text split's, read without tokenizing.
      labels = cache.text_split(split).labels
    elif labels is None:  # Not extracted yet: the dataset's labels, read without the images.
      labels = fit_checks.split_labels(split, data_dir=cache.data_dir or "",
                                       max_examples=cache.max_examples)
    fit_checks.check_data(nmtune_configs(plan, cache.info(split.dataset).num_classes), labels,
                          cache.encoder.feature_dim, two_view=two_view(plan), where=where)


def lock_index(plan: TuningPlan) -> int:
  """The index of this process's lock file (nmjax.io.lock_path) in the workdir.

  Args:
    plan: the run's plan.

  Returns:
    The process's index among the job's processes (explicit or auto mode), else 0.
  """
  return process_index(plan)


def nmtune_config(plan: TuningPlan, method: str) -> ml_collections.ConfigDict:
  """The nmjax.nmtune config of one NMTune method (nmtune, mlp, lp_aug), from the plan's fields;
  checked (nmjax.nmtune.resolve_config)."""
  fields = {k: getattr(plan, k) for k in default_config().keys() if k not in ("method", "lp")}
  return resolve_config({**fields, "lp": dict(plan.lp), "method": method})


def method_config(plan: TuningPlan, method: str,
                  num_classes: int | None = None) -> ml_collections.ConfigDict:
  """What evaluate.METHODS[method] takes: an NMTune method's config, the linear probe's (config.lp
  with the plan's seed and classes) or zero-shot's templates, with `num_classes` set."""
  if method == "zeroshot":
    config = ml_collections.ConfigDict({"templates": plan.zeroshot_templates})
  elif method in evaluate.PROBE_METHODS:
    config = probe_config(nmtune_config(plan, "nmtune"))
  else:
    config = nmtune_config(plan, method)
  config.num_classes = num_classes
  return config


def _cached_labels(path: str) -> np.ndarray | None:
  """The labels array of a cached features file, read alone; None when there is none to read
  (the cache then extracts the split, or extracts it again)."""
  try:
    with nmjax_io.open(path, "rb") as f, np.load(f) as contents:
      return np.asarray(contents["labels"]).reshape(-1)
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
    return None


def open_cache(plan: TuningPlan, workdir: str) -> encoder_lib.FeatureCache:
  """The checkpoint's encoder and its feature cache (processes started where the plan asks)."""
  parallel.maybe_initialize_distributed(plan)
  return encoder_lib.open_cache(plan.checkpoint, workdir, step=plan.step,
                                batch_size=plan.extract_batch_size,
                                batch_field="extract_batch_size", max_examples=plan.max_examples,
                                data_dir=plan.data_dir, pooling=plan.pooling,
                                max_length=plan.max_length,
                                file_sets=[t.files for t in plan.text_files])


def request(plan: TuningPlan, prefix: str = "[nmtune]") -> evaluate.Request:
  """The checkpoint mode's evaluation: the plan's tasks x methods (rows: evaluate.tuning_row)."""
  return evaluate.Request(tasks_lib.resolve(plan.tasks, plan.text_files), list(plan.methods),
                          functools.partial(method_config, plan), evaluate.tuning_row,
                          views=plan.views, num_views=plan.cached_views, seed=plan.seed,
                          prefix=prefix)


def evaluate_checkpoint(plan: TuningPlan, workdir: str
                        ) -> tuple[evaluate.Evaluation, str | None]:
  """The checkpoint mode without its closing lines: the evaluation, with results.jsonl,
  results.md, curves.png and heads/<task>/<method>/ written by process 0 (the markdown
  returned; None elsewhere)."""
  cache = open_cache(plan, workdir)
  check_tasks(plan, cache)
  evaluation = request(plan)
  keeper = tables.HeadKeeper(evaluation.row)
  evaluation.row = keeper
  result = evaluate.run(cache, evaluation)
  table = None
  if jax.process_index() == 0:
    tables.save_heads(keeper.heads, workdir)
    table = tables.write_tuning(result.rows, cache.encoder, plan, list(plan.methods), workdir)
  return result, table


def _load_files(plan: TuningPlan) -> tuple[features_lib.FeatureSet, features_lib.FeatureSet]:
  """The train and test features files, checked against each other before any method runs: the
  same D, and every test label a class the train file holds."""
  given = plan.num_classes
  train = features_lib.load(plan.train_features, num_classes=given)
  top = given or int(train.labels.max()) + 1
  test = features_lib.load(plan.test_features, num_classes=top,
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


_FILE_KEYS = ("method", "train_features", "test_features")  # What names a features-file row.


def _run_files(plan: TuningPlan, workdir: str) -> dict[str, Any]:
  """Features-file mode: one results.jsonl line per method (replacing an earlier run's line of
  the same method and files) and its head in heads/<method>/."""
  path = nmjax_io.join(workdir, "results.jsonl")
  train, test = _load_files(plan)
  fit_checks.check_data(nmtune_configs(plan, plan.num_classes), train.labels, train.feature_dim,
                        two_view=False, where=f"train features file {train.path}")
  rows = []
  for method in plan.methods:
    config = method_config(plan, method, plan.num_classes)
    result = evaluate.METHODS[method](train, {"test": test}, config)["test"]
    row = {**evaluate.tuning_fields(result),
           "train_features": nmjax_io.absolute(plan.train_features),
           "test_features": nmjax_io.absolute(plan.test_features)}
    rows.append(row)
    if jax.process_index() == 0:
      tables.replace_rows(path, [row], _FILE_KEYS)
      if result.get("head") is not None:
        tables.save_heads({(method,): result["head"]}, workdir)
    for line in report_lines({"test": result}):
      print(f"[nmtune] {method} {line}", flush=True)
    print(f"[nmtune] {method}: accuracy {row['accuracy']:.4f} | {row['num_train']} train,"
          f" {row['num_test']} test, D={row['feature_dim']}, C={row['num_classes']} |"
          f" {format_seconds(row['seconds'])}", flush=True)
  print(f"[nmtune] wrote {len(rows)} line(s) to {path}; heads in"
        f" {nmjax_io.join(workdir, tables.HEADS_DIR)}", flush=True)
  return {"rows": rows}


def run(plan: TuningPlan, workdir: str) -> dict[str, Any]:
  """Runs every method of the plan and writes its results in `workdir`.

  Args:
    plan: the run's plan (validate).
    workdir: where the results go (made if needed): features-file mode writes one
      results.jsonl line per method (a re-run replaces its lines) and heads/<method>/;
      checkpoint mode writes results.jsonl, results.md, curves.png and heads/<task>/<method>/.

  Returns:
    Features-file mode: {"rows"}. Checkpoint mode: {"rows", "spectra", "features_extracted" (how
    many splits were encoded; 0 when the encoder's feature cache held them all), "correct" (the
    per-example hits, "task|method" -> bool array)}.

  Raises:
    ConfigError: a checkpoint that is not a finished pre-training or import workdir, or a fit
      field the data refuses (svd_topk above D), before any method runs.
    DataError: features files or a task's dataset that are missing or malformed, or too small
      for a fit (batch_size), before any method runs.
  """
  start = time.perf_counter()
  workdir = prepare_workdir(workdir)
  if plan.mode == "files":
    return _run_files(plan, workdir)
  result, table = evaluate_checkpoint(plan, workdir)
  if table is not None:
    print(table, flush=True)
  print(f"[nmtune] done in {format_seconds(time.perf_counter() - start)}; results in"
        f" {nmjax_io.join(workdir, 'results.jsonl')}, results.md and curves.png", flush=True)
  return {"rows": result.rows, "spectra": result.spectra,
          "features_extracted": result.features_extracted, "correct": result.correct}
