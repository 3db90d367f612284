"""The report room: rows -> JSON lines, markdown tables, PNG plots and TensorBoard scalars, and
the one atomic writer every result, cache and checkpoint-side file goes through."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """A temporary name beside `path` (same extension) to write; renamed onto `path` only when the
  block finishes, removed when it fails: a kill never leaves a torn file under the final name."""
  path = os.fspath(path)
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{os.getpid()}{ext}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def write_json(path: str | os.PathLike, record: Any) -> None:
  write_text(path, json.dumps(record, indent=1, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
  write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
