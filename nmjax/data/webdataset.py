"""Webdataset tar shards (as img2dataset writes them) converted once into array_record, and read.

Input: tar shards (plain or compressed) of samples `KEY.jpg` (or .jpeg/.png/.webp) + `KEY.txt`
(the caption, UTF-8) [+ `KEY.json`, metadata, ignored], the format of CC3M/CC12M/YFCC15M/LAION
copies, read and checked by nmjax.data.webdataset_shards (its docstring lists the checks).

`convert(shards, output)` (the command `python -m nmjax.data.image_text convert --output DIR
SHARD...`) expands globs, sorts the shard paths (the same shards give the same indices whatever
the order named) and writes, per shard s (in that order):
  DIR/pairs-<s>.array_record     one record per converted pair: a little-endian uint32 n, then n
                                 bytes of UTF-8 JSON {"index", "key", "caption", "image_format"},
                                 then the image file's bytes as stored (not re-encoded);
  DIR/captions-<s>.array_record  the same pairs' captions alone (UTF-8), so caption noise can
                                 read another pair's caption without its image;
  DIR/manifest.json              {"format", "version", "count", "skipped": {reason: count},
                                 "shards": [{"path", "sha256", "bytes", "count", "first_index",
                                 "pairs", "captions"}]}.
`index` is global: the position of the pair over all shards in sorted order, 0..count-1. Pairs
with a key or an image and caption already converted, or an image that does not decode (or is a
decompression bomb), are skipped: printed (the first few) and counted in "skipped". A shard that
cannot be read, holds no samples or a malformed sample stops the conversion with one line
naming the shard (and the key), as do a glob that matches nothing and a conversion left without
pairs. Files are written with group_size 1 (one record per chunk: random access), uncompressed
(JPEGs do not compress). The whole folder is written as DIR.incomplete-<host>-<pid> and renamed
to DIR at the end, so a killed or refused conversion never leaves a DIR that a reader would
trust; an existing DIR is never overwritten. A later conversion into DIR removes such a folder
(saying so) when its process is no longer running on this host, or when it was made on another
host and untouched for an hour; it refuses while a conversion of this host is writing it. A full
disk or an unwritable DIR stops the conversion with one line, leaving nothing under DIR. Shards
and DIR may lie in a bucket (gs://...): each shard is then read from there, and its two files
are uploaded as soon as written, manifest.json last, so a folder without it is never read (a
conversion refuses a DIR that holds anything).

`WebdatasetPairs(DIR)` reads the result with grain's ArrayRecordDataSource (random access, so a
stream resumes exactly from index-addressed reads): records {"image": encoded bytes, "caption":
str, "key": str, "index": int64}, record i having index i. A DIR in a bucket is copied to local
disk once per host and read there (nmjax.data.locations.mirror: array_record opens local files
only).
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import shutil
import socket
import struct
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import numpy as np

from nmjax import errors
from nmjax import io as nmjax_io
from nmjax import progress
from nmjax.data import locations
from nmjax.data import webdataset_shards as shards_lib
from nmjax.errors import ConfigError, DataError

FORMAT = "nmjax-image-text"
VERSION = 1
MANIFEST = "manifest.json"
_WRITER_OPTIONS = "group_size:1,uncompressed"
_HEADER = struct.Struct("<I")
_STALE_SECONDS = 3600
_PROGRESS_SECONDS = 10.0


def encode_pair(index: int, key: str, caption: str, image: bytes, image_format: str) -> bytes:
  """One pairs-file record (see the module docstring)."""
  header = json.dumps({"index": int(index), "key": key, "caption": caption,
                       "image_format": image_format}, ensure_ascii=False).encode()
  return _HEADER.pack(len(header)) + header + image


def decode_pair(record: bytes) -> dict[str, Any]:
  """A pairs-file record -> {"image": bytes, "caption", "key", "index", "image_format"}."""
  (size,) = _HEADER.unpack_from(record)
  header = json.loads(record[_HEADER.size:_HEADER.size + size])
  header["image"] = record[_HEADER.size + size:]
  return header


def _convert_shard(shard: pathlib.Path | str, s: int, first_index: int, pairs_path: pathlib.Path,
                   captions_path: pathlib.Path, kept: shards_lib.PairFilter) -> dict[str, Any]:
  """Writes the kept pairs of shard number s into its two files; returns its manifest entry."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  pairs = array_record_module.ArrayRecordWriter(os.fspath(pairs_path), _WRITER_OPTIONS)
  captions = array_record_module.ArrayRecordWriter(os.fspath(captions_path), _WRITER_OPTIONS)
  count, key = 0, None
  try:
    try:
      with nmjax_io.open(shard, "rb") as raw:
        reader = shards_lib.HashingReader(raw)
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
          for key, files in shards_lib.samples(tar, shard):
            caption, image, extension = shards_lib.checked_sample(shard, key, files)
            if kept.keep(s, key, caption, image, extension):
              pairs.write(encode_pair(first_index + count, key, caption, image, extension))
              captions.write(caption.encode())
              count += 1
        reader.drain()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      if errors.os_error_in(e, errors.FULL_DISK):
        raise  # Writing, not reading: convert says so.
      where = f" after key {key}" if key is not None else ""
      raise DataError(f"shard {shard} is not a readable tar file{where} "
                      f"({type(e).__name__}: {e})") from None
  finally:
    pairs.close()
    captions.close()
  return {"path": os.fspath(shard), "sha256": reader.sha256.hexdigest(), "bytes": reader.bytes,
          "count": count, "first_index": first_index, "pairs": pairs_path.name,
          "captions": captions_path.name}


