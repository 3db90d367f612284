"""The samples of webdataset tar shards, read and checked for nmjax.data.webdataset's convert.

A sample's key is its member name up to the first dot of the file name (webdataset's rule); its
files must lie next to each other in the tar, as img2dataset writes them. Faults of a shard
itself stop the conversion with one line naming the shard (and the key): a tar that cannot be
read or is cut short, a shard without samples, a key whose files are not adjacent, a sample
without text or without image, a caption that is empty or not UTF-8.

Faults of one pair, common in web data, skip that pair (PairFilter): a key already converted
from an earlier shard, the same image bytes and caption as a pair already converted (under
another key), an image that Pillow cannot decode to its end (not an image, truncated, corrupt)
or whose header claims more pixels than Pillow's decompression-bomb limit (PIL.Image.
MAX_IMAGE_PIXELS; told from the header, never decoded). The first copy of a duplicate (in the
sorted shard order) is kept, so no pair is converted twice and a held-out pair is never also a
training pair. Each skipped pair of the first few is printed as one line naming shard and key;
all are counted in the manifest ("skipped"). Finding duplicates keeps each converted key and a
16-byte digest of its pair in memory: about 200 bytes a pair (2.5 GB for 12 million pairs).
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import pathlib
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, TextIO

from PIL import Image

from nmjax import io as nmjax_io
from nmjax.errors import DataError
from nmjax.io import paths as io_paths

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSION = "txt"
# Why a pair is skipped: the manifest's "skipped" keys, and how the summary says them.
SKIP_REASONS = {"duplicate_key": "with a key converted from an earlier shard",
                "duplicate_pair": "with the image and caption of a pair converted under "
                                  "another key",
                "bad_image": "with an image that cannot be decoded or is over Pillow's "
                             "pixel limit"}
LISTED_SKIPS = 10  # Skipped pairs printed one line each; the others are counted only.


def expand_shards(patterns: Sequence[str]) -> list[pathlib.Path | str]:
  """Shard paths named by `patterns` (globs expanded), absolute, sorted, without repeats: local
  ones as pathlib.Path, then bucket ones (gs://...) as str.

  A name without glob characters must exist and every glob must match a file; DataError
  naming the pattern otherwise.
  """
  paths = set()
  for pattern in patterns:
    if nmjax_io.is_cloud(pattern):
      found = _bucket_shards(pattern)
    elif glob.has_magic(pattern):
      found = [pathlib.Path(p).resolve() for p in glob.glob(os.path.expanduser(pattern))
               if os.path.isfile(p)]
    elif os.path.isfile(os.path.expanduser(pattern)):
      found = [pathlib.Path(pattern).expanduser().resolve()]
    else:
      raise DataError(f"shard {pattern} does not exist (or is not a file)")
    if not found:
      raise DataError(f"no shards matched {pattern} (a glob that matches no file); correct it "
                      f"or leave it out")
    paths.update(found)
  if not paths:
    raise DataError("no shards given; give tar files or globs such as 'shards/*.tar'")
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


class HashingReader(io.RawIOBase):
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


def samples(tar: tarfile.TarFile, shard: pathlib.Path | str
            ) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: content}) per sample, in tar order; members of adjacent equal keys.

  Raises DataError for a key whose files are not adjacent, a tar cut short, or a tar without
  samples.
  """
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
  if key is None:
    raise DataError(f"shard {shard} holds no samples (an empty tar file); download it again, "
                    f"or move it out of the shards named")
  yield key, files


def checked_sample(shard: pathlib.Path | str, key: str, files: dict[str, bytes]
                   ) -> tuple[str, bytes, str]:
  """(caption, image bytes, image extension) of a sample, or a DataError naming shard and key.

  The image is not looked at here (PairFilter decodes it).
  """
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
  return caption, files[images[0]], images[0]


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


def image_fault(data: bytes) -> str | None:
  """Why an encoded image cannot be trained on, or None when it can.

  Not an image Pillow opens; a header claiming more pixels than PIL.Image.MAX_IMAGE_PIXELS (a
  decompression bomb: refused from the header, never decoded); data that does not decode to its
  end (truncated or corrupt). A JPEG is decoded at 1/8 scale: libjpeg still reads every
  coefficient, so a cut or corrupt stream fails as in a full decode, at a fraction of its cost.
  """
  limit = Image.MAX_IMAGE_PIXELS
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    claimed = re.search(r"\((\d+) pixels\)", str(e))
    pixels = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
    return f"its header claims {pixels}, over Pillow's limit of {limit:,} (a decompression bomb)"
  except Exception as e:  # pylint: disable=broad-except
    return f"it is not an image Pillow reads ({type(e).__name__})"
  width, height = image.size
  if limit and width * height > limit:
    return (f"its header claims {width}x{height} = {width * height:,} pixels, over Pillow's "
            f"limit of {limit:,} (a decompression bomb)")
  try:
    if image.format == "JPEG":
      image.draft(None, (1, 1))
    image.load()
  except Exception as e:  # pylint: disable=broad-except  # Any decoder failure: not trainable.
    return f"it does not decode ({type(e).__name__}: {e}; truncated or corrupt)"
  return None


class PairFilter:
  """Which pairs of the whole input are converted (see the module docstring); counts the
  skipped ones by reason (SKIP_REASONS) and prints the first LISTED_SKIPS of them."""

  def __init__(self, shards: Sequence[pathlib.Path | str], stream: TextIO):
    self._shards, self._stream = shards, stream
    self._shard_of_key: dict[str, int] = {}
    self._key_of_pair: dict[bytes, str] = {}
    self.skipped = dict.fromkeys(SKIP_REASONS, 0)

  def keep(self, s: int, key: str, caption: str, image: bytes, extension: str) -> bool:
    """Whether the pair (key, caption, image) of shard number s is converted; False prints or
    counts why not."""
    first = self._shard_of_key.get(key)
    if first is not None:
      return self._skip("duplicate_key", s, key, f"key {key} was converted from shard "
                        f"{self._shards[first]}, which is kept")
    digest = hashlib.blake2b(len(image).to_bytes(8, "little") + image, digest_size=16)
    digest.update(caption.encode())
    digest = digest.digest()
    earlier = self._key_of_pair.get(digest)
    if earlier is not None:
      return self._skip("duplicate_pair", s, key, f"the same image and caption as key {earlier}"
                        f" of shard {self._shards[self._shard_of_key[earlier]]}, which is kept")
    fault = image_fault(image)
    if fault is not None:
      return self._skip("bad_image", s, key, f"its image {key}.{extension}: {fault}")
    self._shard_of_key[key] = s
    self._key_of_pair[digest] = key
    return True

  def _skip(self, reason: str, s: int, key: str, why: str) -> bool:
    total = sum(self.skipped.values())
    self.skipped[reason] += 1
    if total < LISTED_SKIPS:
      print(f"convert: skipped key {key} of shard {self._shards[s]}: {why}", file=self._stream,
            flush=True)
    elif total == LISTED_SKIPS:
      print("convert: more pairs skipped; counted, not listed (the summary at the end says how"
            " many)", file=self._stream, flush=True)
    return False


def skipped_words(skipped: dict[str, int]) -> str:
  """'skipped N pairs: a with ..., b with ...' for a manifest's "skipped" counts ('' if none)."""
  parts = [f"{n:,} {SKIP_REASONS[reason]}" for reason, n in skipped.items() if n]
  total = sum(skipped.values())
  return f"skipped {total:,} pair{'s' * (total != 1)}: {'; '.join(parts)}" if total else ""
