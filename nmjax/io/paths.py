"""Paths that may be local or in a bucket: the one layer every workdir, cache and data path uses.

A path with a scheme (`gs://bucket/run`, `s3://...`, any protocol fsspec knows, `memory://` in
tests) goes through fsspec (gcsfs for `gs://`, installed by `pip install 'nmjax[cloud]'`); any
other path is a local path and keeps the os module's behaviour exactly. Object stores have no
folders: `makedirs` is a no-op there, and a folder exists once something is written under it.

A bucket emulator is reached the way the clients document: `STORAGE_EMULATOR_HOST` for gcsfs,
`TENSORSTORE_GCS_HTTP_URL` for orbax's array store.
"""

from __future__ import annotations

import builtins
import logging
import os
import posixpath
import re
import shutil
from typing import IO, Any

from nmjax.errors import ConfigError

__all__ = ["is_cloud", "absolute", "join", "exists", "isdir", "isfile", "listdir", "makedirs",
           "open", "read_text", "read_bytes", "remove", "rmtree", "getsize", "upload",
           "local_mirror", "filesystem"]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_cloud(path: str | os.PathLike) -> bool:
  """Whether `path` names a store other than the local disk (`gs://...`; not `file://`).

  Args:
    path: any path.

  Returns:
    True for a path with a scheme other than `file`.

  Examples:
    >>> from nmjax import io
    >>> io.is_cloud("gs://bucket/run"), io.is_cloud("runs/a"), io.is_cloud("file:///tmp/a")
    (True, False, False)
  """
  match = _SCHEME.match(os.fspath(path))
  return bool(match) and match.group(1).lower() != "file"


def absolute(path: str | os.PathLike) -> str:
  """`path` made absolute: os.path.abspath for a local path, a bucket path without trailing '/'.

  Args:
    path: a local or cloud path.

  Returns:
    The absolute local path, or the cloud path as given (its scheme kept).
  """
  path = os.fspath(path)
  if is_cloud(path):
    return path.rstrip("/") if not path.endswith("://") else path
  if path.startswith("file://"):
    path = path[len("file://"):]
  return os.path.abspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
  """Joins path parts with '/' (os.path.join for local paths)."""
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_cloud(path) else os.path.join(path, *parts)


class _QuietBucketProbe(logging.Filter):
  """Drops gcsfs's warning that it could not ask for a bucket's type without credentials (an
  emulator, or a public bucket): it then uses the plain client, which is what nmjax needs."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Could not determine bucket type" not in record.getMessage()


def filesystem(path: str) -> tuple[Any, str]:
  """The fsspec filesystem for a cloud path and the path as that filesystem names it.

  Args:
    path: a cloud path (is_cloud).

  Returns:
    (filesystem, path inside it).

  Raises:
    ConfigError: the scheme's client is not installed (one line saying what to install).
  """
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    from fsspec import config as fsspec_config  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f"{path}: cloud paths need fsspec; pip install 'nmjax[cloud]'") from None
  scheme = _SCHEME.match(path).group(1).lower()
  if scheme in ("gs", "gcs"):
    # Listings are read fresh: other processes and hosts write the same workdir.
    for name in ("gs", "gcs"):
      conf = fsspec_config.conf.setdefault(name, {})
      conf.setdefault("use_listings_cache", False)
      if os.environ.get("STORAGE_EMULATOR_HOST"):  # An emulator takes no credentials.
        conf.setdefault("token", "anon")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
      # An emulator speaks the JSON API only: gcsfs's bucket-type probe (gRPC) is left out.
      os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    for name in ("gcsfs", "gcsfs.extended_gcsfs"):
      logging.getLogger(name).addFilter(_QUIET)
  try:
    return fsspec.core.url_to_fs(path)
  except (ImportError, ValueError) as e:
    extra = " (pip install 'nmjax[cloud]')" if scheme in ("gs", "gcs") else ""
    raise ConfigError(f"{path}: no client for {scheme}:// paths{extra}: {e}") from None


_QUIET = _QuietBucketProbe()


def _ask(path: str | os.PathLike, local: Any, method: str) -> bool:
  """local(path) for a local path, else the filesystem's `method` (exists, isdir, isfile)."""
  path = os.fspath(path)
  if not is_cloud(path):
    return local(path)
  fs, inner = filesystem(path)
  return getattr(fs, method)(inner)


def exists(path: str | os.PathLike) -> bool:
  """os.path.exists for local and cloud paths (a cloud folder exists when it holds a file)."""
  return _ask(path, os.path.exists, "exists")


def isdir(path: str | os.PathLike) -> bool:
  """os.path.isdir for local and cloud paths (a cloud folder: a prefix holding files)."""
  return _ask(path, os.path.isdir, "isdir")


def isfile(path: str | os.PathLike) -> bool:
  """os.path.isfile for local and cloud paths."""
  return _ask(path, os.path.isfile, "isfile")


