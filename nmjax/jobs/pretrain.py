"""The pre-training job: supervised pre-training with label noise (nmjax.train.supervised).

validate(config) checks every field once and returns a PretrainPlan; run(plan, workdir) trains
(or resumes) in the workdir. What every pre-training run shares (mesh, parameter sharding,
processes, allow_changes) is checked by nmjax/jobs/pretrain_fields.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from nmjax import models, noise
from nmjax.config import check_choice, check_range
from nmjax.data import sources
from nmjax.errors import ConfigError
from nmjax.jobs import plans
from nmjax.jobs.pretrain_fields import IDENTITY_IGNORE, check_run_fields
from nmjax.jobs.workdir import prepare_workdir, process_index
from nmjax.train import profiling, state as state_lib, supervised

NAME = "pretrain"
"""The job's name: config.job's value and its key in nmjax.jobs.JOBS."""


@dataclasses.dataclass(frozen=True)
class PretrainPlan:
  """A checked supervised pre-training run (configs/pretrain.py, configs/pretrain_imagenet.py).

  Its fields are the config's, one for one (the comments say what the less obvious ones hold).
  A field with a default takes it where a workdir's config.json lacks the field (the resume
  check reads them); the configs set every field.
  """
  dataset: str
  model: str
  noise_ratio: float
  noise_type: str               # symmetric | pairflip
  seed: int
  num_epochs: float
  num_train_steps: int          # > 0 wins over num_epochs.
  batch_size: int               # Global, over all devices and processes.
  eval_batch_size: int
  max_train_examples: int       # > 0: the first N records only.
  max_test_examples: int
  optimizer: str                # sgd | adamw
  learning_rate: float
  momentum: float
  nesterov: bool
  weight_decay: float
  warmup_epochs: float
  label_smoothing: float
  flip: bool
  dtype: str
  log_every_steps: int
  checkpoint_every_steps: int
  max_to_keep: int
  data_dir: str
  record_examples: bool
  mesh: str
  param_sharding: str
  allow_changes: str            # Comma-separated training fields a resume may change.
  distributed: str              # none | auto | explicit
  coordinator_address: str
  num_processes: int
  process_id: int
  job: str = NAME
  input_pipeline: str = "default"  # default | imagenet
  crop_padding: int = 0
  image_size: int = 0
  data_workers: int = 0
  eval_split: str = "test"
  eval_every_epochs: int = 1
  profile_steps: str = ""       # "N,M": a jax.profiler trace of steps N..M (workdir/profile).

  # Not a field (no annotation): the fields that cannot change a run's result (where it goes,
  # how verbosely, how it resumes). Two plans equal but for these train the same model
  # (plans.identity(plan, PretrainPlan.IDENTITY_IGNORE): the study's reuse of a stage).
  IDENTITY_IGNORE = IDENTITY_IGNORE


def _check_input_pipeline(config: ml_collections.ConfigDict) -> None:
  """input_pipeline (default | imagenet) and the fields that pipeline reads."""
  check_choice(config, "input_pipeline", supervised.INPUT_PIPELINES)
  if config.input_pipeline == "default":
    check_range(config, "crop_padding", low=0, integer=True)
    return
  size = config.image_size
  if isinstance(size, bool) or not isinstance(size, int) or size < 8:
    raise ConfigError(f"config.image_size={size!r} is out of range; allowed: integer >= 8")
  workers = config.data_workers
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
    raise ConfigError(f"config.data_workers={workers!r} is out of range; allowed: integer >= 0")
  if not isinstance(config.eval_split, str) or not config.eval_split:
    raise ConfigError(f"config.eval_split={config.eval_split!r} must name a split "
                      f"(imagenet2012: validation)")


def _check_fields(config: ml_collections.ConfigDict) -> None:
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
  check_range(config, "eval_every_epochs", low=0, integer=True)


def validate(config: ml_collections.ConfigDict) -> PretrainPlan:
  """Checks every field of a pre-training config once, before any work.

  Args:
    config: a complete pre-training config (configs/pretrain.py, configs/pretrain_imagenet.py).

  Returns:
    The run's PretrainPlan.

  Raises:
    ConfigError: with one line naming the field and the allowed values.
    DataError: an unknown or unprepared dataset (naming the command that prepares it).
  """
  plan = plans.from_config(PretrainPlan, config, job=NAME)
  _check_fields(config)
  _check_input_pipeline(config)
  check_run_fields(config)
  profiling.profile_window(plan.profile_steps)  # "N,M" or "": the steps traced.
  return plan


def lock_index(plan: PretrainPlan) -> int:
  """The index of this process's lock file (nmjax.io.lock_path) in the workdir.

  Args:
    plan: the run's plan.

  Returns:
    The process's index among the run's processes (explicit mode: plan.process_id; auto mode
    connects the processes first to learn it), else 0.
  """
  return process_index(plan)


def run(plan: PretrainPlan, workdir: str) -> dict[str, Any]:
  """Pre-trains (or resumes) in `workdir`: checkpoints, metrics and results there.

  Args:
    plan: the run's plan (validate).
    workdir: the run's folder (made if needed); a run there resumes from its last checkpoint.

  Returns:
    The last epoch's record (nmjax.train.supervised.run): step, epoch, train and test metrics,
    noise_rate_train, num_classes, and preempted=True when a SIGTERM stopped the run.

  Raises:
    ConfigError: a workdir holding another run's checkpoints, or a resume that would change a
      field allow_changes does not name.
    DataError: a dataset that is missing (naming the command that prepares it) or malformed.
    TrainingError: a non-finite loss (naming the step and the last good checkpoint).
    Interrupted: Ctrl-C, once the checkpoint of the step in flight is committed.
  """
  return supervised.run(plan, prepare_workdir(workdir))
