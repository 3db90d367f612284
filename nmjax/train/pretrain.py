"""Supervised pre-training with label noise, as one library call: config -> source -> label noise
-> grain pipeline -> train loop. The pretrain job and the study's pre-training stages run it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from nmjax import models, noise, parallel, report
from nmjax.config import check_choice, check_range, total_steps
from nmjax.data import imagenet, pipeline, records, sources
from nmjax.errors import ConfigError
from nmjax.train import checkpoint, loop, state as state_lib, steps

# default: the in-memory image pipeline (random crop after zero padding, flip); imagenet: JPEGs
# decoded and cropped by area in grain workers (nmjax/data/imagenet.py).
INPUT_PIPELINES = ("default", "imagenet")
# What a workdir's checkpoints are of: the run (data, labels, model), and what the data stream's
# position and the optimizer state depend on. A resume that changes one is refused.
FIXED_FIELDS = ("dataset", "model", "noise_ratio", "noise_type", "seed", "max_train_examples",
                "batch_size", "optimizer", "crop_padding", "flip", "input_pipeline", "image_size",
                # CLIP pre-training (train/pretrain_clip.py): the pairs, captions and towers.
                "caption_noise", "loss", "quick_gelu", "context_length", "templates")
# Where and how verbosely a run goes, not what it computes: free to change on any resume. Every
# other field (learning rate, schedule length, weight decay, ...) is a training field: a resume
# may change it only when config.allow_changes names it, and config.json records the change.
FREE_FIELDS = ("job", "log_every_steps", "checkpoint_every_steps", "max_to_keep", "data_dir",
               "mesh", "param_sharding", "record_examples", "data_workers", "allow_changes",
               "distributed", "coordinator_address", "num_processes", "process_id")


def _check_input_pipeline(config: ml_collections.ConfigDict) -> None:
  """input_pipeline (default | imagenet) and the fields that pipeline reads."""
  choice = config.get("input_pipeline", "default")
  if choice not in INPUT_PIPELINES:
    raise ConfigError(f"config.input_pipeline={choice!r} is unknown; allowed: "
                      f"{', '.join(INPUT_PIPELINES)}")
  if choice == "default":
    check_range(config, "crop_padding", low=0, integer=True)
    return
  size = config.get("image_size")
  if isinstance(size, bool) or not isinstance(size, int) or size < 8:
    raise ConfigError(f"config.image_size={size!r} is out of range; allowed: integer >= 8")
  workers = config.get("data_workers", 0)
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
    raise ConfigError(f"config.data_workers={workers!r} is out of range; allowed: integer >= 0")
  if not isinstance(config.get("eval_split"), str) or not config.get("eval_split"):
    raise ConfigError(f"config.eval_split={config.get('eval_split')!r} must name a split "
                      f"(imagenet2012: validation)")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field before any work; raises ConfigError with one line."""
  sources.get_source(config.dataset, data_dir=config.data_dir or None)  # Lists known names.
  models.get_model(config.model, num_classes=2)
  check_range(config, "noise_ratio", low=0.0, high=1.0, high_inclusive=False)
  check_choice(config, "noise_type", noise.NOISE_TYPES)
  check_choice(config, "optimizer", state_lib.OPTIMIZERS)
  check_choice(config, "dtype", tuple(models.DTYPES))
  check_range(config, "seed", low=0, high=2**32 - 1, integer=True)
  check_range(config, "batch_size", low=1, integer=True)
  check_range(config, "eval_batch_size", low=1, integer=True)
  check_range(config, "num_epochs", low=0, low_inclusive=False)
  check_range(config, "num_train_steps", integer=True)
  check_range(config, "learning_rate", low=0, low_inclusive=False)
  check_range(config, "weight_decay", low=0)
  check_range(config, "momentum", low=0, high=1, high_inclusive=False)
  check_range(config, "warmup_epochs", low=0)
  check_range(config, "label_smoothing", low=0, high=1, high_inclusive=False)
  check_range(config, "log_every_steps", low=1, integer=True)
  check_range(config, "checkpoint_every_steps", low=1, integer=True)
  check_range(config, "max_to_keep", low=1, integer=True)
  if "eval_every_epochs" in config:
    check_range(config, "eval_every_epochs", low=0, integer=True)
  _check_input_pipeline(config)
  check_run_fields(config)


def check_run_fields(config: ml_collections.ConfigDict) -> None:
  """Where a pre-training run goes (mesh, parameter sharding, processes) and what a resume may
  change: the fields supervised and CLIP pre-training share."""
  parallel.parse_mesh(config.get("mesh", "data:-1"))
  for field, allowed in (("param_sharding", parallel.PARAM_SHARDINGS),
                         ("distributed", parallel.DISTRIBUTED_MODES)):
    if field in config:
      check_choice(config, field, allowed)
  allowed_changes(config)


def _jpeg_input(config: ml_collections.ConfigDict) -> bool:
  return config.get("input_pipeline", "default") == "imagenet"


