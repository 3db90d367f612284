"""Metric sinks: a JSON-lines file (the record scripts read) and TensorBoard scalars.

Only process 0 writes. On resume, lines past the restored step are dropped so that a replayed
stretch of training never leaves duplicate records; so is a torn last line (a kill in the middle
of a write), which the replayed stretch writes again.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax

from nmjax import io as nmjax_io


def _json_value(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def _step_of(line: str) -> int | None:
  """The step of a complete record line; None for a blank or torn one."""
  if not line.endswith("\n"):
    return None
  try:
    return int(json.loads(line).get("step", 0))
  except (ValueError, AttributeError):
    return None


class MetricWriter:
  """Appends {'step': s, **scalars} to workdir/metrics.jsonl and to TensorBoard (workdir/tb)."""

  def __init__(self, workdir: str, *, filename: str = "metrics.jsonl", tensorboard: bool = True):
    self.path = os.path.join(workdir, filename)
    self.active = jax.process_index() == 0
    self._tb = None
    if self.active and tensorboard:
      # Imported lazily (it pulls in protobuf), and without torch.
      self._tb = summary_writer(os.path.join(workdir, "tb"), flush_secs=10)

  def truncate_after(self, step: int) -> None:
    """Drops records whose step is beyond `step` (they belong to a run that was not saved)."""
    if not self.active or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if _step_of(line) is not None and _step_of(line) <= step]
    nmjax_io.write_text(self.path, "".join(keep))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")  # One write per record: a kill tears at most one line.
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def summary_writer(logdir: str, **kwargs: Any) -> Any:
  """A tensorboardX SummaryWriter, imported without torch.

  tensorboardX imports torch at import time when it is installed (the tests' reference is); in a
  JAX process that costs seconds and memory, and torch's and XLA's thread pools can abort a
  training process that has both. So a torch not already imported is hidden from it.
  """
  hidden = "torch" not in sys.modules
  if hidden:
    sys.modules["torch"] = None  # `import torch` then raises ImportError.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if hidden:
      del sys.modules["torch"]
  return SummaryWriter(logdir, **kwargs)
