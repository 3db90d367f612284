"""The CLIP pre-training job: image and text towers on image-text pairs with caption noise
(nmjax.train.clip_training).

validate(config) checks every field once and returns a ClipPlan; run(plan, workdir) trains (or
resumes) in the workdir. What every pre-training run shares (mesh, parameter sharding,
processes, allow_changes) is checked by nmjax/jobs/pretrain_fields.py, as for the pretrain job.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from nmjax import models
from nmjax.config import check_choice, check_range
from nmjax.data import image_text
from nmjax.errors import ConfigError
from nmjax.jobs import plans
from nmjax.jobs.pretrain_fields import IDENTITY_IGNORE, check_run_fields
from nmjax.jobs.workdir import prepare_workdir, process_index
from nmjax.models import clip_model as clip_models
from nmjax.train import clip_training, contrastive, profiling

NAME = "pretrain_clip"
"""The job's name: config.job's value and its key in nmjax.jobs.JOBS."""


@dataclasses.dataclass(frozen=True)
class ClipPlan:
  """A checked CLIP pre-training run (configs/pretrain_clip.py; the CLIP study's stages).

  Its fields are the config's, one for one (the comments say what the less obvious ones hold).
  """
  dataset: str                  # An embedded set, coco_captions, or array_record:DIR.
  model: str
  quick_gelu: bool
  loss: str                     # softmax (CLIP's InfoNCE) | sigmoid (SigLIP)
  context_length: int
  held_out_pairs: int           # Real sets: their last N pairs are held out.
  caption_noise: float
  seed: int
  num_epochs: float
  num_train_steps: int          # > 0 wins over num_epochs.
  batch_size: int               # Global, over all devices and processes.
  eval_batch_size: int
  max_train_examples: int
  max_test_examples: int
  optimizer: str                # adamw
  learning_rate: float
  weight_decay: float
  adam_b1: float
  adam_b2: float
  adam_eps: float
  warmup_steps: int
  crop_padding: int             # Embedded sets: random crop after zero padding (0: none).
  flip: bool
  dtype: str
  eval_every_epochs: int
  log_every_steps: int
  checkpoint_every_steps: int
  max_to_keep: int
  mesh: str
  param_sharding: str
  data_workers: int             # Real (JPEG) pairs: decoding worker processes.
  image_size: int               # Real (JPEG) pairs: the crop the image tower takes.
  data_dir: str
  record_examples: bool
  allow_changes: str            # Comma-separated training fields a resume may change.
  distributed: str              # none | auto | explicit
  coordinator_address: str
  num_processes: int
  process_id: int
  job: str = NAME
  profile_steps: str = ""       # "N,M": a jax.profiler trace of steps N..M (workdir/profile).

  # Not a field: the fields that cannot change a run's result (as PretrainPlan's).
  IDENTITY_IGNORE = IDENTITY_IGNORE


def check_dataset(dataset: Any) -> None:
  """An embedded set, coco_captions, or array_record:DIR (webdataset shards converted once)."""
  prefix = clip_training.ARRAY_RECORD
  if not isinstance(dataset, str) or not (
      clip_training.is_embedded(dataset) or dataset == "coco_captions"
      or (dataset.startswith(prefix) and len(dataset) > len(prefix))):
    raise ConfigError(f"config.dataset={dataset!r} is unknown; allowed:"
                      f" {', '.join(image_text.EMBEDDED)}, coco_captions, {prefix}DIR"
                      " (python -m nmjax.data.image_text convert --output DIR SHARDS...)")


def _check_fields(config: ml_collections.ConfigDict) -> None:
  check_choice(config, "model", tuple(clip_models.CLIP_MODELS))
  check_dataset(config.dataset)
  check_choice(config, "loss", contrastive.LOSSES)
  check_range(config, "caption_noise", low=0.0, high=1.0, high_inclusive=False)
  check_choice(config, "dtype", tuple(models.DTYPES))
  check_choice(config, "optimizer", ("adamw",))
  if not isinstance(config.quick_gelu, bool):
    raise ConfigError(f"config.quick_gelu={config.quick_gelu!r} must be True or False")
  check_range(config, "seed", low=0, high=2**32 - 1, integer=True)
  for field in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps",
                "max_to_keep", "context_length"):
    check_range(config, field, low=1, integer=True)
  check_range(config, "num_epochs", low=0, low_inclusive=False)
  check_range(config, "num_train_steps", integer=True)
  check_range(config, "learning_rate", low=0, low_inclusive=False)
  check_range(config, "weight_decay", low=0)
  check_range(config, "warmup_steps", low=0, integer=True)
  check_range(config, "adam_b1", low=0, high=1, high_inclusive=False)
  check_range(config, "adam_b2", low=0, high=1, high_inclusive=False)
  check_range(config, "adam_eps", low=0, low_inclusive=False)
  check_range(config, "crop_padding", low=0, integer=True)
  check_range(config, "eval_every_epochs", low=0, integer=True)


def validate(config: ml_collections.ConfigDict) -> ClipPlan:
  """Checks every field of a CLIP pre-training config once, before any work.

  Args:
    config: a complete CLIP pre-training config (configs/pretrain_clip.py).

  Returns:
    The run's ClipPlan.

  Raises:
    ConfigError: with one line naming the field and the allowed values.
  """
  plan = plans.from_config(ClipPlan, config, job=NAME)
  _check_fields(config)
  check_run_fields(config)
  profiling.profile_window(plan.profile_steps)  # "N,M" or "": the steps traced.
  return plan


def lock_index(plan: ClipPlan) -> int:
  """The index of this process's lock file (nmjax.io.lock_path), as the pretrain job's.

  Args:
    plan: the run's plan.

  Returns:
    The process's index among the run's processes (explicit or auto mode), else 0.
  """
  return process_index(plan)


def run(plan: ClipPlan, workdir: str) -> dict[str, Any]:
  """Pre-trains (or resumes) a CLIP in `workdir`: checkpoints, metrics and results there.

  Args:
    plan: the run's plan (validate).
    workdir: the run's folder (made if needed); a run there resumes from its last checkpoint.

  Returns:
    The last epoch's record (nmjax.train.clip_training.run), with preempted=True when a SIGTERM
    stopped the run.

  Raises:
    ConfigError: a workdir holding another run's checkpoints, or a resume that would change a
      field allow_changes does not name.
    DataError: a dataset that is missing (naming the command that prepares it) or malformed.
    TrainingError: a non-finite loss (naming the step and the last good checkpoint).
    Interrupted: Ctrl-C, once the checkpoint of the step in flight is committed.
  """
  return clip_training.run(plan, prepare_workdir(workdir))
