"""orbax checkpoints of the train state plus the loop's JSON state (data iterator, epoch sums).

A checkpoint is committed atomically by orbax (written under a temporary name and renamed when
complete), so a kill at any moment leaves either the previous checkpoints or a new complete one;
restore only ever sees committed steps.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, max_to_keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, loop_state: dict[str, Any]) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          loop=ocp.args.JsonSave(loop_state)))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["loop"])


def abstract_with_sharding(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

