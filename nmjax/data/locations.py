"""Where nmjax's data is: the data root (a local folder or a bucket), local copies of bucket data
for readers that open local files only, and the prepared TFDS builder under a TFDS data_dir.

array_record's reader (grain's ArrayRecordDataSource, TFDS's as_data_source) opens local files
only, so data under a bucket path (`--config.data_dir=gs://...`, `array_record:gs://...`) is
copied to local disk once per host and read from there: nmjax.io.local_mirror puts it under
$NMJAX_CACHE_DIR/mirror/<scheme>/<bucket>/...; a copy takes its object's modification time and
is kept while size and time match (an object written again is copied again), and `mirror` says
in one line on stderr what it copies (files, bytes, where) whenever it copies anything.

Of a TFDS data_dir in a bucket only what the requested dataset needs is copied
(`prepared_builder`): the small files of <tfds_dir>/<dataset> (dataset_info.json,
features.json, label files: what tfds.builder reads to pick the version; `tfds_metadata`), then
the one version folder the builder reads.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import posixpath
import re
import sys
from typing import Any

from nmjax import io as nmjax_io
from nmjax.errors import DataError, format_bytes
from nmjax.io import paths as io_paths

# TFDS record shards: <dataset>-<split>.<format>-00000-of-00008.
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def data_root(data_dir: str | os.PathLike | None = None) -> pathlib.Path | str:
  """Root of nmjax's data: data_dir if given, else $NMJAX_DATA_DIR, else ~/.cache/nmjax.

  Args:
    data_dir: a local folder or a bucket path (gs://...); None or "" for the default.

  Returns:
    The local root as a pathlib.Path, or a bucket root as a str (nmjax.io.absolute).
  """
  root = data_dir or os.environ.get("NMJAX_DATA_DIR") or "~/.cache/nmjax"
  if nmjax_io.is_cloud(root):
    return nmjax_io.absolute(root)
  return pathlib.Path(root).expanduser()


def fashion_mnist_raw_dir() -> pathlib.Path:
  """Folder of the Fashion-MNIST IDX .gz files: $NMJAX_FASHION_MNIST_DIR or the Debian path."""
  return pathlib.Path(
      os.environ.get("NMJAX_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")


def under(root: pathlib.Path | str, *parts: str) -> pathlib.Path | str:
  """root / parts: a pathlib.Path under a local root, a joined str under a bucket root."""
  if nmjax_io.is_cloud(root):
    return nmjax_io.join(root, *parts)
  return pathlib.Path(root).joinpath(*parts)


def local_path(path: str) -> str:
  """Where nmjax.io.local_mirror puts the copy of the bucket path `path`."""
  _, inner = io_paths.filesystem(path)
  scheme = path.split("://", 1)[0].lower()
  return os.path.join(io_paths.mirror_root(), scheme, *inner.strip("/").split("/"))


def _modified(info: dict[str, Any]) -> float | None:
  """An object's modification time (seconds) from its listing, where the store gives one."""
  value = info.get("mtime") or info.get("LastModified")
  if isinstance(value, datetime.datetime):
    return value.timestamp()
  return float(value) if isinstance(value, (int, float)) else None


def _objects(path: str) -> dict[str, tuple[str, int, float | None]]:
  """{object: (its local copy's path, size, modification time)} of every file under a bucket
  path; objects are named scheme://bucket/..., as `path`."""
  fs, inner = io_paths.filesystem(path)
  try:
    found = fs.find(inner, detail=True)
  except FileNotFoundError:  # No such bucket: nothing stored there.
    found = {}
  except OSError as e:
    raise DataError(f"cannot list {path} ({type(e).__name__}: {e})") from None
  scheme, local, root = path.split("://", 1)[0], local_path(path), inner.strip("/")
  return {f"{scheme}://{name}": (
      os.path.join(local, *posixpath.relpath(name, root).split("/")) if name != root else local,
      int(info["size"]), _modified(info))
      for name, info in found.items() if info.get("type") != "directory"}


def _is_copy(local: str, size: int, modified: float | None) -> bool:
  """Whether `local` is the copy of an object of this size and modification time: a copy is
  given the object's time, so an object written again with the same size is copied again."""
  try:
    stat = os.stat(local)
  except FileNotFoundError:
    return False
  return stat.st_size == size and (modified is None or abs(stat.st_mtime - modified) < 1e-3)


def _fetch(path: str, objects: dict[str, tuple[str, int, float | None]]) -> str:
  """nmjax.io.local_mirror(path) after removing the local files that are not copies of
  `objects`, whose times their copies then take."""
  for local, size, modified in objects.values():
    if os.path.exists(local) and not _is_copy(local, size, modified):
      os.remove(local)
  copy = nmjax_io.local_mirror(path)
  for local, size, modified in objects.values():
    if modified is not None:
      try:
        os.utime(local, (modified, modified))
      except OSError:
        pass  # Removed meanwhile by another process refreshing it: copied again next time.
  return copy


def mirror(path: str | os.PathLike, *, what: str) -> str:
  """A local copy of a bucket folder (nmjax.io.local_mirror), said in one line on stderr when
  anything is copied: `path` itself when local. A local file is kept when its size and time are
  those of the object it copies.

  Args:
    path: a local or bucket folder.
    what: what the folder holds, for the line (e.g. "TFDS dataset 'imagenet2012'").

  Returns:
    The local folder.

  Raises:
    DataError: the bucket folder holds nothing (naming it) or cannot be listed.
  """
  path = os.fspath(path)
  if not nmjax_io.is_cloud(path):
    return path
  path = nmjax_io.absolute(path)
  objects = _objects(path)
  if not objects:
    raise DataError(f"{path} does not exist (nothing is stored under it); check the path, "
                    f"or copy {what} there first")
  pending = [size for local, size, modified in objects.values()
             if not _is_copy(local, size, modified)]
  if pending:
    kept = len(objects) - len(pending)
    print(f"[nmjax] copying {what} from {path} to {local_path(path)} ({len(pending)} files, "
          f"{format_bytes(sum(pending))}{f'; {kept} already there' if kept else ''}), once on this "
          f"host: array_record reads local files only", file=sys.stderr, flush=True)
  return _fetch(path, objects)


def tfds_metadata(tfds_dir: pathlib.Path | str, name: str) -> pathlib.Path | str:
  """The TFDS data_dir on which tfds.builder(name) finds its dataset: tfds_dir itself when
  local; for a bucket, a local copy of the small files of <tfds_dir>/<dataset> (every version
  and config: dataset_info.json, features.json, label files), record shards left out.

  Args:
    tfds_dir: a local or bucket TFDS data_dir.
    name: a TFDS name, "dataset[/config][:version]".

  Returns:
    The local TFDS data_dir.
  """
  if not nmjax_io.is_cloud(tfds_dir):
    return tfds_dir
  folder = nmjax_io.join(tfds_dir, name.split(":")[0].split("/")[0])
  for file, copy in sorted(_objects(folder).items()):
    if not _SHARD.search(file) and not _is_copy(*copy):
      _fetch(file, {file: copy})
  local = local_path(tfds_dir)
  os.makedirs(local, exist_ok=True)
  return local


def cloud_path(local: str | os.PathLike, local_root: pathlib.Path | str,
               cloud_root: pathlib.Path | str) -> str:
  """The bucket path whose copy under local_root is `local` (`local` itself where cloud_root is
  local, or where `local` lies outside local_root)."""
  local = os.fspath(local)
  if not nmjax_io.is_cloud(cloud_root):
    return local
  relative = os.path.relpath(local, local_root)
  if relative.startswith(os.pardir):
    return local
  return nmjax_io.join(cloud_root, *relative.split(os.sep))


def newest_version(config_dir: str) -> str | None:
  """The newest <config_dir>/<x.y.z> of a bucket holding a dataset_info.json, or None."""
  fs, inner = io_paths.filesystem(config_dir)
  found = fs.glob(posixpath.join(inner, "*", "dataset_info.json"))
  versions = [posixpath.basename(posixpath.dirname(f)) for f in found]
  versions = [v for v in versions if _VERSION.match(v)]
  if not versions:
    return None
  return nmjax_io.join(config_dir, max(versions, key=lambda v: tuple(map(int, v.split(".")))))


def prepared_builder(name: str, tfds_dir: pathlib.Path | str, *, unknown: Exception,
                     manual_download: str | None = None) -> Any:
  """The TFDS builder of dataset `name` under tfds_dir, checked to be prepared as array_record.

  Raises `unknown` for a name TFDS does not know, else DataError naming the command that
  prepares the dataset (or converts it to array_record). manual_download says what to put in
  MANUAL_DIR for a dataset TFDS cannot download itself (ImageNet's tar files); without it the
  command is a plain `tfds build` on a machine with internet. Nothing is ever downloaded here.
  A tfds_dir in a bucket is read from a local copy of what the dataset needs (tfds_metadata):
  its metadata, then the version folder the builder reads; messages name the bucket paths.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  local_dir = tfds_metadata(tfds_dir, name)
  try:
    builder = tfds.builder(name, data_dir=os.fspath(local_dir))
  except tfds.core.DatasetNotFoundError:
    raise unknown from None
  version_dir = cloud_path(builder.data_dir, local_dir, tfds_dir)
  cloud = nmjax_io.is_cloud(tfds_dir)
  build_dir = "DIR" if cloud else tfds_dir  # A bucket's data is prepared locally, then copied.
  copy = f"copy DIR/{builder.name} to {tfds_dir}/{builder.name}"
  if manual_download is None:
    build_hint = (f"prepare it on a machine with internet: tfds build {name} "
                  f"--data_dir={build_dir} --file_format=array_record, then "
                  + (copy if cloud else f"copy {tfds_dir}/{builder.name} here"))
  else:
    build_hint = (f"{manual_download} into MANUAL_DIR, then: tfds build {name} "
                  f"--manual_dir=MANUAL_DIR --data_dir={build_dir} --file_format=array_record"
                  + (f", then {copy}" if cloud else ""))
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {name!r} is not prepared in {tfds_dir} (no "
                    f"{version_dir}); {build_hint}")
  random_access = {tfds.core.FileFormat.ARRAY_RECORD}
  if not builder.info.available_file_formats() & random_access:
    raise DataError(
        f"TFDS dataset {name!r} in {version_dir} is stored as "
        f"{builder.info.file_format.value}, which has no random access; fix: tfds convert_format "
        f"--dataset_version_dir={version_dir} --out_file_format=array_record, or {build_hint}")
  mirror(version_dir, what=f"TFDS dataset {name!r}")
  return builder
