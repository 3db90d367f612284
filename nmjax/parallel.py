"""Device mesh, shardings, multi-host start-up and host-local <-> global array helpers.

Data parallel by default: a 1-D mesh over every device with axis 'data'; batches are split along
it and the train state is replicated. A second axis 'model' is available ("data:4,model:2"): with
param_sharding="model" the big kernels are split over it by a shape rule, and the optimizer state
follows the parameters because it is sharded by the same rule. Everything is NamedSharding +
jax.jit (no pmap), so the same step runs on one CPU, N fake CPU devices, a GPU or a multi-host
TPU pod.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nmjax.errors import ConfigError

DATA_AXIS = "data"
MODEL_AXIS = "model"
DISTRIBUTED_MODES = ("none", "auto", "explicit")
PARAM_SHARDINGS = ("replicated", "model")
# Below this many elements a kernel stays replicated under the "model" rule: splitting a small
# array costs a collective per use and saves almost no memory.
MIN_SHARDED_SIZE = 2**18


def maybe_initialize_distributed(settings: Any = None, *, distributed: str = "none",
                                 coordinator_address: str = "", num_processes: int = 1,
                                 process_id: int = 0) -> None:
  """Starts jax.distributed when the run or the environment asks for it.

  Must run before anything touches a device. The fields come from `settings` (any object with
  the attributes distributed, coordinator_address, num_processes and process_id, e.g. a job's
  plan) or, without it, from the keywords; a job's validate has checked them.

  Args:
    settings: an object with the four fields below, or None.
    distributed: 'none', 'auto' (jax detects TPU pods, SLURM and Open MPI launchers, or reads
      JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) or 'explicit' (the three
      fields below). The environment variable NMJAX_DISTRIBUTED overrides it.
    coordinator_address: explicit: 'host:port' of process 0.
    num_processes: explicit: how many processes in all.
    process_id: explicit: this process, 0..num_processes-1.
  """
  if settings is not None:
    distributed, coordinator_address = settings.distributed, settings.coordinator_address
    num_processes, process_id = settings.num_processes, settings.process_id
  mode = os.environ.get("NMJAX_DISTRIBUTED", str(distributed))
  if mode not in DISTRIBUTED_MODES:
    raise ConfigError(
        f"config.distributed={mode!r} is unknown; allowed: {', '.join(DISTRIBUTED_MODES)}")
  if mode == "none" or jax.distributed.is_initialized():
    return
  if mode == "auto":
    jax.distributed.initialize()
    return
  jax.distributed.initialize(coordinator_address=str(coordinator_address),
                             num_processes=int(num_processes), process_id=int(process_id))


def parse_mesh(spec: str) -> list[tuple[str, int]]:
  """'data:-1' or 'data:4,model:2' -> [(axis, size)]; one size may be -1 (all the rest)."""
  axes = []
  for item in str(spec).split(","):
    name, _, size = item.strip().partition(":")
    if name not in (DATA_AXIS, MODEL_AXIS) or not re.fullmatch(r"-1|[1-9]\d*", size.strip()):
      raise ConfigError(f"config.mesh={spec!r} is malformed; allowed: comma-separated axis:size"
                        f" with axes {DATA_AXIS}, {MODEL_AXIS} and one size -1 at most, e.g."
                        f" data:-1 or data:4,model:2")
    axes.append((name, int(size)))
  names = [name for name, _ in axes]
  if DATA_AXIS not in names or len(set(names)) != len(names) or (
      [size for _, size in axes].count(-1) > 1):
    raise ConfigError(f"config.mesh={spec!r} needs the axis {DATA_AXIS!r} once, each axis once"
                      f" and at most one size -1; allowed e.g.: data:-1, data:4,model:2")
  return axes


def make_mesh(devices: Sequence[jax.Device] | None = None, *, spec: str = "data:-1") -> Mesh:
  """A mesh over `devices` (default: all) shaped by `spec` (see parse_mesh)."""
  devices = list(jax.devices() if devices is None else devices)
  axes = parse_mesh(spec)
  known = int(np.prod([size for _, size in axes if size != -1]))
  if len(devices) % known:
    raise ConfigError(f"config.mesh={spec!r} does not fit {len(devices)} devices; allowed: axis"
                      f" sizes whose product divides {len(devices)}")
  if jax.process_count() > 1 and axes[0][0] != DATA_AXIS:
    raise ConfigError(f"config.mesh={spec!r} must start with the {DATA_AXIS!r} axis when there"
                      f" are several processes (each feeds its own rows of the batch); allowed"
                      f" e.g.: data:-1,model:2")
  sizes = [len(devices) // known if size == -1 else size for _, size in axes]
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(f"config.mesh={spec!r} covers {int(np.prod(sizes))} devices but there are"
                      f" {len(devices)}; allowed: sizes whose product is {len(devices)} (or -1)")
  # Devices in jax.devices() order: a process's devices are contiguous, so with the data axis
  # first each process holds whole rows of the mesh and feeds only its own part of a batch.
  return Mesh(np.asarray(devices).reshape(sizes), tuple(name for name, _ in axes))


def data_size(mesh: Mesh) -> int:
  """How many ways a batch is split (the 'data' axis)."""
  return int(mesh.shape[DATA_AXIS])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def leaf_spec(shape: Sequence[int], mesh: Mesh, rule: str = "replicated") -> P:
  """The PartitionSpec of one state array under `rule`.

  'replicated': every device holds everything. 'model': arrays of rank >= 2 with at least
  MIN_SHARDED_SIZE elements are split over the 'model' axis along their largest dimension that
  the axis size divides (ties: the last such dimension, usually the output features); all other
  arrays are replicated. Because the rule reads only the shape, an optimizer's momentum or Adam
  moments get the same layout as the parameter they belong to.
  """
  if rule not in PARAM_SHARDINGS:
    raise ConfigError(
        f"config.param_sharding={rule!r} is unknown; allowed: {', '.join(PARAM_SHARDINGS)}")
  model = int(mesh.shape.get(MODEL_AXIS, 1))
  if rule == "replicated" or model == 1 or len(shape) < 2 or np.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % model == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda d: (shape[d], d))
  return P(*[MODEL_AXIS if d == axis else None for d in range(len(shape))])


def state_shardings(abstract_state: Any, mesh: Mesh, rule: str = "replicated") -> Any:
  """NamedShardings for every array of a (train) state pytree, by leaf_spec."""
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), mesh, rule)),
                      abstract_state)


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "batch_size") -> None:
  ways = data_size(mesh)
  if global_batch_size % ways or global_batch_size % jax.process_count():
    raise ConfigError(
        f"config.{field}={global_batch_size} must be divisible by the {ways}-way data axis and"
        f" {jax.process_count()} processes")


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's slice of a batch into one global array sharded over 'data'."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def to_host(tree: Any) -> Any:
  """Fully replicated (or fully addressable) arrays to numpy on every process.

  Metrics that a jitted step returns with a replicated out_sharding are complete on every
  process, so this is how every process (and process 0, which writes them) reads them.
  """
  return jax.tree.map(np.asarray, jax.device_get(tree))


def gather_to_host(tree: Any) -> Any:
  """Global arrays (e.g. sharded over 'data') to full numpy arrays on every process.

  A collective when there are several processes: every process must call it at the same point.
  """
  if jax.process_count() == 1:
    return to_host(tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def is_main_process() -> bool:
  """Process 0 writes metrics, logs and other single-copy files."""
  return jax.process_index() == 0


def assert_same_on_all_processes(value: Any, what: str) -> None:
  """Fails on every process if a JSON-able `value` differs between processes (a collective)."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
  multihost_utils.assert_equal(np.frombuffer(digest, np.uint8),
                               f"{what} differs between processes")
