"""orbax checkpoints of the train state plus the loop's JSON state (data iterator, epoch sums),
and the one way to read them back: restore that never trusts what it cannot read.

A checkpoint is committed atomically by orbax (written under a temporary name,
`<step>.orbax-checkpoint-tmp-*`, and renamed when complete), so a kill at any moment leaves either
the previous checkpoints or a new complete one; only folders named by a bare step number are
steps. Such a folder can still be unusable (a foreign or empty `99/`, a truncated array file, a
deleted `_METADATA`): every reader checks a step before it uses it (each item and its metadata
present and readable, the arrays' shapes and dtypes as the reader expects), then restores it; a
step that fails either is skipped with one warning, and the newest good one is used. A training
resume moves a skipped folder aside (`<step>.bad-<time>`, never listed as a step) so that the
next save at that step finds the name free; other readers leave the workdir as it is.

A full disk: a save is refused before anything is written where the disk has less free space
than the state's arrays (check_room, one process); one that fails while orbax writes it
(tensorstore raises a ValueError carrying the errno, no OSError) has its temporary folder
removed once the writes have stopped (disk_faults, around the training loop), and both end as an
OSError ENOSPC naming the step's folder, which nmjax.errors.one_line_errors reports in one line;
orbax's own log records of it are kept off stderr (NMJAX_DEBUG=1 shows them).

Multi-process: the arrays are written collectively (each process writes the shards it holds);
the JSON loop state is written once, by the primary process, and read by every process. That is
only right where the loop state is the same on every process: the loop checks the parts that
steer training (data position, epoch sums) with a collective before saving; wall-clock timings
are process 0's.
Restoring takes the shardings from the abstract state, so a checkpoint written on 8 devices (or
2 processes) restores onto 1 device, or any other mesh.

A workdir in a bucket (gs://...): orbax writes a step in place and marks it complete with
`commit_success.txt` (an object store has no rename), so there a step folder without that file
is a save that never finished: not a step. Moving a bad step aside copies it and deletes the
original.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import gc
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from nmjax import errors, io as nmjax_io, parallel
from nmjax.errors import DataError, NmjaxError

_STEP_NAME = re.compile(r"0|[1-9][0-9]*")  # orbax's own step names; tmp folders never match.
# Files whose absence makes a step unusable, relative to the step folder.
_REQUIRED_JSON = ("state/_METADATA", "loop/metadata")
_LOOP_KEYS = ("data", "epoch_sums")  # What a training resume reads from the loop state.
_COMMITTED = "commit_success.txt"  # orbax's mark of a step saved in place (a bucket).
_UNFINISHED = ".orbax-checkpoint-tmp"  # in the names of the folders of a save in flight
_UNFINISHED_STEP = re.compile(r"(?:^|/)(0|[1-9][0-9]*)\.orbax-checkpoint-tmp")
# Room a step takes beyond its arrays' bytes, asked for with them before a save: orbax's
# metadata (73 KB for the 86 arrays of the smoke ResNet) and the files' last blocks.
_METADATA_ROOM, _ROOM_PER_ARRAY = 64 << 10, 2 << 10


def directory(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute (orbax wants absolute paths; a bucket path as it is)."""
  return nmjax_io.join(nmjax_io.absolute(workdir), "checkpoints")


def manager(workdir: str, *, max_to_keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  # Saves are asynchronous (the step loop goes on while the arrays are written); the manager
  # also answers reached_preemption() for jax's preemption service.
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         enable_async_checkpointing=True)
  _quiet_disk_faults()
  return ocp.CheckpointManager(directory(workdir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, loop_state: dict[str, Any]) -> None:
  """Starts the save of `step` (written in the background) after check_room."""
  # orbax's save waits for the one in flight first anyway: waiting here lets that save's own
  # failure come first and the free space be measured after it.
  mngr.wait_until_finished()
  check_room(mngr, step, state)
  # The JSON is written in the background: a copy, so that the loop's next steps (which add
  # into the epoch sums in place) never change what this step saves.
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          loop=ocp.args.JsonSave(copy.deepcopy(loop_state))),
            force=True)


