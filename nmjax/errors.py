"""Errors that nmjax reports to a person as one clear line (main.py prints them and exits 2), and
the environment faults (a full disk, a path that cannot be written) turned into such a line."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import traceback
from collections.abc import Iterator

EXIT_CODE = 2
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# tensorstore (orbax's array store) reports an OS error as a ValueError whose text carries the
# errno, `[os_error_code='28']`, and the file in quotes.
_STATUS_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


class NmjaxError(Exception):
  """Base class: the message is a complete, one-line explanation."""


class ConfigError(NmjaxError, ValueError):
  """A config field holds a value outside what is allowed; the message names field and choices."""


class DataError(NmjaxError):
  """A dataset is missing or malformed; the message names the file and the command that fixes it."""


class TrainingError(NmjaxError):
  """Training cannot go on (e.g. a non-finite loss); the message names the step and checkpoint."""


class Interrupted(NmjaxError):
  """The user stopped the run (Ctrl-C): what was committed is kept; the message says how to go
  on. main.py exits with `exit_code` (130, the shell's code for SIGINT)."""
  exit_code = 130


def os_error_in(error: BaseException | None, errnos: tuple[int, ...]) -> OSError | None:
  """The first OSError with one of `errnos` in the chain of `error`'s causes (libraries such as
  TFDS or orbax re-raise a full disk or a read-only folder inside their own exceptions); an
  error of tensorstore's that names an errno in its text counts as that OSError."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    found = error if isinstance(error, OSError) else _status_os_error(error)
    if found is not None and found.errno in errnos:
      return found
    error = error.__cause__ or error.__context__
  return None


def _status_os_error(error: BaseException) -> OSError | None:
  """The OSError (errno, its text, the last quoted absolute path) that a tensorstore error's
  text reports, or None."""
  try:
    text = str(error)
  except Exception:  # pylint: disable=broad-except
    return None
  match = _STATUS_ERRNO.search(text)
  if match is None:
    return None
  code = int(match.group(1))
  paths = _QUOTED_PATH.findall(text)
  return OSError(code, os.strerror(code), paths[-1] if paths else None)


def fail(message: str, code: int = EXIT_CODE) -> None:
  """Prints `error: message` (one line) on stderr and exits with `code`."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def _free_space(path: str) -> str:
  folder = os.path.dirname(os.path.abspath(path))
  while folder and not os.path.exists(folder):
    folder = os.path.dirname(folder)
  try:
    return format_bytes(shutil.disk_usage(folder).free)
  except OSError:
    return "unknown"


def format_bytes(count: float) -> str:
  """A byte count as people read it: 512 B, 1.5 KB, 3.0 MB, 12.4 GB."""
  for unit in ("B", "KB", "MB", "GB"):
    if count < 1024 or unit == "GB":
      return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
    count /= 1024
  return ""


def _under_data_dir(path: str) -> bool:
  root = os.path.abspath(os.path.expanduser(
      os.environ.get("NMJAX_DATA_DIR") or "~/.cache/nmjax"))
  return os.path.abspath(path).startswith(root + os.sep) or os.path.abspath(path) == root


def explain_os_error(error: OSError) -> str:
  """The one line for a full disk or an unwritable path, naming the path."""
  path = error.filename or error.filename2
  where = f"{path}" if path else "a file (the system did not say which)"
  if error.errno in FULL_DISK:
    free = f" ({_free_space(path)} free there)" if path else ""
    return (f"no space left on the device writing {where}{free}: {error.strerror}; free some"
            " space (or write elsewhere) and run the same command again (committed checkpoints"
            " and finished stages are kept)")
  fix = ("set NMJAX_DATA_DIR to a writable folder" if path and _under_data_dir(path) else
         "make it writable or pass another --workdir")
  return f"cannot write {where}: {error.strerror}; {fix}"


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """Exits with one line on stderr for an NmjaxError (its exit_code, default 2), a Ctrl-C (130)
  or an OSError of a full disk or an unwritable path (2); anything else propagates."""
  try:
    yield
  except NmjaxError as e:
    _debug_traceback()
    fail(str(e), getattr(e, "exit_code", EXIT_CODE))
  except KeyboardInterrupt:  # Ctrl-C outside a training loop (a loop saves, then Interrupted).
    fail("interrupted (Ctrl-C); finished results and committed checkpoints are kept; run the"
         " same command to go on", 130)
  except Exception as e:  # pylint: disable=broad-except
    fault = os_error_in(e, FULL_DISK + NOT_WRITABLE)
    if fault is None:
      raise
    _debug_traceback()
    fail(explain_os_error(fault))


def debug() -> bool:
  """Whether NMJAX_DEBUG asks for the tracebacks (and library logs) behind one-line errors."""
  return os.environ.get("NMJAX_DEBUG", "") not in ("", "0")


def _debug_traceback() -> None:
  """NMJAX_DEBUG=1: the traceback of an error nmjax reports as one line, before that line."""
  if debug():
    traceback.print_exc()
