"""Supervised pre-training with label noise, as one library call: a plan -> source -> label
noise -> grain pipeline -> train loop. The pretrain job (nmjax/jobs/pretrain.py, which checks the
plan) runs it.

A run's fields come from a plan: any object with the attributes of the pretrain job's
PretrainPlan (dataset, model, noise_ratio, ...), read as they are; nothing here checks them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from nmjax import io as nmjax_io, models, noise, parallel
from nmjax.config import total_steps
from nmjax.data import imagenet, pipeline, records, sources
from nmjax.errors import ConfigError
from nmjax.train import checkpoint, loop, profiling, state as state_lib, steps

# default: the in-memory image pipeline (random crop after zero padding, flip); imagenet: JPEGs
# decoded and cropped by area in grain workers (nmjax/data/imagenet.py).
INPUT_PIPELINES = ("default", "imagenet")
# What a workdir's checkpoints are of: the run (data, labels, model), and what the data stream's
# position and the optimizer state depend on. A resume that changes one is refused.
FIXED_FIELDS = ("dataset", "model", "noise_ratio", "noise_type", "seed", "max_train_examples",
                "batch_size", "optimizer", "crop_padding", "flip", "input_pipeline", "image_size",
                # CLIP pre-training (train/clip_training.py): the pairs, captions and towers.
                "caption_noise", "loss", "quick_gelu", "context_length", "templates")
# Where and how verbosely a run goes, not what it computes: free to change on any resume. Every
# other field (learning rate, schedule length, weight decay, ...) is a training field: a resume
# may change it only when plan.allow_changes names it, and config.json records the change.
FREE_FIELDS = ("job", "log_every_steps", "checkpoint_every_steps", "max_to_keep", "data_dir",
               "mesh", "param_sharding", "record_examples", "data_workers", "allow_changes",
               "distributed", "coordinator_address", "num_processes", "process_id",
               "profile_steps")


def _jpeg_input(plan: Any) -> bool:
  return plan.input_pipeline == "imagenet"


def prefix(examples: Sequence, n: int) -> Sequence:
  """The first `n` records (all when n <= 0): smoke runs and subsets."""
  return examples if n <= 0 or n >= len(examples) else records.SubsetRecords(examples, range(n))


def _saved_config(workdir: str, steps: list[int]) -> dict[str, Any] | None:
  """The workdir's config.json; None when there is none (or it is torn) and no checkpoint.

  Checkpoints without a readable config.json are refused: nothing says which run they are of.
  """
  path = nmjax_io.join(workdir, "config.json")
  try:
    with nmjax_io.open(path) as f:
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


def allowed_changes(plan: Any) -> list[str]:
  """plan.allow_changes (comma-separated field names) as a list."""
  return [n.strip() for n in plan.allow_changes.replace("+", ",").split(",") if n.strip()]


def training_fields(names: Iterable[str]) -> list[str]:
  """Of a run's field `names`, those a resume may change only when allow_changes names them
  (sorted)."""
  return sorted(k for k in names if k not in FIXED_FIELDS + FREE_FIELDS)


def plan_record(plan: Any) -> dict[str, Any]:
  """A plan's fields as config.json holds them: plain JSON values, keys sorted."""
  return json.loads(json.dumps(dataclasses.asdict(plan), default=str, sort_keys=True))


def _defaults(plan: Any) -> dict[str, Any]:
  """The plan's field defaults: what a config.json that lacks a field implies."""
  return {f.name: f.default for f in dataclasses.fields(plan)
          if f.default is not dataclasses.MISSING}


