"""Faults of the disk under a run, each answered with one line: a full disk while orbax writes a
checkpoint (the unfinished step's folder removed, committed steps kept), a converted pair or
an ImageNet record whose image is truncated or whose header claims 65000x65000 pixels (named,
refused before decoding), and a damaged compiled library in the native cache (compiled again
with one warning line instead of a SIGBUS)."""

import errno
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import synthetic_data

from nmjax import errors, jobs
from nmjax.data import imagenet, jpeg, resample, webdataset
from nmjax.errors import DataError
from nmjax.train import checkpoint as checkpoint_lib
from nmjax.train import clip_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position
from configs import pretrain_clip as clip_config  # pylint: disable=wrong-import-position


def _one_line(capsys, code, expected_start):
  err = capsys.readouterr().err
  assert code == 2, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(expected_start), err[-3000:]
  return lines[0]


def _unfinished(root):
  return [n for n in os.listdir(root) if ".orbax-checkpoint-tmp" in n]


def _tensorstore_enospc(path):
  """The error orbax raises where tensorstore meets a full disk: a ValueError, no OSError."""
  return ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.Dense_0.kernel/0" in OCDBT database at local'
      f' file "{os.path.dirname(os.path.dirname(path))}/": Failed writing: "{path}": Failed to'
      " write 63939 bytes to file 12: No space left on device [os_error_code='28'] [source"
      " locations='tensorstore/internal/os/file_util_posix.cc:333']")


def _torn_step(root, step):
  """What orbax leaves of a step whose arrays did not fit: its temporary folder, half written."""
  data = os.path.join(root, f"{step}.orbax-checkpoint-tmp", "state.orbax-checkpoint-tmp",
                      "ocdbt.process_0", "d")
  os.makedirs(data)
  path = os.path.join(data, "48fa9e1a02b4d8dc000271437f0e23ad")
  with open(path, "wb") as f:
    f.write(b"\0" * 100)
  return path


# ---------------------------------------------------------- a full disk during a checkpoint


@pytest.mark.slow  # A pre-training run on a filled disk: several seconds.
def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_leaves_committed_steps(
    tmp_path, monkeypatch, capsys):
  """The smoke pre-training saves steps 4, 5, 8, 10 and 12; step 8's arrays meet a full disk."""
  real_save = ocp.CheckpointManager.save

  def save(mngr, step, *args, **kwargs):
    if step == 8:
      raise _tensorstore_enospc(_torn_step(str(mngr.directory), step))
    return real_save(mngr, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  workdir = tmp_path / "w"
  with pytest.raises(SystemExit) as done:
    with errors.one_line_errors():
      jobs.run(pretrain_config.get_config("dataset=digits,noise=0.1,smoke"), str(workdir))
  root = workdir / "checkpoints"
  line = _one_line(capsys, done.value.code,
                   f"error: no space left on the device writing {root}/8 (")
  assert line.endswith("free there): No space left on device; free some space (or write"
                       " elsewhere) and run the same command again (committed checkpoints and"
                       " finished stages are kept)")
  assert not _unfinished(root)
  assert checkpoint_lib.saved_steps(str(workdir)) == [5, 4]
  assert checkpoint_lib.load_state(str(workdir))[0] == 5  # Committed steps are whole.


def test_a_save_that_fails_in_the_background_is_cleaned_up_too(tmp_path):
  """orbax reports an asynchronous write's failure at a later call (the next save, the wait at
  the end): the unfinished folder goes and the error names the step it was writing."""
  workdir = str(tmp_path)
  mngr = checkpoint_lib.manager(workdir)
  checkpoint_lib.save(mngr, 1, {"w": np.ones(4, np.float32)}, {"data": {}, "epoch_sums": {}})
  mngr.wait_until_finished()
  root = checkpoint_lib.directory(workdir)
  with pytest.raises(OSError) as raised:
    with checkpoint_lib.disk_faults(mngr):
      raise RuntimeError("save finalize failed") from _tensorstore_enospc(_torn_step(root, 2))
  assert raised.value.errno == errno.ENOSPC and raised.value.filename == f"{root}/2"
  assert not _unfinished(root) and checkpoint_lib.saved_steps(workdir) == [1]


def test_a_save_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch,
                                                                      capsys):
  workdir = str(tmp_path)
  mngr = checkpoint_lib.manager(workdir)
  state = {"w": np.ones(1 << 18, np.float32)}  # 1 MB of arrays
  monkeypatch.setattr(checkpoint_lib.shutil, "disk_usage",
                      lambda _: type("Usage", (), {"free": 300 << 10})())
  with pytest.raises(SystemExit) as done:
    with errors.one_line_errors(), checkpoint_lib.disk_faults(mngr):
      checkpoint_lib.save(mngr, 3, state, {"data": {}, "epoch_sums": {}})
  root = checkpoint_lib.directory(workdir)
  line = _one_line(capsys, done.value.code, f"error: no space left on the device writing {root}/3")
  assert "(300.0 KB free there): the checkpoint of step 3 needs about 1.1 MB; free some" in line
  assert os.listdir(root) == []


