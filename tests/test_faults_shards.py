"""Faults of the webdataset -> array_record conversion (`python -m nmjax.data.image_text
convert`), each answered with one line, and what each leaves on disk: duplicates across shards
(dropped with a count, so no held-out pair is a training pair), a full disk, a killed conversion
left behind, truncated and decompression-bomb images (skipped, named), an unwritable --output,
a glob that matches nothing, an empty tar."""

import errno
import io
import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import types

import numpy as np
import pytest
from PIL import ImageFile

from nmjax import io as nmjax_io
from nmjax.data import image_text, webdataset, webdataset_shards

import synthetic_data  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOST = webdataset._host()  # pylint: disable=protected-access  # How leftover folders name it.


def _convert(capsys, output, *shards):
  """Runs the convert command in-process: (exit code, stdout, stderr lines)."""
  capsys.readouterr()
  code = 0
  try:
    image_text.main(["convert", "--output", str(output), *map(str, shards)])
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code, captured.out, captured.err.splitlines()


def _one_line(code, err, *expected):
  assert code == 2, err
  assert len(err) == 1 and err[0].startswith("error: "), err
  for text in expected:
    assert text in err[0], err[0]
  return err[0]


def _nothing_left(output):
  """No OUTPUT and no OUTPUT.incomplete-* folder."""
  output = pathlib.Path(output)
  assert not output.exists()
  assert not list(output.parent.glob(f"{output.name}.incomplete-*"))


def _shard(path, keys, *, seed=0, captions=None):
  captions = captions or [f"a photo of item {k}" for k in keys]
  return synthetic_data.write_tar(path, synthetic_data.webdataset_members(keys, captions,
                                                                          seed=seed))


def _jpeg(width=24, height=16, seed=0):
  return synthetic_data.synthetic_jpeg(np.random.default_rng(seed), width, height)


# ---------------------------------------------------------------------------------------------
# 1. Duplicates.

def test_duplicates_across_shards_are_dropped_and_no_held_out_pair_is_a_training_pair(
    tmp_path, capsys):
  keys = [f"{i:09d}" for i in range(60)]
  first = _shard(tmp_path / "00000.tar", keys)
  shutil.copy(first, tmp_path / "copy.tar")  # The same shard under another name.
  with tarfile.open(first) as tar:
    image = tar.extractfile("000000003.jpg").read()
  # The image and caption of key 000000003 under another key; and one pair of its own.
  synthetic_data.write_tar(tmp_path / "more.tar", [
      ("other.jpg", image), ("other.txt", b"a photo of item 000000003"),
      ("own.jpg", _jpeg(seed=9)), ("own.txt", b"a pair of its own")])
  code, out, err = _convert(capsys, tmp_path / "pairs", tmp_path / "*.tar")
  assert code == 0 and not err, err
  assert out.count("convert: skipped key") == webdataset_shards.LISTED_SKIPS
  assert (f"convert: skipped key 000000000 of shard {tmp_path / 'copy.tar'}: key 000000000 was "
          f"converted from shard {first}, which is kept") in out
  assert ("converted 61 pairs from 3 shards into " f"{tmp_path / 'pairs'}; skipped 61 pairs: 60 "
          "with a key converted from an earlier shard; 1 with the image and caption of a pair "
          "converted under another key") in out
  manifest = webdataset.read_manifest(tmp_path / "pairs")
  assert manifest["skipped"] == {"duplicate_key": 60, "duplicate_pair": 1, "bad_image": 0}
  pairs = webdataset.WebdatasetPairs(tmp_path / "pairs")
  records = pairs.__getitems__(range(len(pairs)))
  assert len({r["key"] for r in records}) == len(records) == 61
  assert len({(r["image"], r["caption"]) for r in records}) == 61
  # The CLIP job's split: its held-out pairs are never training pairs.
  from nmjax.train import clip_training  # pylint: disable=g-import-not-at-top
  plan = types.SimpleNamespace(dataset=f"array_record:{tmp_path / 'pairs'}", data_dir="", seed=0,
                               held_out_pairs=20, max_train_examples=0, max_test_examples=0)
  train, held_out = clip_training.split_pairs(plan)
  assert (len(train), len(held_out)) == (41, 20)
  seen = {(p["image"], p["caption"]) for p in train.__getitems__(range(len(train)))}
  seen_keys = {p["key"] for p in train.__getitems__(range(len(train)))}
  for p in held_out.__getitems__(range(len(held_out))):
    assert (p["image"], p["caption"]) not in seen and p["key"] not in seen_keys


