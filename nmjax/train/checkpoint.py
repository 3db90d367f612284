"""orbax checkpoints of the train state plus the loop's JSON state (data iterator, epoch sums).

A checkpoint is committed atomically by orbax (written under a temporary name,
`<step>.orbax-checkpoint-tmp-*`, and renamed when complete), so a kill at any moment leaves either
the previous checkpoints or a new complete one; the manager lists and restores committed steps
only.

Multi-process: the arrays are written collectively (each process writes the shards it holds);
the JSON loop state is written once, by the primary process, and read by every process. That is
only right where the loop state is the same on every process: the loop checks the parts that
steer training (data position, epoch sums) with a collective before saving; wall-clock timings
are process 0's.
Restoring takes the shardings from the abstract state, so a checkpoint written on 8 devices (or
2 processes) restores onto 1 device, or any other mesh.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, max_to_keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  # Saves are asynchronous (the step loop goes on while the arrays are written); the manager
  # also answers reached_preemption() for jax's preemption service.
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, loop_state: dict[str, Any]) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          loop=ocp.args.JsonSave(loop_state)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["loop"])


def abstract_with_sharding(tree: Any, sharding: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `sharding` (one Sharding, or a matching tree of them)."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, sharding)


def load_state(workdir: str, *, step: int | None = None,
               sharding: jax.sharding.Sharding | None = None) -> tuple[int, Any]:
  """(step, state as a plain tree) of a workdir's checkpoint, on any topology.

  Reads the saved shapes and dtypes from the checkpoint's metadata, so no model is needed; the
  arrays land on `sharding` (default: the first local device), whatever mesh wrote them.
  """
  # Named handlers let the manager read the metadata before any restore.
  mngr = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "loop": ocp.JsonCheckpointHandler()})
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no committed checkpoint under {mngr.directory}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = mngr.item_metadata(step)["state"]
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  return step, restored["state"]
