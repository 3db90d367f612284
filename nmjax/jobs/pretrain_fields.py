"""What the two pre-training jobs (pretrain, pretrain_clip) share: the checks of where a run
goes (mesh, parameter sharding, processes) and of what a resume may change (allow_changes), and
the fields that cannot change a run's result. Validation code: it reads configs.
"""

from __future__ import annotations

import os
import re

import ml_collections

from nmjax import parallel
from nmjax.config import check_choice
from nmjax.errors import ConfigError
from nmjax.train import supervised

# Where a run goes, how verbosely, how it resumes (supervised.FREE_FIELDS), and config.json's
# record of resumed changes: two plans equal but for these train the same model.
IDENTITY_IGNORE = supervised.FREE_FIELDS + ("history",)


def check_distributed(config: ml_collections.ConfigDict) -> None:
  """config.distributed (or $NMJAX_DISTRIBUTED, which overrides it) and, when explicit, the
  coordinator's address, the process count and this process's id."""
  check_choice(config, "distributed", parallel.DISTRIBUTED_MODES)
  mode = os.environ.get("NMJAX_DISTRIBUTED", config.distributed)
  if mode not in parallel.DISTRIBUTED_MODES:
    raise ConfigError(f"config.distributed={mode!r} is unknown; allowed:"
                      f" {', '.join(parallel.DISTRIBUTED_MODES)} (set by $NMJAX_DISTRIBUTED)")
  if mode != "explicit":
    return
  address = str(config.coordinator_address)
  if not re.fullmatch(r"[^\s:]+:\d+", address):
    raise ConfigError(f"config.coordinator_address={address!r} is not 'host:port'; allowed: e.g."
                      " 10.0.0.1:1234 (needed with config.distributed=explicit)")
  num_processes, process_id = config.num_processes, config.process_id
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ConfigError(f"config.num_processes={num_processes!r} is out of range; allowed: an"
                      " integer >= 1 (needed with config.distributed=explicit)")
  if (isinstance(process_id, bool) or not isinstance(process_id, int)
      or not 0 <= process_id < num_processes):
    raise ConfigError(f"config.process_id={process_id!r} is out of range; allowed: 0 <="
                      f" process_id < num_processes={num_processes}")


def check_allow_changes(config: ml_collections.ConfigDict) -> None:
  """Each config.allow_changes entry is a training field of the config (not a fixed one)."""
  names = [n.strip() for n in str(config.allow_changes).replace("+", ",").split(",")]
  fields = list(config.keys())
  for name in filter(None, names):
    if name in supervised.FIXED_FIELDS:
      raise ConfigError(f"config.allow_changes entry {name!r} cannot change on a resume (the"
                        " run, its data stream or its optimizer state depend on it); use a new"
                        " --workdir")
    if name not in fields:
      raise ConfigError(f"config.allow_changes entry {name!r} is not a field of this config;"
                        f" allowed: {', '.join(supervised.training_fields(fields))}")


def check_run_fields(config: ml_collections.ConfigDict) -> None:
  """Where a pre-training run goes (mesh, parameter sharding, processes) and what a resume may
  change: the fields supervised and CLIP pre-training share."""
  parallel.parse_mesh(config.mesh)
  check_choice(config, "param_sharding", parallel.PARAM_SHARDINGS)
  check_distributed(config)
  check_allow_changes(config)