def check_room(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """OSError ENOSPC naming the step's folder where the disk under a local checkpoint folder has
  less free space than the state's arrays take plus room for orbax's metadata, before anything
  is written (one process only: with several, every process would have to agree; a full disk
  met by orbax's writes is turned into the same error by disk_faults)."""
  root = str(mngr.directory)
  if nmjax_io.is_cloud(root) or jax.process_count() > 1:
    return
  leaves = jax.tree.leaves(state)
  need = (sum(int(getattr(x, "nbytes", 0)) for x in leaves) + _METADATA_ROOM
          + _ROOM_PER_ARRAY * len(leaves))
  try:
    free = shutil.disk_usage(root).free
  except OSError:
    return
  if free < need:
    raise OSError(errno.ENOSPC, f"the checkpoint of step {step} needs about"
                  f" {errors.format_bytes(need)}", os.path.join(root, str(step)))


@contextlib.contextmanager
def disk_faults(mngr: ocp.CheckpointManager) -> Iterator[None]:
  """Cleans up after a full disk (or quota) inside the block: the save in flight is waited for
  and the folders of unfinished saves are removed, so that only committed steps remain. A fault
  met by orbax while writing a step (tensorstore's ValueError naming the errno) is raised as an
  OSError naming the step's folder (nmjax.errors.one_line_errors turns it into one line)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    fault = errors.os_error_in(e, errors.FULL_DISK)
    if fault is None:
      raise
    try:
      mngr.close()  # Waits for the save in flight, whose failure is the one being reported.
    except Exception:  # pylint: disable=broad-except
      pass
    if parallel.is_main_process():
      remove_unfinished(str(mngr.directory))
    gc.collect()  # Closes orbax's abandoned writes now, not noisily at interpreter exit.
    step = _UNFINISHED_STEP.search(fault.filename or "")
    if fault is e or step is None:
      raise
    raise OSError(fault.errno, fault.strerror,
                  os.path.join(str(mngr.directory), step.group(1))) from e


def remove_unfinished(root: str) -> list[str]:
  """Removes (and returns) the folders of unfinished saves under a local checkpoint folder
  (`<step>.orbax-checkpoint-tmp*`), where no save is in flight."""
  if nmjax_io.is_cloud(root) or not os.path.isdir(root):
    return []
  removed = [os.path.join(root, n) for n in os.listdir(root) if _UNFINISHED in n]
  for path in removed:
    shutil.rmtree(path, ignore_errors=True)
  return removed


class _DiskFaultRecords(logging.Filter):
  """Drops the log records (each with a long traceback) of a full disk that orbax's threads and
  asyncio's abandoned tasks write, which the error raised to the caller reports in one line;
  NMJAX_DEBUG=1 keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    fault = error is not None and errors.os_error_in(error, errors.FULL_DISK) is not None
    return not fault or errors.debug()


def _quiet_disk_faults() -> None:
  """Installs, once, what keeps a failed save's aftermath off stderr: _DiskFaultRecords on the
  loggers of absl (orbax's) and asyncio, and an unraisable-exception hook that drops the
  `Event loop is closed` reports of tensorstore writes finishing after orbax closed the event
  loop of a failed save (a consequence, never a cause; NMJAX_DEBUG=1 keeps them)."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DiskFaultRecords) for f in logger.filters):
      logger.addFilter(_DiskFaultRecords())
  previous = sys.unraisablehook
  if getattr(previous, "nmjax_quiet", False):
    return

  def hook(unraisable: Any) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
            and unraisable.object is None) or errors.debug():
      previous(unraisable)

  hook.nmjax_quiet = True
  sys.unraisablehook = hook


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs), unchecked."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["loop"])


def abstract_with_sharding(tree: Any, sharding: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `sharding` (one Sharding, or a matching tree of them)."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, sharding)


def saved_steps(workdir: str) -> list[int]:
  """The steps named under WORKDIR/checkpoints, newest first, whatever their content (orbax's
  temporary folders and folders moved aside are not steps)."""
  root = directory(workdir)
  if not nmjax_io.isdir(root):
    return []
  names = [n for n in nmjax_io.listdir(root) if _STEP_NAME.fullmatch(n)]
  if nmjax_io.is_cloud(root):  # A step saved in place is one once orbax marked it complete.
    names = [n for n in names if nmjax_io.exists(nmjax_io.join(root, n, _COMMITTED))]
  return sorted((int(n) for n in names), reverse=True)


class _Unusable(Exception):
  """A step that cannot be used; the message says why, in a few words."""


def _check_files(folder: str) -> None:
  """The cheap structural check: the items, their metadata, every file readable."""
  if not nmjax_io.isdir(folder):
    raise _Unusable("not a folder")
  if not nmjax_io.listdir(folder):
    raise _Unusable("an empty folder")
  for item in ("state", "loop"):
    if not nmjax_io.isdir(nmjax_io.join(folder, item)):
      raise _Unusable(f"no {item}/ item: not an nmjax checkpoint")
  for name in _REQUIRED_JSON:
    try:
      with nmjax_io.open(nmjax_io.join(folder, name)) as f:
        json.load(f)
    except FileNotFoundError:
      raise _Unusable(f"{name} is missing") from None
    except (OSError, ValueError) as e:
      raise _Unusable(f"{name} is unreadable ({type(e).__name__})") from None
  if nmjax_io.is_cloud(folder):
    return  # Objects: each one listed is whole and readable by whoever can list it.
  for parent, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(parent, name)
      if not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise _Unusable(f"{os.path.relpath(path, folder)} is not a readable file")


def _kvstore(folder: str) -> dict[str, Any]:
  """The tensorstore spec of a folder: a file:// one, or the bucket's (gs://; tensorstore reaches
  an emulator through TENSORSTORE_GCS_HTTP_URL)."""
  if not nmjax_io.is_cloud(folder):
    return {"driver": "file", "path": folder + os.sep}
  scheme, _, rest = folder.partition("://")
  if scheme.lower() not in ("gs", "gcs"):
    raise _Unusable(f"its arrays cannot be read ({scheme}:// is not a store orbax writes)")
  bucket, _, inner = rest.partition("/")
  return {"driver": "gcs", "bucket": bucket, "path": inner.rstrip("/") + "/"}


def _check_values(state_dir: str) -> None:
  """Reads the last byte of every value of the state's OCDBT store (array chunks and their zarr
  metadata), so that a truncated or missing data file is found here, cheaply, before orbax's
  restore, whose half-failed parallel reads would litter stderr with tracebacks."""
  if not nmjax_io.isfile(nmjax_io.join(state_dir, "manifest.ocdbt")):
    raise _Unusable("state/manifest.ocdbt is missing")
  try:
    store = ts.KvStore.open({"driver": "ocdbt", "base": _kvstore(state_dir)}).result()
    keys = store.list().result()
    for key, tail in [(k, store.read(k, byte_range=slice(-1, None))) for k in keys]:
      try:
        tail.result()
      except ValueError:  # An empty value has no last byte: read it whole to be sure.
        store.read(key).result()
  except Exception as e:  # pylint: disable=broad-except
    text = (str(e).strip().splitlines() or [""])[0][:160]
    raise _Unusable(f"its arrays cannot be read ({type(e).__name__}: {text})") from None


def _name(key: Any) -> str:
  """One part of a tree path, as orbax names it (dict key, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path: (shape, dtype name)} of the arrays of a tree of arrays or array metadata."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in flat}