def test_tensorstore_errors_naming_an_errno_count_as_that_os_error():
  path = "/w/checkpoints/8.orbax-checkpoint-tmp/d/x"
  fault = errors.os_error_in(_tensorstore_enospc(path), errors.FULL_DISK)
  assert (fault.errno, fault.filename) == (errno.ENOSPC, path)
  assert errors.os_error_in(ValueError("RESOURCE_EXHAUSTED: out of memory"),
                            errors.FULL_DISK) is None


# ------------------------------------------------------------ images that cannot be decoded


def _claiming(data, width, height):
  """JPEG bytes whose frame header claims width x height (the scan data left as it was)."""
  offset = jpeg.jpeg_frame(data).height_offset
  return data[:offset] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[offset + 4:]


def _jpeg(size=(40, 30)):
  buffer = io.BytesIO()
  Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _damage_pair(folder, index, image):
  """Rewrites pair `index` of a converted folder with another image (a folder converted before
  conversion decoded each image, or damaged since)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  manifest = json.loads((folder / "manifest.json").read_text())
  entry = next(e for e in manifest["shards"]
               if e["first_index"] <= index < e["first_index"] + e["count"])
  path = str(folder / entry["pairs"])
  reader = array_record_module.ArrayRecordReader(path)
  stored = reader.read_all()
  reader.close()
  pair = webdataset.decode_pair(stored[index - entry["first_index"]])
  stored[index - entry["first_index"]] = webdataset.encode_pair(
      pair["index"], pair["key"], pair["caption"], image(pair["image"]), pair["image_format"])
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
  for record in stored:
    writer.write(record)
  writer.close()


def test_a_truncated_pair_stops_clip_training_with_one_line_naming_it(tmp_path, capsys):
  shards = []
  for s in range(2):
    keys = [f"{s:05d}{i:04d}" for i in range(16)]
    members = synthetic_data.webdataset_members(keys, [f"item {s} {i}" for i in range(16)],
                                                seed=s, size=(40, 30))
    shards.append(str(synthetic_data.write_tar(tmp_path / f"{s:05d}.tar", members)))
  webdataset.convert(shards, tmp_path / "pairs")
  _damage_pair(tmp_path / "pairs", 3, lambda data: data[:len(data) // 2])
  config = clip_config.get_config("smoke,noise=0.25")
  config.dataset = f"array_record:{tmp_path / 'pairs'}"
  config.image_size, config.held_out_pairs, config.mesh = 14, 8, "data:1,model:-1"
  config.batch_size, config.eval_batch_size, config.num_train_steps = 8, 8, 6
  config.max_train_examples = config.max_test_examples = -1
  with pytest.raises(SystemExit) as done:
    with errors.one_line_errors():
      jobs.run(config, str(tmp_path / "w"))
  line = _one_line(capsys, done.value.code, "error: pair 3 (key 000000003) holds an image that"
                   " cannot be decoded (OSError: image file is truncated")
  assert line.endswith("fix: convert the shards again into a new folder (the conversion skips"
                       " an image that does not decode) and train on that")
  root = tmp_path / "w" / "checkpoints"
  assert not root.exists() or not _unfinished(root)


def test_a_header_claiming_65000x65000_pixels_is_refused_before_decoding():
  bomb = _claiming(_jpeg(), 65000, 65000)
  claim = "its header claims 65000x65000 = 4,225,000,000 pixels, over Pillow's limit of"
  good = _jpeg((64, 48))
  records = [{"image": good, "label": np.int64(0), "index": np.int64(i)} for i in range(4)]
  records[2] = {"image": bomb, "label": np.int64(0), "index": np.int64(2)}
  start = time.perf_counter()
  for decode_less in (True, False):  # libjpeg's cut decode, and Pillow's whole one
    iterator = imagenet.train_iterator(records, labels=np.zeros(4), global_batch_size=4, seed=0,
                                       num_steps=1, image_size=16, decode_less=decode_less)
    with pytest.raises(DataError, match=f"record 2 holds an image that cannot be decoded"
                                        f" \\(ImageTooLarge: {claim}"):
      next(iterator)
  # A CLIP pair: named with its key, by the eval crops as by the train batches.
  pair = {"image": bomb, "caption": "a", "key": "k7", "index": np.int64(7)}
  with pytest.raises(DataError, match=f"pair 7 \\(key k7\\) holds an image .*{claim}"):
    clip_training.decode_named(pair, 16)
  uniforms = np.full((1, imagenet.DRAWS_PER_EXAMPLE), 0.5)
  with pytest.raises(DataError, match=f"pair 7 \\(key k7\\) holds an image .*{claim}"):
    clip_training.real_batch({"id": np.array([0]), "uniforms": uniforms}, pairs=[pair],
                             image_size=16, context_length=8)
  assert time.perf_counter() - start < 5  # A decode of the claimed size takes 10 s and 0.9 GB.
  assert jpeg.jpeg_frame(_claiming(_jpeg(), 9000, 9000)).width == 9000  # under the limit


# ------------------------------------------------------- a damaged library in the native cache


_LOAD = """
import numpy as np
from nmjax.data import resample
jpeg = open({jpeg!r}, "rb").read()
out = np.zeros((8, 8, 3), np.uint8)
assert resample.decode_resize_into(jpeg, 1, (0.0, 0.0, 40.0, 30.0), 8, out)
print("decoded", int(out.mean()))
"""


def _load_in_subprocess(cache, jpeg_path):
  env = {**os.environ, "NMJAX_CACHE_DIR": str(cache), "NMJAX_NATIVE_RESAMPLE": "1"}
  return subprocess.run([sys.executable, "-c", _LOAD.format(jpeg=str(jpeg_path))], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not resample.available() or resample.decoder() is None,
                    reason="no C compiler or libjpeg headers: the native code is not built here")
def test_a_damaged_native_library_is_compiled_again_with_one_line(tmp_path):
  cache, jpeg_path = tmp_path / "native", tmp_path / "a.jpg"
  jpeg_path.write_bytes(_jpeg())
  first = _load_in_subprocess(cache, jpeg_path)
  assert first.returncode == 0 and first.stderr == "", first.stderr
  libraries = sorted(cache.glob("*.so"))
  assert [p.name.split("-")[0] for p in libraries] == ["decode", "resample"]
  decode, resampler = libraries
  decode.write_bytes(decode.read_bytes()[:decode.stat().st_size // 2])  # truncated: SIGBUS
  damaged = bytearray(resampler.read_bytes())
  damaged[len(damaged) // 2:len(damaged) // 2 + 64] = b"\xff" * 64  # same size, other bytes
  resampler.write_bytes(bytes(damaged))
  second = _load_in_subprocess(cache, jpeg_path)
  assert second.returncode == 0 and second.stdout == first.stdout, second.stderr[-3000:]
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 2, second.stderr
  for library, line in zip((resampler, decode), lines):
    assert line == (f"[nmjax] {library} is damaged (its sha256 is not the one recorded in"
                    f" {library.name}.sha256 when it was compiled): compiling it again")
  third = _load_in_subprocess(cache, jpeg_path)
  assert third.returncode == 0 and third.stderr == "", third.stderr
  assert sorted(p.name for p in cache.iterdir()) == sorted(
      n for p in libraries for n in (p.name, p.name + ".sha256"))