def _prefix(examples: Sequence, n: int) -> Sequence:
  """The first `n` records (all when n <= 0): smoke runs and subsets."""
  return examples if n <= 0 or n >= len(examples) else records.SubsetRecords(examples, range(n))


def _saved_config(workdir: str, steps: list[int]) -> dict[str, Any] | None:
  """The workdir's config.json; None when there is none (or it is torn) and no checkpoint.

  Checkpoints without a readable config.json are refused: nothing says which run they are of.
  """
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
    return saved
  except FileNotFoundError:
    reason = "no config.json"
  except (OSError, ValueError) as e:
    reason = f"an unreadable config.json ({type(e).__name__}: {str(e).splitlines()[0]})"
  if not steps:
    return None
  raise ConfigError(f"--workdir={workdir} holds checkpoints (steps {', '.join(map(str, steps))})"
                    f" but {reason}, so nothing says which run they are of; pass a new"
                    " --workdir, or put that run's config.json back")


def allowed_changes(config: ml_collections.ConfigDict) -> list[str]:
  """config.allow_changes as a list of fields; each must be a training field of the config."""
  names = [n.strip() for n in str(config.get("allow_changes", "")).split(",") if n.strip()]
  for name in names:
    if name in FIXED_FIELDS:
      raise ConfigError(f"config.allow_changes entry {name!r} cannot change on a resume (the"
                        " run, its data stream or its optimizer state depend on it); use a new"
                        " --workdir")
    if name not in config:
      raise ConfigError(f"config.allow_changes entry {name!r} is not a field of this config;"
                        f" allowed: {', '.join(training_fields(config))}")
  return names


def training_fields(config: ml_collections.ConfigDict) -> list[str]:
  """The fields a resume may change only when config.allow_changes names them."""
  return [k for k in config.keys() if k not in FIXED_FIELDS + FREE_FIELDS]


def _differences(saved: dict[str, Any], current: dict[str, Any],
                 fields: Sequence[str]) -> dict[str, tuple[Any, Any]]:
  return {k: (saved.get(k), current.get(k)) for k in fields if saved.get(k) != current.get(k)}


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
  return "; ".join(f"{k}: saved {old!r} vs now {new!r}" for k, (old, new) in changes.items())


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks a resume against config.json and writes config.json (process 0).

  A checkpoint of another run (FIXED_FIELDS differ) is refused; a change of a training field is
  refused unless config.allow_changes names it, and is then appended to config.json's "history"
  ({step, time, changes: {field: {from, to}}}). Nothing is written on a refusal.
  """
  steps = sorted(checkpoint.saved_steps(workdir))  # Oldest first: the newest is steps[-1].
  saved = _saved_config(workdir, steps)
  current = json.loads(json.dumps(config.to_dict(), default=str))
  record = dict(current)
  if saved is not None and steps:
    # The current config's fields: one this nmjax no longer has cannot steer the run.
    other_run = _differences(saved, current, [k for k in current if k in FIXED_FIELDS])
    if other_run:
      raise ConfigError(f"--workdir={workdir} holds a checkpoint of a different run ("
                        f"{_listed(other_run)}); use a new --workdir")
    changes = _differences(saved, current, training_fields(config))
    allowed = allowed_changes(config)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
      raise ConfigError(
          f"--workdir={workdir} holds a checkpoint trained with other settings"
          f" ({_listed(refused)}); resume with the saved values, or pass"
          f" --config.allow_changes={','.join(refused)} to go on with the new ones (config.json"
          " records the change)")
    record["history"] = list(saved.get("history", []))
    if changes:
      record["history"].append({
          "step": steps[-1], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}})
    if not record["history"]:
      del record["history"]
  if jax.process_index() == 0 and record != saved:
    report.write_json(os.path.join(workdir, "config.json"), record)


def _split_records(config: ml_collections.ConfigDict,
                   source: sources.Source) -> tuple[Sequence, Sequence]:
  """(train, test) records, cut to max_train_examples and max_test_examples."""
  if _jpeg_input(config):
    # Encoded JPEGs, decoded and cropped to image_size in grain workers (data/imagenet.py).
    data_dir = config.data_dir or None
    train = imagenet.jpeg_records(config.dataset, "train", data_dir=data_dir)
    test = imagenet.jpeg_records(config.dataset, config.eval_split, data_dir=data_dir)
  else:
    train = source.data_source("train")
    test = source.data_source(config.get("eval_split", "test"))
  return (_prefix(train, config.max_train_examples),
          _prefix(test, config.max_test_examples))


def _input_fns(config: ml_collections.ConfigDict, info: sources.SourceInfo,
               train_records: Sequence, test_records: Sequence, noisy: np.ndarray,
               num_steps: int) -> tuple[Callable[[dict | None], Iterator], Callable[[], Iterable]]:
  """The loop's train_iterator (from a saved iterator state) and eval_batches."""
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  jpeg_input = _jpeg_input(config)

  def train_iterator(saved_state: dict | None) -> Iterator:
    if jpeg_input:
      return imagenet.train_iterator(
          train_records, labels=noisy, global_batch_size=config.batch_size, seed=config.seed,
          num_steps=num_steps, image_size=config.image_size, flip=bool(config.flip),
          num_workers=config.data_workers, start_state=saved_state, **process)
    return pipeline.train_iterator(
        train_records, labels=noisy, global_batch_size=config.batch_size, seed=config.seed,
        num_steps=num_steps, crop_padding=config.crop_padding,
        flip=bool(config.flip and info.flip_ok), start_state=saved_state, **process)

  def eval_batches() -> Iterable:
    if jpeg_input:
      return imagenet.eval_batches(test_records, batch_size=config.eval_batch_size,
                                   image_size=config.image_size,
                                   num_threads=max(1, config.data_workers), **process)
    return pipeline.eval_batches(test_records, batch_size=config.eval_batch_size, **process)

  return train_iterator, eval_batches