def _host() -> str:
  """This host's name as a folder name takes it."""
  return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _remove_leftovers(output: pathlib.Path, stream: TextIO) -> None:
  """Removes the OUTPUT.incomplete-HOST-PID folders of conversions that stopped, one line each:
  of this host when process PID is not running, of another host when untouched for an hour
  (each shard written touches it). Refuses while a conversion of this host writes one."""
  for folder in output.parent.glob(f"{glob.escape(output.name)}.incomplete-*"):
    host, _, pid = folder.name[len(output.name) + len(".incomplete-"):].rpartition("-")
    if not folder.is_dir():
      continue
    if host == _host() and pid.isdigit():
      holder = nmjax_io.Holder(int(pid), socket.gethostname(), 0.0, "convert")
      if int(pid) != os.getpid() and holder.running():
        raise ConfigError(f"another conversion (process {pid} on this host) is writing --output"
                          f" {output} (into {folder}); wait for it to finish, or stop it (if"
                          f" none runs, delete {folder})")
      why = f"process {pid} on this host is not running"
    elif time.time() - folder.stat().st_mtime > _STALE_SECONDS:
      why = f"made on {host or 'an unnamed host'}, untouched for over an hour"
    else:
      continue
    shutil.rmtree(folder, ignore_errors=True)
    print(f"convert: removed {folder}, left by a conversion that stopped ({why})", file=stream,
          flush=True)


def _prepare_output(output: pathlib.Path, stream: TextIO) -> pathlib.Path:
  """Checks that `output` may be written; returns the temporary folder to write instead."""
  if (output / MANIFEST).exists():
    raise DataError(f"{output} already holds a conversion ({output / MANIFEST}); read it as it "
                    f"is, or delete it (or choose another --output) to convert again")
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise DataError(f"--output {output} exists and is not an empty folder; choose another")
  output.parent.mkdir(parents=True, exist_ok=True)
  _remove_leftovers(output, stream)
  tmp = output.parent / f"{output.name}.incomplete-{_host()}-{os.getpid()}"
  tmp.mkdir()
  return tmp


def _check_bucket_output(output: str) -> None:
  """Checks that the bucket folder `output` may be written (it holds nothing)."""
  try:
    names = nmjax_io.listdir(output)
  except FileNotFoundError:
    return
  if MANIFEST in names:
    raise DataError(f"{output} already holds a conversion ({output}/{MANIFEST}); read it as it "
                    f"is, or delete it (or choose another --output) to convert again")
  if names:
    raise DataError(f"--output {output} is not empty (a conversion stopped while uploading "
                    f"leaves files without {MANIFEST}); delete it or choose another")