def _differences(saved: dict[str, Any], current: dict[str, Any], fields: Sequence[str],
                 implied: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  old = {k: saved.get(k, implied.get(k)) for k in fields}
  return {k: (old[k], current.get(k)) for k in fields if old[k] != current.get(k)}


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
  return "; ".join(f"{k}: saved {old!r} vs now {new!r}" for k, (old, new) in changes.items())


def _history(saved: dict[str, Any], changes: dict[str, tuple[Any, Any]],
             step: int) -> list[dict[str, Any]]:
  history = list(saved.get("history", []))
  if changes:
    history.append({
        "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}})
  return history


def record_config(plan: Any, workdir: str) -> None:
  """Checks a resume against config.json and writes config.json (process 0).

  config.json holds the plan's fields (a dataclass) as plain values. A checkpoint of another run
  (FIXED_FIELDS differ) is refused; a change of a training field is refused unless
  plan.allow_changes names it, and is then appended to config.json's "history" ({step, time,
  changes: {field: {from, to}}}). A field the saved config.json lacks counts as the plan's
  default. Nothing is written on a refusal.
  """
  steps = sorted(checkpoint.saved_steps(workdir))  # Oldest first: the newest is steps[-1].
  saved = _saved_config(workdir, steps)
  current = plan_record(plan)
  record = dict(current)
  if saved is not None and steps:
    implied = _defaults(plan)
    # The current plan's fields: a saved field this nmjax does not know cannot steer the run.
    other_run = _differences(saved, current, [k for k in current if k in FIXED_FIELDS], implied)
    if other_run:
      raise ConfigError(f"--workdir={workdir} holds a checkpoint of a different run ("
                        f"{_listed(other_run)}); use a new --workdir")
    changes = _differences(saved, current, training_fields(current), implied)
    refused = {k: v for k, v in changes.items() if k not in allowed_changes(plan)}
    if refused:
      raise ConfigError(
          f"--workdir={workdir} holds a checkpoint trained with other settings"
          f" ({_listed(refused)}); resume with the saved values, or pass"
          f" --config.allow_changes={','.join(refused)} to go on with the new ones (config.json"
          " records the change)")
    history = _history(saved, changes, steps[-1])
    if history:
      record["history"] = history
  if jax.process_index() == 0 and record != saved:
    nmjax_io.write_json(nmjax_io.join(workdir, "config.json"), record)


def split_records(plan: Any, source: sources.Source) -> tuple[Sequence, Sequence]:
  """(train, test) records, cut to max_train_examples and max_test_examples."""
  if _jpeg_input(plan):
    # Encoded JPEGs, decoded and cropped to image_size in grain workers (data/imagenet.py).
    data_dir = plan.data_dir or None
    train = imagenet.jpeg_records(plan.dataset, "train", data_dir=data_dir)
    test = imagenet.jpeg_records(plan.dataset, plan.eval_split, data_dir=data_dir)
  else:
    train = source.data_source("train")
    test = source.data_source(plan.eval_split)
  return prefix(train, plan.max_train_examples), prefix(test, plan.max_test_examples)


def input_fns(plan: Any, info: sources.SourceInfo, train_records: Sequence,
               test_records: Sequence, noisy: np.ndarray,
               num_steps: int) -> tuple[Callable[[dict | None], Iterator], Callable[[], Iterable]]:
  """The loop's train_iterator (from a saved iterator state) and eval_batches."""
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  jpeg_input = _jpeg_input(plan)

  def train_iterator(saved_state: dict | None) -> Iterator:
    if jpeg_input:
      return imagenet.train_iterator(
          train_records, labels=noisy, global_batch_size=plan.batch_size, seed=plan.seed,
          num_steps=num_steps, image_size=plan.image_size, flip=bool(plan.flip),
          num_workers=plan.data_workers, start_state=saved_state, **process)
    return pipeline.train_iterator(
        train_records, labels=noisy, global_batch_size=plan.batch_size, seed=plan.seed,
        num_steps=num_steps, crop_padding=plan.crop_padding,
        flip=bool(plan.flip and info.flip_ok), start_state=saved_state, **process)

  def eval_batches() -> Iterable:
    if jpeg_input:
      return imagenet.eval_batches(test_records, batch_size=plan.eval_batch_size,
                                   image_size=plan.image_size,
                                   num_threads=max(1, plan.data_workers), **process)
    return pipeline.eval_batches(test_records, batch_size=plan.eval_batch_size, **process)

  return train_iterator, eval_batches


def loop_spec(plan: Any, info: sources.SourceInfo, inputs: tuple[Callable, Callable],
               steps_per_epoch: int, num_steps: int) -> loop.LoopSpec:
  """The model, optimizer and schedule of the plan, as the loop's spec."""
  dtype = models.DTYPES[plan.dtype]
  model = models.get_model(plan.model, num_classes=info.num_classes, dtype=dtype)
  schedule = state_lib.learning_rate_schedule(
      base_lr=plan.learning_rate,
      warmup_steps=int(round(plan.warmup_epochs * steps_per_epoch)), total_steps=num_steps)
  tx = state_lib.make_optimizer(state_lib.OptimizerSpec(
      optimizer=plan.optimizer, weight_decay=plan.weight_decay, momentum=plan.momentum,
      nesterov=plan.nesterov), schedule)
  input_shape = ((1, plan.image_size, plan.image_size, 3) if _jpeg_input(plan)
                 else (1, *info.image_shape))

  def init_state() -> state_lib.TrainState:
    return state_lib.create_train_state(model, jax.random.key(plan.seed), input_shape, tx)

  train_iterator, eval_batches = inputs
  return loop.LoopSpec(
      init_state=init_state, train_iterator=train_iterator, eval_batches=eval_batches,
      steps_per_epoch=steps_per_epoch, total_steps=num_steps,
      objective=steps.supervised(mean=info.mean, std=info.std, num_classes=info.num_classes,
                                 dtype=dtype, label_smoothing=plan.label_smoothing),
      log_every_steps=plan.log_every_steps,
      checkpoint_every_steps=plan.checkpoint_every_steps, max_to_keep=plan.max_to_keep,
      param_sharding=plan.param_sharding, record_examples=bool(plan.record_examples),
      eval_every_epochs=plan.eval_every_epochs,
      profile_steps=profiling.profile_window(plan.profile_steps))


def start_run(plan: Any, workdir: str) -> jax.sharding.Mesh:
  """A pre-training run's prologue (supervised or CLIP): processes connected, the mesh and the
  batch sizes checked, and config.json checked against the workdir and written; returns the
  mesh."""
  parallel.maybe_initialize_distributed(plan)
  mesh = parallel.make_mesh(spec=plan.mesh)
  parallel.check_batch_size(plan.batch_size, mesh)
  parallel.check_batch_size(plan.eval_batch_size, mesh, "eval_batch_size")
  # Before any data is read: a different run's checkpoint, or changed settings, fail at once.
  record_config(plan, workdir)
  return mesh


def run(plan: Any, workdir: str) -> dict[str, Any]:
  """Pre-trains (or resumes) in `workdir`, an existing writable directory (jobs make it).

  Args:
    plan: the run's fields (a checked PretrainPlan of the pretrain job, or an object with its
      attributes).
    workdir: where checkpoints, metrics and config.json go.
  Returns:
    The last epoch's record: step, epoch, train_loss, train_acc_noisy, train_acc_clean,
    examples_per_sec, test_acc, test_loss, test_count (plus eval_seconds), noise_rate_train
    (the fraction of the train labels used that the noise changed), num_classes, and
    preempted=True when a SIGTERM stopped the run after saving.
  """
  mesh = start_run(plan, workdir)
  source = sources.get_source(plan.dataset, data_dir=plan.data_dir or None)
  info = source.info
  train_records, test_records = split_records(plan, source)
  # The noise is drawn on the labels of the images used (exactly round(r N) of them changed).
  clean = source.labels("train")[:len(train_records)]
  noisy = noise.apply_label_noise(clean, plan.noise_ratio, info.num_classes, plan.seed,
                                  plan.noise_type)
  steps_per_epoch, num_steps = total_steps(
      num_examples=len(train_records), global_batch_size=plan.batch_size,
      num_epochs=plan.num_epochs, num_train_steps=plan.num_train_steps)
  inputs = input_fns(plan, info, train_records, test_records, noisy, num_steps)
  spec = loop_spec(plan, info, inputs, steps_per_epoch, num_steps)
  changed = float(np.mean(noisy != clean))
  if parallel.is_main_process():
    print(f"[pretrain] {plan.model} on {plan.dataset}: {len(train_records)} train /"
          f" {len(test_records)} test examples, noise {plan.noise_type} {plan.noise_ratio}"
          f" ({changed:.4f} of the train labels changed), {num_steps} steps of batch"
          f" {plan.batch_size} on {mesh.devices.size} device(s) in {jax.process_count()}"
          f" process(es), workdir {workdir}", flush=True)
  result = loop.train_and_evaluate(spec, workdir, mesh=mesh)
  return {**result, "noise_rate_train": changed, "num_classes": info.num_classes}
