"""Webdataset tar shards (as img2dataset writes them) converted once into array_record, and read.

Input: tar shards (plain or compressed) of samples `KEY.jpg` (or .jpeg/.png/.webp) + `KEY.txt`
(the caption, UTF-8) [+ `KEY.json`, metadata, ignored], the format of CC3M/CC12M/YFCC15M/LAION
copies. A sample's key is its member name up to the first dot of the file name (webdataset's
rule); its files must lie next to each other in the tar, as img2dataset writes them.

`convert(shards, output)` (the command `python -m nmjax.data.image_text convert --output DIR
SHARD...`) expands globs, sorts the shard paths (the same shards give the same indices whatever
the order named) and writes, per shard s (in that order):
  DIR/pairs-<s>.array_record     one record per sample: a little-endian uint32 n, then n bytes of
                                 UTF-8 JSON {"index", "key", "caption", "image_format"}, then the
                                 image file's bytes as stored (not re-encoded);
  DIR/captions-<s>.array_record  the same samples' captions alone (UTF-8), so caption noise can
                                 read another pair's caption without its image;
  DIR/manifest.json              {"format", "version", "count", "shards": [{"path", "sha256",
                                 "bytes", "count", "first_index", "pairs", "captions"}]}.
`index` is global: the position of the sample over all shards in sorted order, 0..count-1.
Files are written with group_size 1 (one record per chunk: random access), uncompressed (JPEGs
do not compress). The whole folder is written as DIR.incomplete-<pid> and renamed to DIR at the
end, so a killed or refused conversion never leaves a DIR that a reader would trust; an existing
DIR is never overwritten. Bad input stops the conversion with one line naming the shard and the
key: an empty caption, an image without text or text without image, an unreadable tar or image,
a duplicate key, no shard matched. Shards and DIR may lie in a bucket (gs://...): each shard is
then read from there, and its two files are uploaded as soon as written, manifest.json last, so a
folder without it is never read (a conversion refuses a DIR that holds anything).

`WebdatasetPairs(DIR)` reads the result with grain's ArrayRecordDataSource (random access, so a
stream resumes exactly from index-addressed reads): records {"image": encoded bytes, "caption":
str, "key": str, "index": int64}, record i having index i. A DIR in a bucket is copied to local
disk once per host and read there (nmjax.data.locations.mirror: array_record opens local files
only).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import pathlib
import shutil
import struct
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO, TextIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from nmjax import io as nmjax_io
from nmjax import progress
from nmjax.data import locations
from nmjax.errors import DataError
from nmjax.io import paths as io_paths

FORMAT = "nmjax-image-text"
VERSION = 1
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSION = "txt"
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


def expand_shards(patterns: Sequence[str]) -> list[pathlib.Path | str]:
  """Shard paths named by `patterns` (globs expanded), absolute, sorted, without repeats: local
  ones as pathlib.Path, then bucket ones (gs://...) as str.

  A name without glob characters must exist; raises DataError when nothing matches at all.
  """
  paths = set()
  for pattern in patterns:
    if nmjax_io.is_cloud(pattern):
      paths.update(_bucket_shards(pattern))
    elif glob.has_magic(pattern):
      paths.update(pathlib.Path(p).resolve() for p in glob.glob(os.path.expanduser(pattern))
                   if os.path.isfile(p))
    elif os.path.isfile(os.path.expanduser(pattern)):
      paths.add(pathlib.Path(pattern).expanduser().resolve())
    else:
      raise DataError(f"shard {pattern} does not exist (or is not a file)")
  if not paths:
    raise DataError(f"no shards matched {' '.join(patterns) or '(none given)'}; give tar files "
                    f"or globs such as 'shards/*.tar'")
  return (sorted(p for p in paths if isinstance(p, pathlib.Path))
          + sorted(p for p in paths if isinstance(p, str)))


def _bucket_shards(pattern: str) -> list[str]:
  """The bucket files a pattern names (a glob, or one file that must exist)."""
  fs, inner = io_paths.filesystem(pattern)
  scheme = pattern.split("://", 1)[0]
  if glob.has_magic(pattern):
    found = fs.glob(inner, detail=True)
    return [f"{scheme}://{name}" for name, info in found.items() if info.get("type") == "file"]
  if not nmjax_io.isfile(pattern):
    raise DataError(f"shard {pattern} does not exist (or is not a file)")
  return [nmjax_io.absolute(pattern)]


class _HashingReader(io.RawIOBase):
  """A read-only file that hashes (sha256) and counts every byte read through it."""

  def __init__(self, raw: BinaryIO):
    super().__init__()
    self._raw = raw
    self.sha256 = hashlib.sha256()
    self.bytes = 0

  def readable(self) -> bool:
    return True

  def readinto(self, buffer: Any) -> int:
    n = self._raw.readinto(buffer)
    self.sha256.update(memoryview(buffer)[:n])
    self.bytes += n
    return n

  def drain(self) -> None:
    """Reads (and hashes) what the tar reader left unread: end-of-archive padding."""
    while self.read(1 << 20):
      pass


def _split_name(name: str) -> tuple[str, str]:
  folder, base = os.path.split(name)
  stem, _, extension = base.partition(".")
  return os.path.join(folder, stem), extension.lower()


def _samples(tar: tarfile.TarFile, shard: pathlib.Path | str
             ) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: content}) per sample, in tar order; members of adjacent equal keys."""
  key, files, seen = None, {}, set()
  for member in tar:
    if not member.isfile():
      continue
    member_key, extension = _split_name(member.name)
    if member_key != key:
      if key is not None:
        yield key, files
      if member_key in seen:
        raise DataError(f"shard {shard}: key {member_key} appears twice (its files are not "
                        f"adjacent, or the shard holds two samples with that key)")
      key, files = member_key, {}
      seen.add(key)
    if extension in files:
      raise DataError(f"shard {shard}: key {key} has two files {key}.{extension}")
    files[extension] = tar.extractfile(member).read()
  # Before the last sample: a cut after its image must not read as "an image but no text".
  _check_complete(tar, shard, key)
  if key is not None:
    yield key, files


def _checked_sample(shard: pathlib.Path | str, key: str, files: dict[str, bytes]
                    ) -> tuple[str, bytes, str]:
  """(caption, image bytes, image format) of a sample, or a DataError naming shard and key."""
  images = [e for e in IMAGE_EXTENSIONS if e in files]
  if len(images) > 1:
    raise DataError(f"shard {shard}: key {key} has several images ({', '.join(images)})")
  if TEXT_EXTENSION not in files:
    what = "an image" if images else "no image (only " + ", ".join(sorted(files)) + ")"
    raise DataError(f"shard {shard}: key {key} has {what} but no text ({key}.txt)")
  if not images:
    raise DataError(f"shard {shard}: key {key} has text but no image ({key}.jpg)")
  try:
    caption = files[TEXT_EXTENSION].decode("utf-8").strip()
  except UnicodeDecodeError as e:
    raise DataError(f"shard {shard}: key {key} has a caption file {key}.txt that is not UTF-8 "
                    f"({e.reason} at byte {e.start})") from None
  if not caption:
    raise DataError(f"shard {shard}: key {key} has an empty caption file {key}.txt")
  image = files[images[0]]
  try:
    Image.open(io.BytesIO(image))  # Reads the header only: cheap, and catches non-images.
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(f"shard {shard}: key {key} has an image {key}.{images[0]} that cannot be "
                    f"read ({type(e).__name__})") from None
  return caption, image, images[0]


def _check_complete(tar: tarfile.TarFile, shard: pathlib.Path | str, key: str | None) -> None:
  """Refuses a tar cut short between members, which tarfile reads as a shorter archive.

  A whole archive ends with a zero block where the next header would be; a cut one holds less
  than a block there. In stream mode `tar.fileobj` is the (decompressed) stream, `tar.offset`
  where that header starts.
  """
  while tar.fileobj.read(1 << 20):
    pass
  if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:
    where = f" at key {key}" if key is not None else ""
    raise DataError(f"shard {shard} is not a readable tar file: it is cut short{where} (no "
                    f"end-of-archive block); copy or download it again")


def _convert_shard(shard: pathlib.Path | str, first_index: int, pairs_path: pathlib.Path,
                   captions_path: pathlib.Path) -> dict[str, Any]:
  """Writes one shard's two files; returns its manifest entry."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  pairs = array_record_module.ArrayRecordWriter(os.fspath(pairs_path), _WRITER_OPTIONS)
  captions = array_record_module.ArrayRecordWriter(os.fspath(captions_path), _WRITER_OPTIONS)
  count, key = 0, None
  try:
    with nmjax_io.open(shard, "rb") as raw:
      reader = _HashingReader(raw)
      try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
          for key, files in _samples(tar, shard):
            caption, image, image_format = _checked_sample(shard, key, files)
            pairs.write(encode_pair(first_index + count, key, caption, image, image_format))
            captions.write(caption.encode())
            count += 1
        reader.drain()
      except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        where = f" after key {key}" if key is not None else ""
        raise DataError(f"shard {shard} is not a readable tar file{where} "
                        f"({type(e).__name__}: {e})") from None
  finally:
    pairs.close()
    captions.close()
  return {"path": os.fspath(shard), "sha256": reader.sha256.hexdigest(), "bytes": reader.bytes,
          "count": count, "first_index": first_index, "pairs": pairs_path.name,
          "captions": captions_path.name}


def _prepare_output(output: pathlib.Path) -> pathlib.Path:
  """Checks that `output` may be written; returns the temporary folder to write instead."""
  if (output / MANIFEST).exists():
    raise DataError(f"{output} already holds a conversion ({output / MANIFEST}); read it as it "
                    f"is, or delete it (or choose another --output) to convert again")
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise DataError(f"--output {output} exists and is not an empty folder; choose another")
  output.parent.mkdir(parents=True, exist_ok=True)
  for folder in output.parent.glob(f"{output.name}.incomplete-*"):
    # Left by a killed conversion: each shard written touches it, so an hour-old one is dead.
    if folder.is_dir() and time.time() - folder.stat().st_mtime > _STALE_SECONDS:
      shutil.rmtree(folder, ignore_errors=True)
  tmp = output.parent / f"{output.name}.incomplete-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
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
  entries, total, last_line = [], 0, 0.0
  for s, shard in enumerate(paths):
    entry = _convert_shard(shard, total, tmp / f"pairs-{s:05d}.array_record",
                           tmp / f"captions-{s:05d}.array_record")
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
  return {"format": FORMAT, "version": VERSION, "count": total, "shards": entries}


def convert(shards: Sequence[str], output: str | os.PathLike, *,
            stream: TextIO | None = None) -> dict[str, Any]:
  """Converts webdataset tar shards into array_record under `output`; returns the manifest.

  shards: tar paths or globs (expand_shards), local or in a bucket. output: a local folder, or a
  bucket folder (gs://...), to which each shard's two files are uploaded as they are written,
  then manifest.json last (what makes a reader trust the folder). A progress line with the
  pairs converted, the rate and an ETA is printed to `stream` (default stdout) after the first
  shard and then at most every 10 s, and at the end. Raises DataError (one line naming shard and
  key) on bad input; no manifest is written under `output` then (nothing at all, locally).
  """
  paths = expand_shards(shards)
  bucket = nmjax_io.absolute(output) if nmjax_io.is_cloud(output) else None
  if bucket is None:
    output = pathlib.Path(output).expanduser().resolve()
    tmp = _prepare_output(output)
  else:
    _check_bucket_output(bucket)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="nmjax-convert-"))
  try:
    manifest = _convert_all(paths, tmp, stream or sys.stdout, bucket)
    text = json.dumps(manifest, indent=1) + "\n"
    if bucket is not None:
      nmjax_io.write_text(nmjax_io.join(bucket, MANIFEST), text)
      return manifest
    (tmp / MANIFEST).write_text(text)
    try:
      if output.exists():
        output.rmdir()  # Checked empty above.
      os.rename(tmp, output)
    except OSError as e:
      raise DataError(f"--output {output} was filled by another process while converting "
                      f"({e.strerror}); read that one, or delete it and convert again") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


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
