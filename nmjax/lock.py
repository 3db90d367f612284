"""Workdir locks: one writing run per workdir (or per folder inside one) at a time.

A lock is an fcntl.flock on a file in the folder. The kernel drops it when its holder exits, by
any means (SIGKILL included), so a lock left by a dead process is simply taken again. The file
records the holder (pid, host, start time, what it runs) for the message a second run gets; it is
emptied on a clean release, so a file that still names someone when its lock is free was left
by a run that died. Each process of a multi-process run locks its own file (process 0: `.lock`,
process i: `.lock.i`), so the processes of one run never refuse each other, and a second run
started with the same command is refused in every process.
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

from nmjax.errors import ConfigError

LOCK_FILE = ".lock"


class InUse(ConfigError):
  """The folder is locked by another run; the message names the holder."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock: process id, host, start time (seconds since the epoch) and its job."""
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
  """The lock file of `folder` for one process of a run."""
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
  """Holds `folder`'s lock for the block (folder must exist); yields this process's Holder.

  Raises InUse at once when another run holds it, or with wait=True prints one line naming the
  holder and waits for it to let go. On a filesystem without locks a warning is printed and the
  block runs unlocked (yields None).
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