def listdir(path: str | os.PathLike) -> list[str]:
  """The names in a folder, sorted (os.listdir; FileNotFoundError when it does not exist).

  Args:
    path: a local or cloud folder.

  Returns:
    The names of its files and folders.

  Raises:
    FileNotFoundError: the folder does not exist (a cloud prefix holding nothing).
  """
  path = os.fspath(path)
  if not is_cloud(path):
    return sorted(os.listdir(path))
  fs, inner = filesystem(path)
  try:
    entries = fs.ls(inner, detail=False)
  except FileNotFoundError:
    raise FileNotFoundError(2, "No such file or directory", path) from None
  names = sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})
  if not names and not fs.isdir(inner):
    raise FileNotFoundError(2, "No such file or directory", path)
  return names


def makedirs(path: str | os.PathLike) -> None:
  """os.makedirs(exist_ok=True) for a local path; nothing for a cloud path (no folders there)."""
  path = os.fspath(path)
  if not is_cloud(path):
    os.makedirs(path, exist_ok=True)


def open(path: str | os.PathLike, mode: str = "r", **kwargs: Any) -> IO[Any]:  # pylint: disable=redefined-builtin
  """builtins.open for a local path; the cloud object opened through fsspec otherwise.

  A cloud object opened for writing appears whole when the file is closed, or not at all.
  """
  path = os.fspath(path)
  if not is_cloud(path):
    return builtins.open(path, mode, **kwargs)
  fs, inner = filesystem(path)
  return fs.open(inner, mode, **kwargs)


def read_text(path: str | os.PathLike) -> str:
  """The text of a local or cloud file."""
  with open(path) as f:
    return f.read()


def read_bytes(path: str | os.PathLike) -> bytes:
  """The bytes of a local or cloud file."""
  with open(path, "rb") as f:
    return f.read()


def getsize(path: str | os.PathLike) -> int:
  """os.path.getsize for local and cloud files."""
  path = os.fspath(path)
  if not is_cloud(path):
    return os.path.getsize(path)
  fs, inner = filesystem(path)
  return int(fs.size(inner))


def remove(path: str | os.PathLike) -> None:
  """Removes one file (FileNotFoundError when it is missing)."""
  path = os.fspath(path)
  if not is_cloud(path):
    os.remove(path)
    return
  fs, inner = filesystem(path)
  if not fs.isfile(inner):
    raise FileNotFoundError(2, "No such file or directory", path)
  fs.rm_file(inner)


def rmtree(path: str | os.PathLike) -> None:
  """Removes a folder and everything under it; nothing when it does not exist."""
  path = os.fspath(path)
  if not is_cloud(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs, inner = filesystem(path)
  if fs.exists(inner):
    fs.rm(inner, recursive=True)


def upload(local: str | os.PathLike, path: str | os.PathLike) -> None:
  """Copies a local file or folder (recursively) to `path`, local or cloud; files there are
  replaced.

  Args:
    local: a local file or folder.
    path: where its copy goes.
  """
  local, path = os.fspath(local), os.fspath(path)
  if not is_cloud(path):
    if os.path.isdir(local):
      shutil.copytree(local, path, dirs_exist_ok=True)
    else:
      makedirs(os.path.dirname(path) or ".")
      shutil.copyfile(local, path)
    return
  fs, inner = filesystem(path)
  if os.path.isdir(local):
    for parent, _, names in os.walk(local):
      for name in names:
        rel = os.path.relpath(os.path.join(parent, name), local).replace(os.sep, "/")
        fs.put_file(os.path.join(parent, name), posixpath.join(inner, rel))
  else:
    fs.put_file(local, inner)


def mirror_root() -> str:
  """The local folder holding copies of cloud data ($NMJAX_CACHE_DIR/mirror)."""
  cache = os.environ.get("NMJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "nmjax")
  return os.path.join(cache, "mirror")


def local_mirror(path: str | os.PathLike) -> str:
  """A local path with the contents of `path`: `path` itself when local, else a copy of the cloud
  file or folder under mirror_root(), fetched once (a file whose size matches is kept).

  For readers that only open local files (array_record's reader): data in a bucket is copied
  to local disk once per host, then read from there.

  Args:
    path: a local or cloud file or folder.

  Returns:
    The local file or folder.

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  path = os.fspath(path)
  if not is_cloud(path):
    return path
  fs, inner = filesystem(path)
  scheme = _SCHEME.match(path).group(1).lower()
  local = os.path.join(mirror_root(), scheme, *inner.strip("/").split("/"))
  if fs.isfile(inner):
    files = {inner: fs.size(inner)}
    target = {inner: local}
  else:
    found = fs.find(inner, detail=True)
    if not found:
      raise FileNotFoundError(2, "No such file or directory", path)
    files = {name: info["size"] for name, info in found.items() if info.get("type") != "directory"}
    target = {name: os.path.join(local, *posixpath.relpath(name, inner.strip("/")).split("/"))
              for name in files}
  for name, size in files.items():
    dest = target[name]
    if os.path.isfile(dest) and os.path.getsize(dest) == size:
      continue
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp{os.getpid()}"
    fs.get_file(name, tmp)
    os.replace(tmp, dest)
  return local