# ---------------------------------------------------------------------------------------------
# 2. A full disk.

class _FullDiskWriter:
  """array_record's writer on a full disk: its third write fails as the real one does."""

  def __init__(self, path, options):
    self._path, self._writes = path, 0
    open(path, "wb").close()  # pylint: disable=consider-using-with

  def write(self, record):
    self._writes += 1
    with open(self._path, "ab") as f:
      f.write(record)
    if self._writes == 3:
      raise RuntimeError(f"write() failed: No space left on device; writing {self._path}; at "
                         f"byte 0; Could not submit chunk: 3")

  def close(self):
    pass


def _full_manifest(original):
  def write_text(self, *args, **kwargs):
    if self.name == "manifest.json":
      raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return original(self, *args, **kwargs)
  return write_text


@pytest.mark.parametrize("where", ["array_record", "manifest"])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, capsys,
                                                                      monkeypatch, where):
  shards = synthetic_data.write_shards(tmp_path / "shards", [f"c{i}" for i in range(8)], (4, 4))
  if where == "array_record":
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", _FullDiskWriter)
  else:
    monkeypatch.setattr(pathlib.Path, "write_text", _full_manifest(pathlib.Path.write_text))
  code, _, err = _convert(capsys, tmp_path / "out" / "pairs", *shards)
  line = _one_line(code, err, f"error: no space left on the device writing {tmp_path}/out/pairs"
                   " (", " GB free there); nothing of it is kept", "choose another --output")
  assert "Traceback" not in line
  _nothing_left(tmp_path / "out" / "pairs")


def test_a_full_local_disk_converting_into_a_bucket_names_the_staging_folder(
    bucket, tmp_path, capsys, monkeypatch):
  # The first shard is uploaded whole; the second fills the local disk.
  shards = synthetic_data.write_shards(tmp_path, [f"c{i}" for i in range(6)], (2, 4))
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(array_record_module, "ArrayRecordWriter", _FullDiskWriter)
  code, _, err = _convert(capsys, f"{bucket}/pairs", *shards)
  _one_line(code, err, "error: no space left on the device writing ",
            f"(the local staging folder for {bucket}/pairs)", f"delete {bucket}/pairs")
  assert sorted(nmjax_io.listdir(f"{bucket}/pairs")) == [  # Never read as a conversion.
      "captions-00000.array_record", "pairs-00000.array_record"]


# ---------------------------------------------------------------------------------------------
# 3. A conversion killed, then run again.

_SLOW_CONVERSION = textwrap.dedent("""
    import sys, time
    from nmjax.data import image_text, webdataset_shards
    def keep(*args):
      print("converting", flush=True)
      time.sleep(120)
    webdataset_shards.PairFilter.keep = keep
    image_text.main(["convert", "--output", sys.argv[1], sys.argv[2]])
""")


def test_a_killed_conversion_is_removed_by_the_rerun_with_one_line(tmp_path, capsys):
  shard = _shard(tmp_path / "00000.tar", ["a", "b", "c"])
  output = tmp_path / "pairs"
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERSION, str(output), str(shard)],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == "converting\n"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  leftover = [p.name for p in tmp_path.glob("pairs.incomplete-*")]
  assert leftover == [f"pairs.incomplete-{_HOST}-{proc.pid}"]
  assert not output.exists()
  code, out, err = _convert(capsys, output, shard)
  assert code == 0 and not err, err
  assert out.count("convert: removed") == 1
  assert (f"convert: removed {tmp_path / leftover[0]}, left by a conversion that stopped "
          f"(process {proc.pid} on this host is not running)") in out
  assert webdataset.read_manifest(output)["count"] == 3
  assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "pairs"]