def _loop_spec(config: ml_collections.ConfigDict, info: sources.SourceInfo,
               input_fns: tuple[Callable, Callable], steps_per_epoch: int,
               num_steps: int) -> loop.LoopSpec:
  """The model, optimizer and schedule of the config, as the loop's spec."""
  dtype = models.DTYPES[config.dtype]
  model = models.get_model(config.model, num_classes=info.num_classes, dtype=dtype)
  schedule = state_lib.learning_rate_schedule(
      base_lr=config.learning_rate,
      warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)), total_steps=num_steps)
  tx = state_lib.make_optimizer(config, schedule)
  input_shape = ((1, config.image_size, config.image_size, 3) if _jpeg_input(config)
                 else (1, *info.image_shape))

  def init_state() -> state_lib.TrainState:
    return state_lib.create_train_state(model, jax.random.key(config.seed), input_shape, tx)

  train_iterator, eval_batches = input_fns
  return loop.LoopSpec(
      init_state=init_state, train_iterator=train_iterator, eval_batches=eval_batches,
      steps_per_epoch=steps_per_epoch, total_steps=num_steps,
      objective=steps.supervised(mean=info.mean, std=info.std, num_classes=info.num_classes,
                                 dtype=dtype, label_smoothing=config.label_smoothing),
      log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps, max_to_keep=config.max_to_keep,
      param_sharding=config.get("param_sharding", "replicated"),
      record_examples=bool(config.get("record_examples", False)),
      eval_every_epochs=config.get("eval_every_epochs", 1))


def start_run(config: ml_collections.ConfigDict, workdir: str) -> jax.sharding.Mesh:
  """A pre-training run's prologue (supervised or CLIP): processes connected, the mesh and the
  batch sizes checked, and config.json checked against the workdir and written; returns the
  mesh."""
  parallel.maybe_initialize_distributed(config)
  mesh = parallel.make_mesh(spec=config.get("mesh", "data:-1"))
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  # Before any data is read: a different run's checkpoint, or changed settings, fail at once.
  record_config(config, workdir)
  return mesh


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pre-trains (or resumes) in `workdir`, an existing writable directory (jobs make it).

  Returns the last epoch's record: step, epoch, train_loss, train_acc_noisy, train_acc_clean,
  examples_per_sec, test_acc, test_loss, test_count (plus eval_seconds), noise_rate_train (the
  fraction of the train labels used that the noise changed), num_classes, and preempted=True
  when a SIGTERM stopped the run after saving.
  """
  validate(config)
  mesh = start_run(config, workdir)

  source = sources.get_source(config.dataset, data_dir=config.data_dir or None)
  info = source.info
  train_records, test_records = _split_records(config, source)
  # The noise is drawn on the labels of the images used (exactly round(r N) of them changed).
  clean = source.labels("train")[:len(train_records)]
  noisy = noise.apply_label_noise(clean, config.noise_ratio, info.num_classes, config.seed,
                                  config.noise_type)
  steps_per_epoch, num_steps = total_steps(
      num_examples=len(train_records), global_batch_size=config.batch_size,
      num_epochs=config.num_epochs, num_train_steps=config.num_train_steps)
  input_fns = _input_fns(config, info, train_records, test_records, noisy, num_steps)
  spec = _loop_spec(config, info, input_fns, steps_per_epoch, num_steps)
  changed = float(np.mean(noisy != clean))
  if parallel.is_main_process():
    print(f"[pretrain] {config.model} on {config.dataset}: {len(train_records)} train /"
          f" {len(test_records)} test examples, noise {config.noise_type} {config.noise_ratio}"
          f" ({changed:.4f} of the train labels changed), {num_steps} steps of batch"
          f" {config.batch_size} on {mesh.devices.size} device(s) in {jax.process_count()}"
          f" process(es), workdir {workdir}", flush=True)
  result = loop.train_and_evaluate(spec, workdir, mesh=mesh)
  return {**result, "noise_rate_train": changed, "num_classes": info.num_classes}
