"""Files: the one atomic writer every result, cache and checkpoint-side file goes through, and the
one file lock.

Writes go to a temporary name beside the target and are renamed onto it only when whole, so a
kill never leaves a torn file under the final name. A lock is an fcntl.flock on a file in the
folder: the kernel drops it when its holder exits by any means (SIGKILL included), so a lock left
by a dead process is simply taken again. A workdir's lock file records the holder (pid, host,
start time, what it runs) for the message a second run gets, and is emptied on a clean release.
Each process of a multi-process run locks its own file (process 0: `.lock`, process i:
`.lock.i`), so the processes of one run never refuse each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from nmjax.errors import ConfigError

__all__ = ["atomic_path", "write_text", "write_json", "write_jsonl", "append_line", "hold",
           "exclusive", "InUse", "Holder", "lock_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """A temporary name beside `path` to write, renamed onto `path` only when the block finishes.

  The temporary file (same extension) is removed when the block fails, so a kill never leaves a
  torn file under the final name.

  Args:
    path: the file to write.

  Yields:
    The temporary path to write inside the block.

  Raises:
    OSError: raised in the block or by the rename (a full disk), naming `path`.

  Examples:
    >>> import os, tempfile
    >>> from nmjax import io
    >>> path = os.path.join(tempfile.mkdtemp(), "result.txt")
    >>> with io.atomic_path(path) as tmp:
    ...   with open(tmp, "w") as f:
    ...     _ = f.write("done")
    >>> open(path).read()
    'done'
  """
  path = os.fspath(path)
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{os.getpid()}{ext}"
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as e:
    # A write that fails (a full disk) carries no file name: name the file it was for.
    if e.filename is None or e.filename == tmp:
      e.filename = path
    raise
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (atomic_path): the whole file or none of it.

  Args:
    path: the file to write (its folder must exist).
    text: the file's new contents.

  Raises:
    OSError: the file cannot be written (naming `path`).
  """
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def write_json(path: str | os.PathLike, record: Any) -> None:
  """Writes `record` as indented JSON (values JSON lacks as their str()) atomically.

  Args:
    path: the file to write (its folder must exist).
    record: any JSON-serializable value.

  Raises:
    OSError: the file cannot be written (naming `path`).
  """
  write_text(path, json.dumps(record, indent=1, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
  """Writes `rows` as JSON lines, one per row, atomically.

  Args:
    path: the file to write (its folder must exist).
    rows: the records, each JSON-serializable.

  Raises:
    OSError: the file cannot be written (naming `path`).
  """
  write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_line(path: str | os.PathLike, row: dict[str, Any]) -> None:
  """Appends one JSON line whole or not at all (a full disk never leaves a torn line).

  Args:
    path: the JSON-lines file (created when missing; its folder must exist).
    row: the record to append, JSON-serializable.

  Raises:
    OSError: the file cannot be written (naming `path`).
  """
  existing = ""
  if os.path.exists(path):
    with open(path) as f:
      existing = f.read()
  write_text(path, existing + json.dumps(row) + "\n")


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
  """Holds a blocking flock on the file `path` for the block: one process at a time.

  Only processes on this machine are excluded; the lock is never stale (the kernel drops it when
  its holder exits).

  Args:
    path: the lock file (created, with its folder, when missing).

  Yields:
    None, while the lock is held.
  """
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  with open(path, "a") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


LOCK_FILE = ".lock"


class InUse(ConfigError):
  """The folder is locked by another run; the message names the holder (a ConfigError)."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock, as its lock file records it.

  Attributes:
    pid: the holder's process id.
    host: the holder's host name.
    started: when it took the lock, in seconds since the epoch.
    what: what it runs (e.g. "job pretrain").
  """
  pid: int
  host: str
  started: float
  what: str

  def __str__(self) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
    return f"pid {self.pid} on host {self.host}, {self.what}, started {when}"

  def running(self) -> bool | None:
    """Whether the process still runs; None when it is on another host (it cannot be told)."""
    if self.host != socket.gethostname():
      return None
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True
    return True


def lock_path(folder: str, process_index: int = 0) -> str:
  """The lock file of `folder` for one process of a run.

  Args:
    folder: the locked folder (a workdir).
    process_index: the process's index in its run (0: `.lock`, i: `.lock.i`).

  Returns:
    The lock file's path.
  """
  name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.{process_index}"
  return os.path.join(folder, name)


def _read_holder(fd: int) -> Holder | None:
  """The holder a lock file names; None when it is empty or unreadable."""
  try:
    record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    return None if record is None else Holder(int(record["pid"]), str(record["host"]),
                                               float(record["started"]), str(record["what"]))
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _holder_words(fd: int) -> str:
  """'another run (its holder)', for the lines a refused or waiting run prints."""
  holder = None
  for _ in range(10):  # The holder may be writing its record right now.
    holder = _read_holder(fd)
    if holder is not None:
      break
    time.sleep(0.05)
  if holder is None:
    return "another run (its lock file names no holder yet)"
  gone = " (that process has exited; one it started still holds the lock)"
  return f"another run ({holder}{gone if holder.running() is False else ''})"


def _refusal(folder: str, fd: int) -> InUse:
  return InUse(f"--workdir={folder} is in use by {_holder_words(fd)}; wait for it to finish or"
               " pass another --workdir")


@contextlib.contextmanager
def hold(folder: str, what: str, *, process_index: int = 0,
         wait: bool = False) -> Iterator[Holder | None]:
  """Holds `folder`'s lock for the block; a clean release empties the lock file.

  On a filesystem without locks a warning is printed and the block runs unlocked.

  Args:
    folder: the folder to lock (it must exist).
    what: what this process runs, for the message another run gets.
    process_index: the process's index in its run (lock_path).
    wait: False: refuse at once when another run holds the lock; True: print one line naming
      the holder and wait for it to let go.

  Yields:
    This process's Holder, or None when the filesystem cannot lock.

  Raises:
    InUse: another run holds the lock (wait=False).
    ConfigError: the lock file cannot be created.
  """
  path = lock_path(folder, process_index)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise ConfigError(f"--workdir={folder}: cannot create its lock file {path}"
                      f" ({e.strerror})") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if not wait:
        raise _refusal(folder, fd) from None
      print(f"[lock] --workdir={folder} is in use by {_holder_words(fd)}: waiting for it",
            flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      print(f"[lock] warning: {path} cannot be locked on this filesystem ({e.strerror}); make"
            " sure no other run uses this workdir", flush=True)
      yield None
      return
    left = _read_holder(fd)
    if left is not None:
      print(f"[lock] taking over {path}, left by a run that ended without releasing it"
            f" ({left})", flush=True)
    holder = Holder(os.getpid(), socket.gethostname(), time.time(), what)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(dataclasses.asdict(holder)).encode(), 0)
    try:
      yield holder
    finally:
      os.ftruncate(fd, 0)  # A clean release leaves nothing for the next run to report.
  finally:
    os.close(fd)  # Drops the flock.
