"""Metric sinks: a JSON-lines file (the record scripts read) and TensorBoard scalars.

Only process 0 writes. On resume, lines past the restored step are dropped so that a replayed
stretch of training never leaves duplicate records; so is a torn last line (a kill in the middle
of a write), which the replayed stretch writes again.

A workdir in a bucket (gs://...) has no append: the writer keeps the file's lines in memory and
puts the whole file there at each flush() (the loop flushes before every checkpoint, so a
resume always finds the records its checkpoint covers), and TensorBoard's events go to a local
staging folder uploaded to workdir/tb at the same times.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
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
  """Appends {'step': s, **scalars} to workdir/metrics.jsonl and to TensorBoard (workdir/tb).

  A local workdir gets each record at once; a bucket workdir at each flush() and at close().
  """

  def __init__(self, workdir: str, *, filename: str = "metrics.jsonl", tensorboard: bool = True):
    self.path = nmjax_io.join(workdir, filename)
    self.active = jax.process_index() == 0
    self._cloud = nmjax_io.is_cloud(workdir)
    self._lines: list[str] | None = None  # Bucket workdir: the file's lines, once read.
    self._dirty = False
    self._tb = None
    self._tb_dir = nmjax_io.join(workdir, "tb")
    self._staging = None
    if self.active and tensorboard:
      if self._cloud:
        self._staging = tempfile.mkdtemp(prefix="nmjax-tb-")
      # Imported lazily (it pulls in protobuf), and without torch.
      self._tb = summary_writer(self._staging or self._tb_dir, flush_secs=10)

  def _read_lines(self) -> list[str]:
    if not nmjax_io.exists(self.path):
      return []
    return nmjax_io.read_text(self.path).splitlines(keepends=True)

  def truncate_after(self, step: int) -> None:
    """Drops records whose step is beyond `step` (they belong to a run that was not saved)."""
    if not self.active:
      return
    if self._cloud:
      lines = self._read_lines()
      self._lines = [line for line in lines if _step_of(line) is not None
                     and _step_of(line) <= step]
      self._dirty = self._lines != lines
      self._upload()
      return
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if _step_of(line) is not None and _step_of(line) <= step]
    nmjax_io.write_text(self.path, "".join(keep))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
    line = json.dumps(record) + "\n"
    if self._cloud:
      if self._lines is None:
        self._lines = [kept for kept in self._read_lines() if _step_of(kept) is not None]
      self._lines.append(line)
      self._dirty = True
    else:
      with open(self.path, "a") as f:
        f.write(line)  # One write per record: a kill tears at most one line.
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)

  def flush(self) -> None:
    """A bucket workdir: puts the records and TensorBoard's events written so far there (each
    file whole). A local workdir has them already: nothing to do."""
    if self._tb is not None and self._cloud:
      self._tb.flush()
    self._upload()

  def _upload(self) -> None:
    if not (self.active and self._cloud):
      return
    if self._dirty and self._lines is not None:
      nmjax_io.write_text(self.path, "".join(self._lines))
      self._dirty = False
    if self._staging is not None:
      nmjax_io.upload(self._staging, self._tb_dir)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._upload()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)
      self._staging = None


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
