"""Device mesh, shardings, multi-host start-up and host-local <-> global array helpers.

Data parallel by default: a 1-D mesh over every device with axis 'data'; batches are split along
it and the train state is replicated. Everything is expressed with NamedSharding + jax.jit (no
pmap), so the same step runs on one CPU, N fake CPU devices, a GPU or a multi-host TPU pod.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nmjax.errors import ConfigError

DATA_AXIS = "data"


def maybe_initialize_distributed(config: Any = None) -> None:
  """Starts jax.distributed when the config or the environment asks for it.

  config.distributed: 'auto' (TPU pods and SLURM/OpenMPI-style launchers are auto-detected by
  jax), 'explicit' (config.coordinator_address, num_processes, process_id), or 'none' (default).
  The environment variable NMJAX_DISTRIBUTED=auto does the same as 'auto'.
  """
  mode = str(config.get("distributed", "none")) if config is not None else "none"
  mode = os.environ.get("NMJAX_DISTRIBUTED", mode)
  if mode == "none" or jax.distributed.is_initialized():
    return
  if mode == "auto":
    jax.distributed.initialize()
  elif mode == "explicit":
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=int(config.num_processes),
                               process_id=int(config.process_id))
  else:
    raise ConfigError(f"config.distributed={mode!r} is unknown; allowed: none, auto, explicit")


def make_mesh(devices: list | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  devices = mesh.devices.size
  if global_batch_size % devices or global_batch_size % jax.process_count():
    raise ConfigError(
        f"config.{field}={global_batch_size} must be divisible by the {devices} devices and"
        f" {jax.process_count()} processes")


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's slice of a batch into one global array sharded over 'data'."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def to_host(tree: Any) -> Any:
  """Fully replicated (or fully addressable) arrays to numpy on every process."""
  return jax.tree.map(np.asarray, jax.device_get(tree))