def test_a_running_conversion_is_not_disturbed_and_stale_ones_of_other_hosts_go(tmp_path,
                                                                                capsys):
  shard = _shard(tmp_path / "00000.tar", ["a", "b"])
  live = subprocess.Popen(["sleep", "60"])
  try:
    running = tmp_path / f"pairs.incomplete-{_HOST}-{live.pid}"
    running.mkdir()
    code, _, err = _convert(capsys, tmp_path / "pairs", shard)
    _one_line(code, err, f"another conversion (process {live.pid} on this host) is writing "
              f"--output {tmp_path / 'pairs'} (into {running})", f"delete {running}")
    assert running.is_dir() and not (tmp_path / "pairs").exists()
  finally:
    live.kill()
    live.wait()
  running.rmdir()
  stale, fresh = tmp_path / "pairs.incomplete-elsewhere-7", tmp_path / "pairs.incomplete-far-8"
  stale.mkdir()
  fresh.mkdir()
  os.utime(stale, (time.time() - 7200, time.time() - 7200))
  code, out, err = _convert(capsys, tmp_path / "pairs", shard)
  assert code == 0 and not err, err
  assert (f"convert: removed {stale}, left by a conversion that stopped (made on elsewhere, "
          f"untouched for over an hour)") in out
  assert not stale.exists() and fresh.is_dir()  # Another host's may still be running.


# ---------------------------------------------------------------------------------------------
# 4, 5. Images that training could not decode: skipped at conversion, each named.

def _bomb(width, height):
  """A small JPEG whose frame header claims width x height."""
  data = bytearray(_jpeg())
  sof = data.find(b"\xff\xc0")
  struct.pack_into(">HH", data, sof + 5, height, width)
  return bytes(data)


@pytest.mark.parametrize("name, image, reason", [
    ("truncated", _jpeg(64, 48)[:900], "it does not decode (OSError: image file is truncated"),
    ("not_an_image", b"not a jpeg", "it is not an image Pillow reads (UnidentifiedImageError)"),
    ("bomb", _bomb(65000, 65000), "its header claims 4,225,000,000 pixels, over Pillow's limit "
     "of 89,478,485 (a decompression bomb)"),
    ("warned_bomb", _bomb(10000, 10000), "its header claims 10000x10000 = 100,000,000 pixels, "
     "over Pillow's limit of 89,478,485 (a decompression bomb)"),
])
def test_an_image_training_cannot_decode_is_skipped_and_named(tmp_path, capsys, monkeypatch,
                                                              name, image, reason):
  members = synthetic_data.webdataset_members(["k0", "k2"], ["zero", "two"])
  members[3:3] = [("k1.jpg", image), ("k1.txt", b"one")]
  shard = synthetic_data.write_tar(tmp_path / f"{name}.tar", members)
  loads = []
  original = ImageFile.ImageFile.load
  monkeypatch.setattr(ImageFile.ImageFile, "load",
                      lambda self: loads.append(self.size) or original(self))
  started = time.perf_counter()
  code, out, err = _convert(capsys, tmp_path / "pairs", shard)
  assert code == 0 and not err, err
  assert time.perf_counter() - started < 10  # A bomb is never decoded.
  if "bomb" in name:
    assert len(loads) == 2  # The two good images only.
  assert f"convert: skipped key k1 of shard {shard}: its image k1.jpg: {reason}" in out
  assert ("skipped 1 pair: 1 with an image that cannot be decoded or is over Pillow's pixel "
          "limit") in out
  pairs = webdataset.WebdatasetPairs(tmp_path / "pairs")
  assert [p["key"] for p in pairs.__getitems__(range(len(pairs)))] == ["k0", "k2"]
  batch = image_text.read_batch(pairs, range(len(pairs)), image_size=8)  # What training does.
  assert batch["image"].shape == (2, 8, 8, 3)