def _convert_all(paths: Sequence[pathlib.Path | str], tmp: pathlib.Path, stream: TextIO,
                 bucket: str | None) -> dict[str, Any]:
  """Converts every shard into tmp (each uploaded to `bucket` and removed from tmp, when given),
  printing progress; returns the manifest."""
  countdown = progress.Countdown(len(paths))
  kept = shards_lib.PairFilter(paths, stream)
  entries, total, last_line = [], 0, 0.0
  for s, shard in enumerate(paths):
    entry = _convert_shard(shard, s, total, tmp / f"pairs-{s:05d}.array_record",
                           tmp / f"captions-{s:05d}.array_record", kept)
    if bucket is not None:
      for name in (entry["pairs"], entry["captions"]):
        nmjax_io.upload(tmp / name, nmjax_io.join(bucket, name))
        os.remove(tmp / name)
    entries.append(entry)
    total += entry["count"]
    countdown.done()
    if s in (0, len(paths) - 1) or time.perf_counter() - last_line > _PROGRESS_SECONDS:
      last_line = time.perf_counter()
      rate = total / max(countdown.elapsed(), 1e-9)
      print(f"convert: shard {s + 1}/{len(paths)} ({os.path.basename(shard)}) | {total:,} "
            f"pairs, {rate:,.0f} pairs/s | {countdown.line()}", file=stream, flush=True)
  if not total:
    raise DataError(f"no pairs left to convert from {len(paths)} shard(s): "
                    f"{shards_lib.skipped_words(kept.skipped)} (the lines above name them)")
  return {"format": FORMAT, "version": VERSION, "count": total, "skipped": kept.skipped,
          "shards": entries}


def _free(path: pathlib.Path | str) -> str:
  """The free space of the disk holding `path` (or its nearest existing folder)."""
  folder = os.fspath(path)
  while folder and not os.path.isdir(folder) and os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
  try:
    return f"{shutil.disk_usage(folder).free / 1e9:.1f} GB"
  except OSError:
    return "unknown"


def _writing_fault(error: Exception, output: pathlib.Path | str, tmp: pathlib.Path | None,
                   bucket: bool) -> errors.NmjaxError | None:
  """The one line for a full disk or an unwritable folder met writing `output` (through the
  local folder `tmp`); None for any other error."""
  full = errors.os_error_in(error, errors.FULL_DISK) is not None or (
      isinstance(error, RuntimeError)  # array_record's writer says it in words.
      and any(os.strerror(number) in str(error) for number in errors.FULL_DISK))
  if full:
    where = f"{tmp} (the local staging folder for {output})" if bucket else output
    left = "nothing of it is kept: free some space"
    if bucket and nmjax_io.exists(output):
      left = (f"delete {output} (what was uploaded is never read without {MANIFEST}), free some"
              f" space")
    return errors.NmjaxError(
        f"no space left on the device writing {where} ({_free(tmp or output)} free there); "
        f"{left} (the conversion takes about as much as the shards) or choose another --output,"
        f" and run the same command again")
  denied = errors.os_error_in(error, errors.NOT_WRITABLE)
  if denied is not None:
    path = os.fspath(denied.filename or output)
    folder = path if os.path.isdir(path) else os.path.dirname(path)  # Where it was created.
    return errors.NmjaxError(f"cannot write --output {output}: {denied.strerror} ({path}); "
                             f"make {folder} writable or choose another --output")
  return None