def _check_arrays(recorded: dict, expected: dict) -> None:
  """Recorded arrays must be the expected ones, shape and dtype (orbax would cast a dtype)."""
  missing = sorted(set(expected) - set(recorded))
  extra = sorted(set(recorded) - set(expected))
  if missing or extra:
    what = f"lacks {missing[0]}" if missing else f"has an unexpected {extra[0]}"
    raise _Unusable(f"holds another train state ({what})")
  for path, (shape, dtype) in expected.items():
    if recorded[path] != (shape, dtype):
      raise _Unusable(f"holds another train state ({path}: {recorded[path][1]}"
                      f"{list(recorded[path][0])}, expected {dtype}{list(shape)})")


def _reading_manager(workdir: str) -> ocp.CheckpointManager:
  # Named handlers let the manager read the metadata before any restore.
  return ocp.CheckpointManager(
      directory(workdir), options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "loop": ocp.JsonCheckpointHandler()})


def _read_step(mngr: ocp.CheckpointManager, step: int, abstract: Callable[[Any], Any],
               loop_keys: tuple[str, ...] = ()) -> tuple[Any, dict]:
  """Checks one step (files, metadata, arrays against abstract(metadata tree), the loop state's
  keys) and restores it; raises _Unusable with the reason when it cannot be used."""
  folder = nmjax_io.join(str(mngr.directory), str(step))
  _check_files(folder)
  _check_values(nmjax_io.join(folder, "state"))
  try:
    metadata = mngr.item_metadata(step)["state"]
    recorded = metadata.tree if hasattr(metadata, "tree") else metadata
    target = abstract(recorded)
    _check_arrays(_specs(recorded), _specs(target))
    state, loop_state = restore(mngr, step, target)
  except (_Unusable, NmjaxError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" in str(e):  # Out of device memory says nothing about the files.
      raise
    text = (str(e).strip().splitlines() or [""])[0].split(" See full")[0][:160]
    raise _Unusable(f"cannot be restored ({type(e).__name__}: {text})") from None
  missing = [k for k in loop_keys if k not in loop_state]
  if missing:
    raise _Unusable(f"its loop state lacks {missing[0]!r}: not an nmjax pre-training checkpoint")
  return state, loop_state


def _warn(text: str) -> None:
  if parallel.is_main_process():
    print(f"[checkpoint] warning: {text}", file=sys.stderr, flush=True)


def _move_aside(folder: str) -> str:
  """Renames a bad step folder to <step>.bad-<time> (not a step name: never listed, never
  deleted by orbax) so that a later save at that step finds the name free. In a bucket the
  objects are copied to the new name, then deleted."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target, n = f"{folder}.bad-{stamp}", 1
  while nmjax_io.exists(target):
    target, n = f"{folder}.bad-{stamp}-{n}", n + 1
  if nmjax_io.is_cloud(folder):  # Copied object by object, then deleted (no rename there).
    fs, inner = nmjax_io.paths.filesystem(folder)
    fs.copy(inner, nmjax_io.paths.filesystem(target)[1], recursive=True)
    fs.rm(inner, recursive=True)
  else:
    os.rename(folder, target)
  return target


def _newest_good(workdir: str, steps: list[int], abstract: Callable[[Any], Any], *,
                 move_bad: bool, remedy: str,
                 loop_keys: tuple[str, ...] = ()) -> tuple[int, Any, dict]:
  """(step, state, loop state) of the first usable step of `steps` (newest first); DataError
  listing them all when none is usable. Each skipped step gets one warning line."""
  root = directory(workdir)
  bad: list[tuple[int, str]] = []
  chosen = None
  mngr = _reading_manager(workdir)
  try:
    for step in steps:
      try:
        chosen = (step, *_read_step(mngr, step, abstract, loop_keys))
        break
      except _Unusable as e:
        bad.append((step, str(e)))
  finally:
    mngr.close()
  if chosen is None:
    found = ", ".join(f"{nmjax_io.join(root, str(s))} ({why})" for s, why in bad)
    raise DataError(f"no usable checkpoint in {root}: found {found}; {remedy}")
  parallel.assert_same_on_all_processes(chosen[0], "the checkpoint step chosen to restore")
  for bad_step, why in bad:
    folder = nmjax_io.join(root, str(bad_step))
    action = "left it in place"
    if move_bad and parallel.is_main_process():  # After the collective: all have checked it.
      action = f"moved it to {_move_aside(folder)}"
    _warn(f"skipping {folder}: {why}; {action}; using step {chosen[0]}")
  return chosen


def restore_latest(workdir: str, abstract_state: Any) -> tuple[int, Any, dict] | None:
  """(step, state, loop state) of the workdir's newest usable checkpoint, restored onto the
  shardings of `abstract_state`, for a training resume; None when there is no checkpoint.

  A step whose arrays differ from `abstract_state` (paths, shapes, dtypes), whose loop state
  lacks the data position or the epoch sums, or which cannot be read, is skipped with a
  warning and moved aside (`<step>.bad-<time>`); DataError when no step is usable (nothing is
  moved then).
  """
  steps = saved_steps(workdir)
  if not steps:
    return None
  return _newest_good(workdir, steps, lambda _: abstract_state, move_bad=True,
                      loop_keys=_LOOP_KEYS,
                      remedy="move the damaged folders away to start afresh, or use another"
                             " --workdir")


def load_state(workdir: str, *, step: int | None = None,
               sharding: jax.sharding.Sharding | None = None) -> tuple[int, Any]:
  """(step, state as a plain tree) of a workdir's checkpoint, on any topology.

  Reads the saved shapes and dtypes from the checkpoint's metadata, so no model is needed; the
  arrays land on `sharding` (default: the first local device), whatever mesh wrote them.
  step None: the newest usable step (damaged newer ones are skipped with a warning and left in
  place); a given step that cannot be used is refused with DataError naming its folder.
  """
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def from_metadata(tree: Any) -> Any:
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)

  steps = saved_steps(workdir)
  root = directory(workdir)
  if not steps:
    raise DataError(f"no committed checkpoint under {root}")
  if step is None:
    found = _newest_good(workdir, steps, from_metadata, move_bad=False,
                         remedy="resume or redo the pre-training run")
    return found[0], found[1]
  if step not in steps:
    raise DataError(f"no checkpoint of step {step} under {root}; saved steps:"
                    f" {', '.join(map(str, steps))}")
  mngr = _reading_manager(workdir)
  try:
    return step, _read_step(mngr, step, from_metadata)[0]
  except _Unusable as e:
    others = ", ".join(str(s) for s in steps if s != step) or "none"
    raise DataError(f"checkpoint {nmjax_io.join(root, str(step))} (step {step}) cannot be used:"
                    f" {e}; other saved steps: {others}") from None
  finally:
    mngr.close()
