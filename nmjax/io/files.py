"""The one atomic writer every result, cache and checkpoint-side file goes through.

A local file is written under a temporary name beside the target and renamed onto it only when
whole, so a kill never leaves a torn file under the final name. A cloud file (nmjax.io.paths) is
written to a local temporary file and uploaded as one object when whole: an object store shows a
finished upload or nothing, never part of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from nmjax.io import paths

__all__ = ["atomic_path", "write_text", "write_bytes", "write_json", "write_jsonl",
           "append_line"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """A temporary local name to write, put onto `path` only when the block finishes.

  For a local `path` the temporary file lies beside it (same extension) and is renamed onto it;
  for a cloud `path` it lies in the local temp folder and is uploaded as one object. The
  temporary file is removed when the block fails, so a kill never leaves a torn file under the
  final name.

  Args:
    path: the file to write (local or cloud).

  Yields:
    The temporary local path to write inside the block.

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
  cloud = paths.is_cloud(path)
  if cloud:
    fd, tmp = tempfile.mkstemp(prefix="nmjax-upload-", suffix=ext)
    os.close(fd)
  else:
    tmp = f"{root}.tmp{os.getpid()}{ext}"
  try:
    yield tmp
    if cloud:
      paths.upload(tmp, path)
    else:
      os.replace(tmp, path)
  except OSError as e:
    # A write that fails (a full disk) carries no file name: name the file it was for.
    if e.filename is None or e.filename == tmp:
      e.filename = path
    raise
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (atomic_path): the whole file or none of it.

  Args:
    path: the file to write (a local file's folder must exist).
    data: the file's new contents.

  Raises:
    OSError: the file cannot be written (naming `path`).
  """
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (atomic_path): the whole file or none of it.

  Args:
    path: the file to write (a local file's folder must exist).
    text: the file's new contents.

  Raises:
    OSError: the file cannot be written (naming `path`).
  """
  write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, record: Any) -> None:
  """Writes `record` as indented JSON (values JSON lacks as their str()) atomically.

  Args:
    path: the file to write (a local file's folder must exist).
    record: any JSON-serializable value.

  Raises:
    OSError: the file cannot be written (naming `path`).
  """
  write_text(path, json.dumps(record, indent=1, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
  """Writes `rows` as JSON lines, one per row, atomically.

  Args:
    path: the file to write (a local file's folder must exist).
    rows: the records, each JSON-serializable.

  Raises:
    OSError: the file cannot be written (naming `path`).
  """
  write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_line(path: str | os.PathLike, row: dict[str, Any]) -> None:
  """Appends one JSON line whole or not at all (a full disk never leaves a torn line).

  The file is rewritten with the line added (object stores have no append).

  Args:
    path: the JSON-lines file (created when missing; a local file's folder must exist).
    row: the record to append, JSON-serializable.

  Raises:
    OSError: the file cannot be written (naming `path`).
  """
  existing = paths.read_text(path) if paths.exists(path) else ""
  write_text(path, existing + json.dumps(row) + "\n")