def convert(shards: Sequence[str], output: str | os.PathLike, *,
            stream: TextIO | None = None) -> dict[str, Any]:
  """Converts webdataset tar shards into array_record under `output`; returns the manifest.

  shards: tar paths or globs (webdataset_shards.expand_shards), local or in a bucket. output: a
  local folder, or a bucket folder (gs://...), to which each shard's two files are uploaded as
  they are written, then manifest.json last (what makes a reader trust the folder). A progress
  line with the pairs converted, the rate and an ETA is printed to `stream` (default stdout)
  after the first shard and then at most every 10 s, and at the end; skipped pairs too. Raises
  DataError (one line naming shard and key) on bad input, NmjaxError on a full disk or an
  unwritable --output; no manifest is written under `output` then (nothing at all, locally).
  """
  stream = stream or sys.stdout
  paths = shards_lib.expand_shards(shards)
  bucket = nmjax_io.absolute(output) if nmjax_io.is_cloud(output) else None
  if bucket is None:
    output = pathlib.Path(output).expanduser().resolve()
  else:
    _check_bucket_output(bucket)
  tmp = None
  try:
    tmp = (_prepare_output(output, stream) if bucket is None
           else pathlib.Path(tempfile.mkdtemp(prefix="nmjax-convert-")))
    manifest = _convert_all(paths, tmp, stream, bucket)
    _commit(manifest, output, tmp, bucket)
  except (OSError, RuntimeError) as e:
    fault = _writing_fault(e, bucket or output, tmp, bucket is not None)
    if fault is None:
      raise
    raise fault from e
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _commit(manifest: dict[str, Any], output: pathlib.Path, tmp: pathlib.Path,
            bucket: str | None) -> None:
  """Writes manifest.json: into the bucket folder, or into tmp, then renamed to `output`."""
  text = json.dumps(manifest, indent=1) + "\n"
  if bucket is not None:
    nmjax_io.write_text(nmjax_io.join(bucket, MANIFEST), text)
    return
  (tmp / MANIFEST).write_text(text)
  try:
    if output.exists():
      output.rmdir()  # Checked empty above.
    os.rename(tmp, output)
  except OSError as e:
    if errors.os_error_in(e, errors.FULL_DISK + errors.NOT_WRITABLE):
      raise
    raise DataError(f"--output {output} was filled by another process while converting "
                    f"({e.strerror}); read that one, or delete it and convert again") from None


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
  """The manifest of a converted folder (local or in a bucket), checked; DataError naming the
  convert command if not."""
  cloud = nmjax_io.is_cloud(directory)
  directory = nmjax_io.absolute(directory) if cloud else pathlib.Path(directory)
  path = nmjax_io.join(directory, MANIFEST)
  fix = (f"convert the shards first: python -m nmjax.data.image_text convert --output "
         f"{directory} 'SHARDS/*.tar'")
  try:
    manifest = json.loads(nmjax_io.read_text(path))
  except FileNotFoundError:
    raise DataError(f"{directory} holds no converted image-text pairs (no {MANIFEST}); "
                    f"{fix}") from None
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read {path} ({type(e).__name__}); delete {directory} and {fix}"
                    ) from None
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise DataError(f"{path} is not an {FORMAT} version {VERSION} manifest; delete {directory} "
                    f"and {fix}")
  stored = set(nmjax_io.listdir(directory)) if cloud else None
  for entry in manifest["shards"]:
    for name in (entry["pairs"], entry["captions"]):
      if not (name in stored if cloud else (directory / name).is_file()):
        raise DataError(f"{nmjax_io.join(directory, name)} is missing; delete {directory} and "
                        f"{fix}")
  return manifest


class WebdatasetPairs(Sequence):
  """Random-access image-text pairs of a converted folder (see the module docstring).

  Records are {"image": encoded bytes, "caption": str, "key": str, "index": int64}; `caption(i)`
  and `captions(indices)` read captions alone. Picklable, so grain can ship it to workers.
  """

  def __init__(self, directory: str | os.PathLike):
    import grain  # pylint: disable=g-import-not-at-top
    cloud = nmjax_io.is_cloud(directory)
    self.directory = nmjax_io.absolute(directory) if cloud else pathlib.Path(directory)
    self.manifest = read_manifest(self.directory)
    # A bucket folder is read from its local copy (array_record opens local files only).
    local = pathlib.Path(locations.mirror(self.directory, what="image-text pairs"))
    shards = self.manifest["shards"]
    self._pairs = grain.sources.ArrayRecordDataSource(
        [os.fspath(local / e["pairs"]) for e in shards])
    self._captions = grain.sources.ArrayRecordDataSource(
        [os.fspath(local / e["captions"]) for e in shards])
    if not len(self._pairs) == len(self._captions) == self.manifest["count"]:
      raise DataError(f"{self.directory} holds {len(self._pairs)} pairs and "
                      f"{len(self._captions)} captions but its manifest says "
                      f"{self.manifest['count']}; delete it and convert the shards again")

  def __len__(self) -> int:
    return self.manifest["count"]

  def _example(self, record: bytes, position: int) -> dict[str, Any]:
    pair = decode_pair(record)
    if pair["index"] != position:
      raise DataError(f"{self.directory}: record {position} holds index {pair['index']}; "
                      f"delete it and convert the shards again")
    return {"image": pair["image"], "caption": pair["caption"], "key": pair["key"],
            "index": np.int64(position)}

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self._example(self._pairs[int(i)], int(i))

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    return [self._example(r, i) for r, i in zip(self._pairs.__getitems__(indices), indices)]

  def caption(self, i: int) -> str:
    return self._captions[int(i)].decode()

  def captions(self, indices: Iterable[int]) -> list[str]:
    return [c.decode() for c in self._captions.__getitems__([int(i) for i in indices])]
