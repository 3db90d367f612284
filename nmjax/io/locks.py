"""The one lock: a folder (a workdir) held by one run at a time, local or in a bucket.

A local lock is an fcntl.flock on a file in the folder: the kernel drops it when its holder exits
by any means (SIGKILL included), so a lock left by a dead process is simply taken again. A lock
file records the holder (pid, host, start time, what it runs) for the message a second run gets,
and is emptied on a clean release. Each process of a multi-process run locks its own file
(process 0: `.lock`, process i: `.lock.i`), so the processes of one run never refuse each other.

An object store has no flock: there the lock file is a lease, the holder's record plus an expiry,
renewed by a thread of the holder every third of its length (NMJAX_LEASE_SECONDS, default 120 s)
and deleted on a clean release. A lease is taken over when it expired, or when its holder ran on
this host and has exited (a killed run resumed on the same host goes on at once); a run preempted
on another host is resumed once its lease expired. Two runs starting in the same second are told
apart by reading the lease back: the one whose record is not there is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from nmjax.errors import ConfigError

from nmjax.io import paths

__all__ = ["hold", "exclusive", "InUse", "Holder", "lock_path"]


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
  """Holds a blocking lock on the file `path` for the block: one process at a time.

  A local file is flocked (processes on this machine are excluded; the lock is never stale). A
  cloud file is a lease (see the module docstring), waited for while another process holds it.

  Args:
    path: the lock file (created, with its folder, when missing).

  Yields:
    None, while the lock is held.
  """
  path = os.fspath(path)
  if paths.is_cloud(path):
    with _lease(path, path, "exclusive", wait=True):
      yield
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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
  return paths.join(folder, name)


def _parse_holder(text: bytes) -> Holder | None:
  """The holder a lock file's bytes name; None when empty or unreadable."""
  try:
    record = json.loads(text.decode() or "null")
    return None if record is None else Holder(int(record["pid"]), str(record["host"]),
                                               float(record["started"]), str(record["what"]))
  except (ValueError, KeyError, TypeError):
    return None


def _read_holder(fd: int) -> Holder | None:
  """The holder a local lock file names; None when it is empty or unreadable."""
  try:
    return _parse_holder(os.pread(fd, 4096, 0))
  except OSError:
    return None


def _holder_words(fd_or_read: int | Any) -> str:
  """'another run (its holder)', for the lines a refused or waiting run prints.

  Args:
    fd_or_read: a local lock file's descriptor, or a function reading a lease's Holder.
  """
  read = (lambda: _read_holder(fd_or_read)) if isinstance(fd_or_read, int) else fd_or_read
  holder = None
  for _ in range(10):  # The holder may be writing its record right now.
    holder = read()
    if holder is not None:
      break
    time.sleep(0.05)
  if holder is None:
    return "another run (its lock file names no holder yet)"
  gone = " (that process has exited; one it started still holds the lock)"
  return f"another run ({holder}{gone if holder.running() is False else ''})"


def _refusal(folder: str, fd_or_read: int | Any) -> InUse:
  return InUse(f"--workdir={folder} is in use by {_holder_words(fd_or_read)}; wait for it to"
               " finish or pass another --workdir")


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
  if paths.is_cloud(path):
    with _lease(path, folder, what, wait=wait) as holder:
      yield holder
    return
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


def lease_seconds() -> float:
  """How long a lease lasts without renewal (NMJAX_LEASE_SECONDS, default 120)."""
  return float(os.environ.get("NMJAX_LEASE_SECONDS", "120"))


def _read_lease(path: str) -> tuple[Holder | None, dict[str, Any]]:
  """The holder a lease object names and its whole record ({} when there is none)."""
  try:
    text = paths.read_bytes(path)
  except FileNotFoundError:
    return None, {}
  holder = _parse_holder(text)
  try:
    record = json.loads(text.decode() or "{}")
  except ValueError:
    record = {}
  return holder, record if isinstance(record, dict) else {}


def _live(holder: Holder | None, record: dict[str, Any]) -> bool:
  """Whether a lease still binds: unexpired, and not left by an exited process of this host."""
  if holder is None:
    return False
  if float(record.get("expires", 0)) < time.time():
    return False
  return holder.running() is not False


def _write_lease(path: str, holder: Holder, token: str) -> None:
  record = dict(dataclasses.asdict(holder), token=token, expires=time.time() + lease_seconds())
  with paths.open(path, "wb") as f:
    f.write(json.dumps(record).encode())


@contextlib.contextmanager
def _lease(path: str, folder: str, what: str, *, wait: bool) -> Iterator[Holder]:
  """Holds the lease object `path` (a cloud lock file) for the block; see the module docstring."""
  reader = lambda: _read_lease(path)[0]
  announced = False
  while True:
    left, record = _read_lease(path)
    if _live(left, record):
      if not wait:
        raise _refusal(folder, reader)
      if not announced:
        print(f"[lock] --workdir={folder} is in use by {_holder_words(reader)}: waiting for it",
              flush=True)
        announced = True
      time.sleep(min(5.0, lease_seconds() / 4))
      continue
    if left is not None:
      print(f"[lock] taking over {path}, left by a run that ended without releasing it"
            f" ({left})", flush=True)
    holder = Holder(os.getpid(), socket.gethostname(), time.time(), what)
    token = uuid.uuid4().hex
    _write_lease(path, holder, token)
    time.sleep(0.2)  # Another run writing at the same moment: whose record stayed decides.
    if _read_lease(path)[1].get("token") == token:
      break
    if not wait:
      raise _refusal(folder, reader)
  stop = threading.Event()

  def renew() -> None:
    while not stop.wait(lease_seconds() / 3):
      if _read_lease(path)[1].get("token") != token:
        print(f"[lock] warning: {path} was taken by another run", flush=True)
        return
      _write_lease(path, holder, token)

  thread = threading.Thread(target=renew, name="nmjax-lease", daemon=True)
  thread.start()
  try:
    yield holder
  finally:
    stop.set()
    thread.join()
    if _read_lease(path)[1].get("token") == token:
      paths.remove(path)  # A clean release leaves nothing for the next run to report.