def test_a_conversion_left_without_pairs_is_refused(tmp_path, capsys):
  shard = synthetic_data.write_tar(tmp_path / "00000.tar", [("k1.jpg", _jpeg(64, 48)[:900]),
                                                            ("k1.txt", b"one")])
  code, out, err = _convert(capsys, tmp_path / "pairs", shard)
  _one_line(code, err, "error: no pairs left to convert from 1 shard(s): skipped 1 pair: 1 with"
            " an image that cannot be decoded")
  assert f"convert: skipped key k1 of shard {shard}" in out
  _nothing_left(tmp_path / "pairs")


# ---------------------------------------------------------------------------------------------
# 6, 7, 8. An unwritable --output, a glob that matches nothing, an empty tar.

def test_an_unwritable_output_is_named_as_output(tmp_path, capsys, monkeypatch):
  shard = _shard(tmp_path / "00000.tar", ["a"])
  locked = tmp_path / "read-only"
  locked.mkdir()
  original = pathlib.Path.mkdir

  def mkdir(self, *args, **kwargs):  # Permissions do not stop root: the kernel's answer.
    if str(self).startswith(str(locked)) and not self.exists():
      raise PermissionError(errno.EACCES, "Permission denied", str(self))
    return original(self, *args, **kwargs)
  monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
  code, _, err = _convert(capsys, locked / "pairs", shard)
  line = _one_line(code, err, f"error: cannot write --output {locked / 'pairs'}: Permission "
                   f"denied ({locked / 'pairs'}.incomplete-{_HOST}-{os.getpid()}); make "
                   f"{locked} writable or choose another --output")
  assert "--workdir" not in line
  assert list(locked.iterdir()) == []


def test_a_glob_that_matches_nothing_is_refused_naming_it(tmp_path, capsys):
  shard = _shard(tmp_path / "00000.tar", ["a"])
  code, _, err = _convert(capsys, tmp_path / "pairs", shard, tmp_path / "typo-*.tar")
  _one_line(code, err, f"error: no shards matched {tmp_path / 'typo-*.tar'} (a glob that "
            "matches no file)")
  _nothing_left(tmp_path / "pairs")


def test_an_empty_tar_is_refused_naming_it(tmp_path, capsys):
  _shard(tmp_path / "00000.tar", ["a"])
  empty = synthetic_data.write_tar(tmp_path / "00001.tar", [])
  code, _, err = _convert(capsys, tmp_path / "pairs", tmp_path / "*.tar")
  _one_line(code, err, f"error: shard {empty} holds no samples (an empty tar file)")
  _nothing_left(tmp_path / "pairs")


def test_the_convert_command_runs_through_one_line_errors(tmp_path):
  empty = synthetic_data.write_tar(tmp_path / "00000.tar", [])
  done = subprocess.run([sys.executable, "-m", "nmjax.data.image_text", "convert", "--output",
                         str(tmp_path / "pairs"), str(empty)], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False)
  _one_line(done.returncode, done.stderr.splitlines(), f"shard {empty} holds no samples")
  _nothing_left(tmp_path / "pairs")


def test_the_manifest_records_what_was_skipped(tmp_path):
  shard = _shard(tmp_path / "00000.tar", ["a", "b"])
  webdataset.convert([str(shard)], tmp_path / "pairs", stream=io.StringIO())
  manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
  assert manifest["skipped"] == dict.fromkeys(webdataset_shards.SKIP_REASONS, 0)
  assert webdataset_shards.skipped_words(manifest["skipped"]) == ""
